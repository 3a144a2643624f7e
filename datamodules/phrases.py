"""The phrase DataModule: a bit-packed phrase cache, split by song, served in whole-batch reads.

Batch format: a float tensor (B, 128, 57) of 0/1 cells, time-major (8 bars x 16 steps; columns 0-8
drum classes, 9-56 bass pitches 24..71), unpacked from (B, 912) uint8 on the training device in
``on_after_batch_transfer`` so that only packed bytes cross the host-device link. The packed
phrases stay on disk (:class:`~datamodules.pianoroll.PackedShards`): a batch reads its rows.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.demo import ensure_demo_input
from datamodules.pianoroll import REPORT_NAME, PhraseCache, ingest, load_phrase_cache, unpack_first_steps, unpack_phrases
from datamodules.sharding import UnpaddedShardSampler
from datamodules.splits import describe_split, song_split
from framework.errors import InputError


class PackedPhrases(Dataset):
    """Rows ``index`` of packed (N, 912) uint8 phrases (a cache's ``PackedShards`` or an array);
    ``__getitems__`` fetches a whole batch with one read."""

    def __init__(self, packed, index: torch.Tensor):
        self.packed = packed
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.packed[int(self.index[i])])

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        return torch.from_numpy(self.packed[self.index[torch.as_tensor(indices, dtype=torch.long)].numpy()])


def _as_batch(batch: torch.Tensor) -> torch.Tensor:
    """Collate function for ``PackedPhrases``: ``__getitems__`` already returns the stacked batch."""
    return batch


class PhraseDataModule(pl.LightningDataModule):
    """Phrases from a phrase cache, split into train/validation (and optionally test) by song.

    Every phrase of a source file lies in one split (:func:`datamodules.splits.song_split`):
    neighbouring phrases share 7 of their 8 bars, so a split by phrase would validate on
    near-copies of training phrases. The shares are met to within one file.

    Args:
        cache: phrase cache folder (``datamodules.pianoroll.ingest`` output).
        midi: MIDI folder ingested into ``cache`` by ``prepare_data`` when the cache is missing.
        demo_root: the built-in demo data folder; when ``midi`` is missing and lies inside it,
            ``prepare_data`` first creates the demo MIDI files (a missing folder elsewhere is an error).
        val_fraction, test_fraction: shares of the phrases held out, as whole source files; without a
            test share, ``test_dataloader`` serves the validation split.
        seed: seed of the shuffle of the source files (independent of the global seed).
        ingest_workers: processes used when ``prepare_data`` ingests.
    """

    def __init__(
        self,
        cache: str,
        midi: str | None = None,
        demo_root: str | None = None,
        batch_size: int = 256,
        val_fraction: float = 0.2,
        test_fraction: float = 0.0,
        seed: int = 0,
        num_workers: int = 0,
        ingest_workers: int = 1,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.cache = Path(cache)
        self.midi = Path(midi) if midi is not None else None
        self.demo_root = Path(demo_root) if demo_root is not None else None
        self.phrases: PhraseCache | None = None
        self.splits: dict[str, torch.Tensor] = {}

    def prepare_data(self) -> None:
        if (self.cache / REPORT_NAME).is_file() or self.midi is None:
            return
        ensure_demo_input(self.midi, self.demo_root, "midi")
        ingest(self.midi, self.cache, workers=self.hparams.ingest_workers)

    def setup(self, stage: str | None = None) -> None:
        if self.phrases is not None:
            return
        phrases = load_phrase_cache(self.cache)
        fractions = {"val": self.hparams.val_fraction, "test": self.hparams.test_fraction}
        splits = song_split(phrases.file_index, fractions, int(self.hparams.seed))
        wanted = ("train", "val", "test") if self.hparams.test_fraction > 0 else ("train", "val")
        if any(len(splits[name]) == 0 for name in wanted):
            raise InputError(
                f"phrase cache {self.cache} holds {len(phrases)} phrases of {len(np.unique(phrases.file_index))} "
                f"files: too few for val_fraction={self.hparams.val_fraction}, test_fraction="
                f"{self.hparams.test_fraction} by song ({describe_split(splits, phrases.file_index)})"
            )
        if self.hparams.test_fraction <= 0:
            splits["test"] = splits["val"]
        self.phrases = phrases
        self.splits = {name: torch.from_numpy(index) for name, index in splits.items()}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        """Training batches are shuffled (Lightning shards them under DDP); evaluation batches are
        sharded across ranks without padding, so no phrase is counted twice."""
        dataset = PackedPhrases(self.phrases.packed, self.splits[split])
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle if shuffle else None,
            sampler=None if shuffle else UnpaddedShardSampler(dataset),
            num_workers=self.hparams.num_workers,
            collate_fn=_as_batch,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def on_after_batch_transfer(self, batch: torch.Tensor, dataloader_idx: int) -> torch.Tensor:
        return unpack_phrases(batch).float()

    def packed_phrases(self, split: str) -> torch.Tensor:
        """The whole ``split`` ("train", "val" or "test"), bit-packed: (N, 912) uint8, 912 bytes a phrase."""
        self.setup()
        return torch.from_numpy(self.phrases.packed[self.splits[split].numpy()])

    def train_phrases(self) -> torch.BoolTensor:
        """The whole training split, unpacked: (N, 128, 57) bool (7,296 bytes a phrase)."""
        return unpack_phrases(self.packed_phrases("train"))

    def train_first_steps(self) -> torch.BoolTensor:
        """Step 0 of every training phrase, (N, 57) bool, unpacked from the first bytes of each phrase only."""
        self.setup()
        return unpack_first_steps(self.phrases.packed, self.splits["train"])

    def val_phrases(self) -> torch.BoolTensor:
        """The whole validation split, unpacked: (N, 128, 57) bool (e.g. the real set of generative metrics)."""
        return unpack_phrases(self.packed_phrases("val"))

    def val_packed(self) -> torch.Tensor:
        """The validation split bit-packed, (N, 912) uint8: what ``GenerationMetrics`` subsamples before unpacking."""
        return self.packed_phrases("val")
