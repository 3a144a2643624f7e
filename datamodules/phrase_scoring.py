"""Phrase caches for the loop detector to score: whole packed batches, and labelled phrases.

- :class:`PhraseScoringDataModule` serves a phrase cache for ``predict`` as ready-made batches of
  bit-packed phrases with their cache indices (no per-phrase Python work), sharded over ranks;
  each batch is read from the shard files when it is served, so a rank reads only its own batches
  and holds one batch at a time, whatever the size of the cache.
- :func:`load_labelled_phrases` pairs a phrase cache with the ``labels.json`` of its MIDI folder.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.demo import ensure_demo_input, read_window_labels
from datamodules.pianoroll import REPORT_NAME, PackedShards, PhraseCache, ingest, load_phrase_cache


def ensure_phrase_cache(cache: str | Path, midi: str | Path | None, demo: str | Path | None, workers: int = 1) -> Path:
    """Return ``cache``; a missing cache under the ``demo`` root is first ingested from ``midi``.

    The demo MIDI folder itself is generated when missing. A missing cache anywhere else is an
    error naming it: ingesting a user's MIDI collection is a deliberate step
    (``python -m datamodules.pianoroll MIDI_FOLDER CACHE``), not a side effect.
    """
    cache = Path(cache)
    if (cache / REPORT_NAME).is_file():
        return cache
    if midi is None or demo is None or not cache.resolve().is_relative_to(Path(demo).resolve()):
        raise FileNotFoundError(
            f"no phrase cache at {cache}: build one with `python -m datamodules.pianoroll MIDI_FOLDER {cache}`"
        )
    ingest(ensure_demo_input(midi, demo, "midi"), cache, workers=workers)
    return cache


class PackedPhraseBatches(Dataset):
    """Item ``b`` is batch ``b`` of a phrase cache: ``(indices int64 (n,), packed uint8 (n, 912))``.

    ``packed`` is a cache's :class:`~datamodules.pianoroll.PackedShards` (a batch is one read) or
    an array. Slicing whole batches keeps Python overhead per batch, not per phrase. An empty
    cache still yields one (empty) batch so every consumer runs its end-of-epoch code and writes
    its outputs.
    """

    def __init__(self, packed: PackedShards | np.ndarray, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.packed, self.batch_size = packed, batch_size

    def __len__(self) -> int:
        return max(1, math.ceil(len(self.packed) / self.batch_size))

    def __getitem__(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = batch * self.batch_size
        stop = min(start + self.batch_size, len(self.packed))
        indices = torch.arange(start, max(start, stop), dtype=torch.int64)
        return indices, torch.from_numpy(np.ascontiguousarray(self.packed[start:stop]))


class PhraseScoringDataModule(pl.LightningDataModule):
    """Serve every phrase of a cache once for ``predict``.

    Args:
        cache: phrase cache folder.
        midi: MIDI folder to build the cache from when it is missing (optional).
        demo: the demo data root; a missing ``midi`` under it is generated.
        batch_size: phrases per batch.
        num_workers: DataLoader worker processes.

    Under several ranks each rank reads every ``world_size``-th batch (a padded
    ``DistributedSampler``, so every rank gets at least one batch and no rank skips the loop);
    consumers de-duplicate the padding by the phrase indices each batch carries.
    """

    def __init__(
        self, cache: str, midi: str | None = None, demo: str | None = None, batch_size: int = 8192, num_workers: int = 0
    ):
        super().__init__()
        self.cache, self.midi, self.demo = cache, midi, demo
        self.batch_size, self.num_workers = batch_size, num_workers
        self.phrases: PhraseCache | None = None

    def prepare_data(self) -> None:
        ensure_phrase_cache(self.cache, self.midi, self.demo, workers=max(1, self.num_workers))

    def setup(self, stage: str) -> None:
        if self.phrases is None:
            self.phrases = load_phrase_cache(self.cache)

    def predict_dataloader(self) -> DataLoader:
        dataset = PackedPhraseBatches(self.phrases.packed, self.batch_size)
        world_size = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=False)
        return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=self.num_workers)


@dataclass
class LabelledPhrases:
    """A phrase cache with one label per phrase: 1 loop, 0 non-loop, -1 unlabelled.

    ``missing`` counts labelled windows that have no phrase in the cache (e.g. windows the
    phrase filter dropped); they are reported, not silently lost.
    """

    packed: np.ndarray
    label: np.ndarray
    missing: int


def load_labelled_phrases(cache: str | Path, midi: str | Path, labels: str | Path, demo: str | Path | None = None) -> LabelledPhrases:
    """Load ``cache`` (built from ``midi`` when missing) and label its phrases from ``labels``.

    ``labels`` maps a MIDI path relative to ``midi`` to ``{"loop": [start bars], "non_loop": [...]}``;
    a phrase is matched by (source path, start bar).
    """
    ensure_phrase_cache(cache, midi, demo)
    phrases = load_phrase_cache(cache)
    labels = Path(labels)
    if not labels.is_file():
        raise FileNotFoundError(f"Labels file {labels} does not exist.")
    is_loop = read_window_labels(labels)
    position = {(str(source), int(bar)): i for i, (source, bar) in enumerate(zip(phrases.sources, phrases.start_bars))}
    label = np.full(len(phrases), -1, dtype=np.int8)
    missing = 0
    for key, loop in is_loop.items():
        index = position.get(key)
        if index is None:
            missing += 1
        else:
            label[index] = int(loop)
    return LabelledPhrases(packed=np.asarray(phrases.packed), label=label, missing=missing)

