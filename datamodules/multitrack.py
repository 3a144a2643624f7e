"""Multitrack DataModule: FxNorm-normalised stems (input) and the original mixture (target).

Songs follow the MUSDB18-HQ layout: ``root/train/<song>/`` (split into train and validation by a
seeded shuffle) and ``root/test/<song>/``, each with ``vocals bass drums other mixture`` WAVs.
``prepare_data`` builds the demo songs if ``root`` is the missing demo folder, fits the
FxNormalizer on the training songs if no features file exists, and writes normalised stems to
``cache/{train,test}/<song>/`` (float WAVs, one folder per song, atomic and resumable; each
split's ``fxnorm.json`` records the features and seed, and resuming with others is an error).
A batch is ``(stems (B, 8, T), mixture (B, 2, T))`` float32: vocals, bass, drums, other x L/R.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.fxnorm.audio import SILENCE_PEAK_DB
from datamodules.fxnorm.normalizer import FxNormalizer, normalize_folder
from datamodules.fxnorm.songs import MIXTURE, STEMS, list_songs, read_stem, song_info

_SILENCE = 10.0 ** (SILENCE_PEAK_DB / 20.0)
_MAX_DRAWS = 100


class Song:
    """A cached song folder: validated once, then read segment by segment."""

    def __init__(self, folder: Path, sr: int):
        self.folder = folder
        rate, self.length = song_info(folder, (*STEMS, MIXTURE))
        if rate != sr:
            raise ValueError(f"{folder}: sample rate {rate} Hz, expected {sr} Hz")

    def segment(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        stems = np.concatenate([read_stem(self.folder / f"{s}.wav", start, start + length) for s in STEMS])
        return stems, read_stem(self.folder / f"{MIXTURE}.wav", start, start + length)


def is_silent_segment(stems: np.ndarray, mixture: np.ndarray) -> bool:
    """Silent input stems or silent target: peak at or below -50 dBFS."""
    return np.max(np.abs(stems)) <= _SILENCE or np.max(np.abs(mixture)) <= _SILENCE


class RandomSegments(Dataset):
    """Random segments keyed by an integer: key k always gives the same (song, start), so any
    sampler that yields keys makes the data reproducible. Silent segments are redrawn."""

    def __init__(self, songs: list[Song], segment: int, seed: int):
        self.songs = [s for s in songs if s.length >= segment]
        if not self.songs:
            raise ValueError(f"no song is at least {segment} samples long")
        self.segment, self.seed = segment, seed

    def __getitem__(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(key)])
        for _ in range(_MAX_DRAWS):
            song = self.songs[rng.integers(len(self.songs))]
            stems, mixture = song.segment(int(rng.integers(song.length - self.segment + 1)), self.segment)
            if not is_silent_segment(stems, mixture):
                return torch.from_numpy(stems), torch.from_numpy(mixture)
        raise RuntimeError(f"{_MAX_DRAWS} random segments in a row were silent; are the songs silent?")


class EpochKeys(DistributedSampler):
    """Yields ``n`` fresh keys per epoch (``epoch * n + i``), split across ranks without padding
    duplicates beyond the last batch; Lightning calls ``set_epoch`` and, since this is a
    DistributedSampler, does not wrap it."""

    def __init__(self, n: int):
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        replicas = torch.distributed.get_world_size() if distributed else 1
        rank = torch.distributed.get_rank() if distributed else 0
        super().__init__(range(n), num_replicas=replicas, rank=rank, shuffle=False)
        self.n = n

    def __iter__(self):
        return iter(range(self.epoch * self.n + self.rank, (self.epoch + 1) * self.n, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))


class FixedSegments(Dataset):
    """Consecutive non-overlapping segments of every song, silent ones left out (validation/test)."""

    def __init__(self, songs: list[Song], segment: int):
        self.index = []
        for song in songs:
            for start in range(0, song.length - segment + 1, segment):
                if not is_silent_segment(*song.segment(start, segment)):
                    self.index.append((song, start))
        self.segment = segment

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        song, start = self.index[i]
        stems, mixture = song.segment(start, self.segment)
        return torch.from_numpy(stems), torch.from_numpy(mixture)


class MultitrackDataModule(pl.LightningDataModule):
    """See the module docstring. ``val_songs``: a count, or a fraction (< 1) of the training songs."""

    def __init__(
        self,
        root: str = "data/demo/multitrack",
        features: str | None = None,
        cache: str | None = None,
        segment_seconds: float = 10.0,
        sr: int = 44100,
        batch_size: int = 4,
        val_songs: float = 0.14,
        seed: int = 0,
        num_workers: int = 0,
        segments_per_epoch: int = 6400,
        demo_root: str | None = "data/demo",
    ):
        super().__init__()
        self.root = Path(root)
        self.cache = Path(cache) if cache else self.root.with_name(self.root.name + "_fxnorm")
        self.features = Path(features) if features else self.cache / "features.npz"
        self.segment = int(round(segment_seconds * sr))
        self.sr, self.batch_size, self.seed = sr, batch_size, seed
        self.val_songs, self.num_workers, self.segments_per_epoch = val_songs, num_workers, segments_per_epoch
        self.demo_root = Path(demo_root) if demo_root else None

    def prepare_data(self) -> None:
        if not self.root.exists() and self.demo_root is not None and self.root.resolve().is_relative_to(self.demo_root.resolve()):
            from datamodules.demo import ensure_demo_data

            ensure_demo_data(self.demo_root, parts=("multitrack",), seed=self.seed)
        if not (self.root / "train").is_dir():
            raise FileNotFoundError(f"{self.root / 'train'}: no training songs (expected the MUSDB18-HQ layout)")
        if not self.features.is_file():
            FxNormalizer.fit(list_songs(self.root / "train"), self.sr, seed=self.seed).save(self.features)
        normalizer = FxNormalizer.load(self.features)
        for split in ("train", "test"):
            if (self.root / split).is_dir():
                normalize_folder(normalizer, self.root / split, self.cache / split, seed=self.seed)

    def _split(self) -> tuple[list[Path], list[Path]]:
        folders = list_songs(self.cache / "train")
        order = np.random.default_rng(self.seed).permutation(len(folders))
        count = int(self.val_songs) if self.val_songs >= 1 else math.ceil(self.val_songs * len(folders))
        count = min(count, len(folders) - 1)
        val = sorted(folders[i] for i in order[:count])
        return [f for f in folders if f not in val], val

    def setup(self, stage: str | None = None) -> None:
        train, val = self._split()
        if stage in (None, "fit"):
            self.train_set = RandomSegments([Song(f, self.sr) for f in train], self.segment, self.seed)
        if stage in (None, "fit", "validate"):
            self.val_set = FixedSegments([Song(f, self.sr) for f in val], self.segment)
        if stage in (None, "test"):
            self.test_set = FixedSegments([Song(f, self.sr) for f in list_songs(self.cache / "test")], self.segment)

    def _loader(self, dataset: Dataset, sampler=None) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers, drop_last=sampler is not None)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, EpochKeys(self.segments_per_epoch))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)
