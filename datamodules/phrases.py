"""The phrase DataModule: a bit-packed phrase cache held in memory, served in whole-batch slices.

Batch format: a float tensor (B, 128, 57) of 0/1 cells, time-major (8 bars x 16 steps; columns 0-8
drum classes, 9-56 bass pitches 24..71), unpacked from (B, 912) uint8 on the training device in
``on_after_batch_transfer`` so that only packed bytes cross the host-device link.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.demo import ensure_demo_input
from datamodules.pianoroll import REPORT_NAME, ingest, load_phrase_cache, unpack_first_steps, unpack_phrases
from datamodules.sharding import UnpaddedShardSampler


class PackedPhrases(Dataset):
    """Rows ``index`` of a packed (N, 912) uint8 tensor; ``__getitems__`` fetches a batch in one gather."""

    def __init__(self, packed: torch.Tensor, index: torch.Tensor):
        self.packed = packed
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.packed[self.index[i]]

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        return self.packed[self.index[torch.as_tensor(indices, dtype=torch.long)]]


def _as_batch(batch: torch.Tensor) -> torch.Tensor:
    """Collate function for ``PackedPhrases``: ``__getitems__`` already returns the stacked batch."""
    return batch


class PhraseDataModule(pl.LightningDataModule):
    """Phrases from a phrase cache, split into train/validation (and optionally test) by a seeded permutation.

    Args:
        cache: phrase cache folder (``datamodules.pianoroll.ingest`` output).
        midi: MIDI folder ingested into ``cache`` by ``prepare_data`` when the cache is missing.
        demo_root: the built-in demo data folder; when ``midi`` is missing and lies inside it,
            ``prepare_data`` first creates the demo MIDI files (a missing folder elsewhere is an error).
        val_fraction, test_fraction: shares of the phrases held out; without a test share,
            ``test_dataloader`` serves the validation split.
        seed: seed of the split permutation (independent of the global seed).
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
        self.packed: torch.Tensor | None = None
        self.splits: dict[str, torch.Tensor] = {}

    def prepare_data(self) -> None:
        if (self.cache / REPORT_NAME).is_file() or self.midi is None:
            return
        ensure_demo_input(self.midi, self.demo_root, "midi")
        ingest(self.midi, self.cache, workers=self.hparams.ingest_workers)

    def setup(self, stage: str | None = None) -> None:
        if self.packed is not None:
            return
        packed = load_phrase_cache(self.cache).packed
        n = len(packed)
        n_val = int(round(n * self.hparams.val_fraction))
        n_test = int(round(n * self.hparams.test_fraction))
        n_train = n - n_val - n_test
        if n_train < 1 or n_val < 1 or (self.hparams.test_fraction > 0 and n_test < 1):
            raise ValueError(
                f"phrase cache {self.cache} holds {n} phrases: too few for val_fraction="
                f"{self.hparams.val_fraction}, test_fraction={self.hparams.test_fraction} "
                f"(train {n_train}, val {n_val}, test {n_test})"
            )
        generator = torch.Generator().manual_seed(int(self.hparams.seed))
        order = torch.randperm(n, generator=generator)
        self.packed = torch.from_numpy(np.ascontiguousarray(packed))
        self.splits = {
            "train": order[:n_train],
            "val": order[n_train : n_train + n_val],
            "test": order[n_train + n_val :] if n_test else order[n_train : n_train + n_val],
        }

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        """Training batches are shuffled (Lightning shards them under DDP); evaluation batches are
        sharded across ranks without padding, so no phrase is counted twice."""
        dataset = PackedPhrases(self.packed, self.splits[split])
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

    def _unpacked(self, split: str) -> torch.BoolTensor:
        self.setup()
        return unpack_phrases(self.packed[self.splits[split]])

    def train_phrases(self) -> torch.BoolTensor:
        """The whole training split, unpacked: (N, 128, 57) bool."""
        return self._unpacked("train")

    def train_first_steps(self) -> torch.BoolTensor:
        """Step 0 of every training phrase, (N, 57) bool, unpacked from the first bytes of each phrase only."""
        self.setup()
        return unpack_first_steps(self.packed, self.splits["train"])

    def val_phrases(self) -> torch.BoolTensor:
        """The whole validation split, unpacked: (N, 128, 57) bool (e.g. the real set of generative metrics)."""
        return self._unpacked("val")
