"""Multitrack DataModule: FxNorm-normalised stems (input) and the original mixture (target).

Songs follow the MUSDB18-HQ layout: ``root/train/<song>/`` and ``root/test/<song>/``, each with
``vocals bass drums other mixture`` WAVs. ``train/`` is split into training and validation songs:
MUSDB18's official 14 validation songs when they are all there, else ``val_songs`` (a list of
names, a count, or a fraction of the songs, drawn with ``data_seed``).

``prepare_data`` (once per node) builds the demo songs if ``root`` is the missing demo folder,
checks every song's files from their headers (an :class:`InputError` naming the song and file,
before anything is written), fits the FxNormalizer on the training songs only if ``features``
does not exist, and normalises both folders into ``cache/{train,test}/<song>/`` (atomic and
resumable). The cache belongs to its source: by default it lies beside ``root``
(``<root>_fxnorm``), and each split's ``fxnorm.json`` records the source folder, the features and
the normalisation seed, so resuming with another is an error naming both. ``data_seed`` seeds
what belongs to the dataset rather than to a run, the validation split and the reverb drawn per
song and stem, so runs with any ``seed`` (which draws the training segments) share one cache and
see the same training, validation and test inputs.

A cached song is one ``audio.npy`` (10, n) float32 array, vocals, bass, drums, other, mixture x
L/R, read memory-mapped: a training example is one slice of one file. ``index.json`` beside it
holds the length and the song's silent runs, so silent segments are skipped without reading audio
and evaluation sets are indexed without reading them at all.

Batches: training and validation ``(stems (B, 8, T), mixture (B, 2, T))`` float32 segments; test
``(1, 8, n), (1, 2, n)``, one whole song per batch. Evaluation sets are sharded across ranks
without duplicates (:class:`~datamodules.sharding.UnpaddedShardSampler`), except that a rank left
without a test song repeats one (:class:`SongShards`).
"""
from __future__ import annotations

import bisect
import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.fxnorm.audio import SILENCE_PEAK_DB
from datamodules.fxnorm.normalizer import FxNormalizer, normalize_folder
from datamodules.fxnorm.songs import MIXTURE, STEMS, list_songs, song_info
from datamodules.sharding import UnpaddedShardSampler
from framework.errors import InputError
from framework.io import atomic_path

#: MUSDB18's official validation songs (the rest of its ``train/`` trains), as the musdb package lists them.
MUSDB18_VALIDATION = (
    "Actions - One Minute Smile", "Clara Berry And Wooldog - Waltz For My Victims", "Johnny Lokke - Promises & Lies",
    "Patrick Talbot - A Reason To Leave", "Triviul - Angelsaint", "Alexander Ross - Goodbye Bolero",
    "Fergessen - Nos Palpitants", "Leaf - Summerghost", "Skelpolu - Human Mistakes", "Young Griffo - Pennies",
    "ANiMAL - Rockshow", "James May - On The Line", "Meaxic - Take A Step", "Traffic Experiment - Sirens",
)
CHANNELS = 2 * (len(STEMS) + 1)
LAYOUT = "packed"
_SILENCE = 10.0 ** (SILENCE_PEAK_DB / 20.0)
#: Silent runs shorter than this (samples) are not recorded; shorter segments never count as silent.
MIN_SILENT_RUN = 4096
_MAX_DRAWS = 100


def silent_runs(audio: np.ndarray, min_length: int = MIN_SILENT_RUN) -> list[list[int]]:
    """``[start, stop)`` runs of at least ``min_length`` samples where every channel of
    ``(channels, n)`` audio stays at or below -50 dBFS."""
    quiet = np.abs(audio).max(axis=0) <= _SILENCE
    edges = np.flatnonzero(np.diff(np.concatenate([[False], quiet, [False]]).astype(np.int8)))
    return [[int(a), int(b)] for a, b in zip(edges[::2], edges[1::2]) if b - a >= min_length]


def write_packed_song(folder: Path, stems: Mapping[str, np.ndarray], sr: int) -> None:
    """Write a normalised song as ``audio.npy`` (10, n) float32 and ``index.json``, atomically."""
    audio = np.concatenate([np.asarray(stems[name], dtype=np.float32) for name in (*STEMS, MIXTURE)])
    index = {"sr": int(sr), "length": int(audio.shape[1]),
             "silent_stems": silent_runs(audio[: 2 * len(STEMS)]), "silent_mixture": silent_runs(audio[2 * len(STEMS):])}
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        np.save(tmp / "audio.npy", audio)
        (tmp / "index.json").write_text(json.dumps(index))


class PackedSong:
    """A cached song: its length and silent runs from ``index.json``, audio read by memory map."""

    def __init__(self, folder: Path, sr: int):
        self.folder = Path(folder)
        index = json.loads((self.folder / "index.json").read_text())
        if index["sr"] != sr:
            raise InputError(f"{self.folder}: cached at {index['sr']} Hz, expected {sr} Hz")
        self.length = int(index["length"])
        self._runs = [sorted(map(tuple, index["silent_stems"])), sorted(map(tuple, index["silent_mixture"]))]
        self._audio = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_audio": None}  # each worker process maps the file itself

    def is_silent(self, start: int, stop: int) -> bool:
        """Whether the stems or the mixture stay at or below -50 dBFS over ``[start, stop)``."""
        for runs in self._runs:
            position = bisect.bisect_right(runs, (start, math.inf)) - 1
            if position >= 0 and runs[position][1] >= stop:
                return True
        return False

    def read(self, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(8, T)`` stems and ``(2, T)`` mixture of samples ``[start, stop)``, one copy from the map."""
        if self._audio is None:
            self._audio = np.load(self.folder / "audio.npy", mmap_mode="r")
        audio = np.array(self._audio[:, start:stop])
        return audio[: 2 * len(STEMS)], audio[2 * len(STEMS):]


class RandomSegments(Dataset):
    """Random segments keyed by an integer: key k always gives the same (song, start), so any
    sampler that yields keys makes the data reproducible. Silent segments are redrawn."""

    def __init__(self, songs: list[PackedSong], segment: int, seed: int):
        self.songs = [s for s in songs if s.length >= segment]
        if not self.songs:
            raise InputError(f"no song is at least {segment} samples long")
        self.segment, self.seed = segment, seed

    def __getitem__(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(key)])
        for _ in range(_MAX_DRAWS):
            song = self.songs[rng.integers(len(self.songs))]
            start = int(rng.integers(song.length - self.segment + 1))
            if not song.is_silent(start, start + self.segment):
                stems, mixture = song.read(start, start + self.segment)
                return torch.from_numpy(stems), torch.from_numpy(mixture)
        raise RuntimeError(f"{_MAX_DRAWS} random segments in a row were silent; are the songs silent?")


class EpochKeys(DistributedSampler):
    """Yields fresh keys every epoch, the same number on every rank: ``n`` rounded up to a multiple
    of the world size, rank r taking every world-size-th key from r. Lightning calls ``set_epoch``
    and, since this is a DistributedSampler, does not wrap it."""

    def __init__(self, n: int, num_replicas: int | None = None, rank: int | None = None):
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        replicas = num_replicas or (torch.distributed.get_world_size() if distributed else 1)
        rank = rank if rank is not None else (torch.distributed.get_rank() if distributed else 0)
        super().__init__(range(n), num_replicas=replicas, rank=rank, shuffle=False)
        self.per_rank = -(-n // replicas)

    def __iter__(self):
        total = self.per_rank * self.num_replicas
        return iter(range(self.epoch * total + self.rank, (self.epoch + 1) * total, self.num_replicas))

    def __len__(self) -> int:
        return self.per_rank


class FixedSegments(Dataset):
    """Consecutive non-overlapping segments of every song, silent ones left out (validation)."""

    def __init__(self, songs: list[PackedSong], segment: int):
        self.index = [(song, start) for song in songs for start in range(0, song.length - segment + 1, segment)
                      if not song.is_silent(start, start + segment)]
        self.segment = segment

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        song, start = self.index[i]
        stems, mixture = song.read(start, start + self.segment)
        return torch.from_numpy(stems), torch.from_numpy(mixture)


class WholeSongs(Dataset):
    """Every song in full, one item each (test)."""

    def __init__(self, songs: list[PackedSong]):
        self.songs = songs

    def __len__(self) -> int:
        return len(self.songs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        stems, mixture = self.songs[i].read()
        return torch.from_numpy(stems), torch.from_numpy(mixture)


class SongShards(UnpaddedShardSampler):
    """Rank r of w gets songs r, r + w, ...; a rank left without a song (fewer songs than ranks)
    gets song r mod n once, so that every rank runs the test loop and its collectives. Song-level
    metrics count a repeated song once (:class:`~callbacks.mix_metrics.MixFeatureError`)."""

    def __iter__(self):
        own = list(super().__iter__())
        return iter(own or [self.rank % len(self.dataset)])

    def __len__(self) -> int:
        return max(super().__len__(), 1)


def default_workers(devices: int = 1) -> int:
    """Loader processes per rank: the CPUs this process may use, shared by the node's ranks, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // max(devices, 1)))


class MultitrackDataModule(pl.LightningDataModule):
    """See the module docstring. ``num_workers=None`` uses :func:`default_workers`; ``stages`` are
    the trainer stages the run will call, so that a missing ``test/`` fails before training."""

    def __init__(
        self,
        root: str = "data/demo/multitrack",
        features: str | None = None,
        cache: str | None = None,
        segment_seconds: float = 10.0,
        sr: int = 44100,
        batch_size: int = 4,
        val_songs: float | Sequence[str] = 0.14,
        seed: int = 0,
        data_seed: int = 0,
        num_workers: int | None = None,
        segments_per_epoch: int = 6400,
        demo_root: str | None = "data/demo",
        stages: Sequence[str] = ("fit", "test"),
    ):
        super().__init__()
        self.root = Path(root)
        self.cache = Path(cache) if cache else self.root.with_name(self.root.name + "_fxnorm")
        self.features = Path(features) if features else self.cache / "features.npz"
        self.segment = int(round(segment_seconds * sr))
        self.sr, self.batch_size, self.seed, self.data_seed = sr, batch_size, seed, data_seed
        self.val_songs, self.num_workers, self.segments_per_epoch = val_songs, num_workers, segments_per_epoch
        self.demo_root = Path(demo_root) if demo_root else None
        self.stages = tuple(stages)

    def _splits(self) -> tuple[str, ...]:
        return ("train", "test") if "test" in self.stages or (self.root / "test").is_dir() else ("train",)

    def prepare_data(self) -> None:
        if not self.root.exists() and self.demo_root is not None and self.root.resolve().is_relative_to(self.demo_root.resolve()):
            from datamodules.demo import ensure_demo_data

            ensure_demo_data(self.demo_root, parts=("multitrack",), seed=self.seed)
        for split in self._splits():
            if not (self.root / split).is_dir():
                hint = "; pass stages=[fit] to train without a test set" if split == "test" else ""
                raise InputError(f"{self.root / split}: no such folder (expected the MUSDB18-HQ layout: train/, test/){hint}")
            songs = list_songs(self.root / split)
            if not songs:
                raise InputError(f"{self.root / split}: no song folders with stems")
            for folder in songs:
                song_info(folder, (*STEMS, MIXTURE), self.sr)
        train, validation = self.split()
        normalizer = self._normalizer(train, validation)
        for split in self._splits():
            normalize_folder(normalizer, self.root / split, self.cache / split, seed=self.data_seed,
                             write=write_packed_song, layout=LAYOUT)

    def _normalizer(self, train: list[str], validation: list[str]) -> FxNormalizer:
        """The features file, fitted on the training songs only when it does not exist yet."""
        if not self.features.is_file():
            folders = [self.root / "train" / name for name in train]
            FxNormalizer.fit(folders, self.sr, seed=self.data_seed).save(self.features)
        normalizer = FxNormalizer.load(self.features)
        leaked = sorted(set(normalizer.fitted_on) & set(validation))
        if leaked:
            raise InputError(f"{self.features} was fitted on validation song(s) {', '.join(leaked)}; "
                             "delete it to refit on the training songs, or pass another features file")
        return normalizer

    def split(self) -> tuple[list[str], list[str]]:
        """Training and validation song names of ``root/train`` (see the module docstring)."""
        names = [folder.name for folder in list_songs(self.root / "train")]
        if set(MUSDB18_VALIDATION) <= set(names):
            validation = set(MUSDB18_VALIDATION)
        elif isinstance(self.val_songs, (int, float)):
            count = int(self.val_songs) if self.val_songs >= 1 else math.ceil(self.val_songs * len(names))
            order = np.random.default_rng(self.data_seed).permutation(len(names))
            validation = {names[i] for i in order[: min(count, len(names) - 1)]}
        else:
            validation = set(self.val_songs)
            unknown = sorted(validation - set(names))
            if unknown:
                raise InputError(f"val_songs names songs that {self.root / 'train'} lacks: {', '.join(unknown)}")
        return [n for n in names if n not in validation], [n for n in names if n in validation]

    def _songs(self, split: str, names: Sequence[str] | None = None) -> list[PackedSong]:
        folder = self.cache / split
        names = names if names is not None else sorted(p.name for p in folder.iterdir() if (p / "index.json").is_file())
        return [PackedSong(folder / name, self.sr) for name in names]

    def setup(self, stage: str | None = None) -> None:
        train, validation = self.split()
        if stage in (None, "fit"):
            self.train_set = RandomSegments(self._songs("train", train), self.segment, self.seed)
        if stage in (None, "fit", "validate"):
            self.val_set = FixedSegments(self._songs("train", validation), self.segment)
        if stage in (None, "test"):
            if not (self.cache / "test").is_dir():
                raise InputError(f"{self.root / 'test'}: no test songs were prepared")
            self.test_set = WholeSongs(self._songs("test"))

    def _workers(self) -> int:
        if self.num_workers is not None:
            return self.num_workers
        return default_workers(self.trainer.num_devices if self.trainer is not None else 1)

    def _loader(self, dataset: Dataset, sampler, batch_size: int, workers: int) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                          drop_last=isinstance(sampler, EpochKeys), persistent_workers=workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, EpochKeys(self.segments_per_epoch), self.batch_size, self._workers())

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, UnpaddedShardSampler(self.val_set), self.batch_size, self._workers())

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, SongShards(self.test_set), 1, min(1, self._workers()))
