"""Audio loops -> C_WAV vectors (the loop detector's training data), cached, split and batched.

A loop folder holds WAV/OGG/FLAC files (searched recursively) and optionally ``metadata.csv`` with
columns ``file`` (path relative to the folder), ``bpm`` and ``bars`` (either may be left empty).
How many bars a file holds, and so where its bar lines fall:

- BPM and bars known: bars of 4 * 60 / BPM seconds, the file trimmed or padded to that many;
- only BPM known (from the metadata, or a name such as ``funk_120bpm.wav``): bars = the file length
  in bars at that tempo, rounded (at least 1);
- only bars known: one bar is the file length divided by the bar count;
- neither: the file is taken to be 8 bars long.

Loops shorter than 8 bars are tiled to 8 (see :func:`datamodules.correlation.c_wav`).

Files that cannot be used are skipped, and each skip is counted under its reason: ``unreadable``,
``empty``, ``non-finite`` (NaN or infinite samples), ``silent``, ``too short`` (a bar of fewer
than 256 samples), ``invalid metadata``, and ``missing`` (listed in the metadata but absent). The
reasons are logged and stored in the cache.

The vectors are computed once and cached in an ``.npz`` file (default: ``<folder>.c_wav.npz``
beside the folder, so a read-only loop library can be used) together with the file names, the skip
report and a fingerprint of the folder (names, sizes, modification times of the audio files and
the metadata file's content); a changed folder is recomputed.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import soundfile as sf
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from datamodules.correlation import N_BARS, c_wav
from datamodules.demo import ensure_demo_input
from datamodules.sharding import UnpaddedShardSampler
from framework.io import atomic_path

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".ogg", ".flac")
METADATA_NAME = "metadata.csv"
CACHE_VERSION = "c_wav-2"  # change when the C_WAV computation changes, to invalidate old caches
BPM_IN_NAME = re.compile(r"(\d{2,3}(?:\.\d+)?)\s*bpm", re.IGNORECASE)


@dataclass
class LoopVectors:
    """C_WAV vectors of the usable loops of a folder, and what was skipped and why."""

    vectors: np.ndarray  # (N, 28) float32
    files: list[str]  # paths relative to the folder, one per vector
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> files

    def skip_counts(self) -> dict[str, int]:
        return {reason: len(files) for reason, files in sorted(self.skipped.items())}


def audio_files(folder: Path) -> list[str]:
    """Audio files under ``folder``, as sorted POSIX paths relative to it."""
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*")
                  if path.is_file() and path.suffix.lower() in AUDIO_SUFFIXES)


def read_metadata(folder: Path) -> dict[str, tuple[float | None, int | None] | str]:
    """``metadata.csv`` as file -> (bpm, bars), or file -> an error message for an invalid row."""
    path = folder / METADATA_NAME
    if not path.exists():
        return {}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "file" not in reader.fieldnames:
            raise ValueError(f"{path}: needs a header with a 'file' column (and optionally 'bpm', 'bars')")
        entries: dict[str, tuple[float | None, int | None] | str] = {}
        for line, row in enumerate(reader, start=2):
            name = (row.get("file") or "").strip()
            try:
                bpm = float(row["bpm"]) if (row.get("bpm") or "").strip() else None
                bars = int(row["bars"]) if (row.get("bars") or "").strip() else None
                if (bpm is not None and not bpm > 0) or (bars is not None and bars < 1):
                    raise ValueError("bpm must be > 0 and bars >= 1")
                entries[name] = (bpm, bars)
            except ValueError as error:
                entries[name] = f"{path.name} line {line}: {error}"
    return entries


def bpm_from_name(name: str) -> float | None:
    match = BPM_IN_NAME.search(Path(name).stem)
    return float(match.group(1)) if match else None


class SkipLoop(Exception):
    """A loop file that cannot be used, with the reason it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def loop_vector(path: Path, bpm: float | None, bars: int | None) -> np.ndarray:
    """C_WAV of one loop file (bar count resolved as in the module docstring); raises ``SkipLoop``."""
    try:
        audio, sr = sf.read(path, dtype="float64", always_2d=True)
    except (RuntimeError, OSError) as error:
        raise SkipLoop("unreadable", str(error)) from error
    if len(audio) == 0:
        raise SkipLoop("empty")
    if not np.isfinite(audio).all():
        raise SkipLoop("non-finite", f"{int(np.count_nonzero(~np.isfinite(audio)))} NaN or infinite samples")
    audio = audio.mean(axis=1)
    if not np.any(audio):
        raise SkipLoop("silent")
    if bars is None:
        bars = max(1, round(len(audio) * bpm / (240.0 * sr))) if bpm is not None else N_BARS
    try:
        return c_wav(audio, sr, bpm=bpm, n_bars=bars)
    except ValueError as error:
        raise SkipLoop("too short", str(error)) from error


def folder_fingerprint(folder: Path, files: list[str]) -> str:
    """A hash of the audio files' names, sizes and modification times and of the metadata file's bytes."""
    digest = hashlib.sha1(CACHE_VERSION.encode())
    for name in files:
        stat = (folder / name).stat()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    metadata = folder / METADATA_NAME
    if metadata.exists():
        digest.update(metadata.read_bytes())
    return digest.hexdigest()


def compute_loop_vectors(folder: Path) -> LoopVectors:
    """C_WAV of every usable loop in ``folder`` (with a progress bar), skipping the rest with reasons."""
    files = audio_files(folder)
    metadata = read_metadata(folder)
    skipped: dict[str, list[str]] = {}
    for name in sorted(set(metadata) - set(files)):
        skipped.setdefault("missing", []).append(name)
    vectors, kept = [], []
    for name in tqdm(files, desc=f"C_WAV of {folder.name}", unit="loop"):
        entry = metadata.get(name, (None, None))
        try:
            if isinstance(entry, str):
                raise SkipLoop("invalid metadata", entry)
            bpm, bars = entry
            vectors.append(loop_vector(folder / name, bpm if bpm is not None else bpm_from_name(name), bars))
            kept.append(name)
        except SkipLoop as skip:
            log.debug("skipping %s: %s", folder / name, skip)
            skipped.setdefault(skip.reason, []).append(name)
    result = LoopVectors(np.array(vectors, dtype=np.float32).reshape(-1, 28), kept, skipped)
    if skipped:
        log.warning("%s: skipped %d loop file(s): %s", folder, sum(result.skip_counts().values()), result.skip_counts())
    return result


def default_cache_path(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    return folder.with_name(folder.name + ".c_wav.npz")


def load_or_compute(folder: str | os.PathLike, cache: str | os.PathLike | None = None) -> LoopVectors:
    """The loop vectors of ``folder``, from ``cache`` when it matches the folder, else computed and cached.

    Raises ``FileNotFoundError`` for a missing folder and ``ValueError`` when no loop is usable.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"loop folder {folder} does not exist")
    cache = Path(cache) if cache is not None else default_cache_path(folder)
    key = folder_fingerprint(folder, audio_files(folder))
    if cache.exists():
        with np.load(cache, allow_pickle=False) as stored:
            if str(stored["key"]) == key:
                skipped: dict[str, list[str]] = {}
                for name, reason in zip(stored["skipped_files"].tolist(), stored["skipped_reasons"].tolist()):
                    skipped.setdefault(reason, []).append(name)
                return LoopVectors(stored["vectors"], stored["files"].tolist(), skipped)
    result = compute_loop_vectors(folder)
    if len(result.files) == 0:
        raise ValueError(f"no usable loop in {folder} (skipped: {result.skip_counts() or 'no audio files found'})")
    skipped_pairs = [(name, reason) for reason, names in sorted(result.skipped.items()) for name in names]
    with atomic_path(cache) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, key=np.array(key), vectors=result.vectors, files=np.array(result.files, dtype=str),
                 skipped_files=np.array([name for name, _ in skipped_pairs], dtype=str),
                 skipped_reasons=np.array([reason for _, reason in skipped_pairs], dtype=str))
    return result


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled (train, val) indices of ``n`` items: a seeded permutation cut in two, no duplicates.

    The validation part has round(n * val_fraction) items, at least 1 and at most n - 1; with a
    single item there is nothing to hold out, so that item is both the training and validation set.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    if n == 1:
        return order, order
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return order[n_val:], order[:n_val]


class AudioLoopDataModule(pl.LightningDataModule):
    """C_WAV vectors (float tensors of shape (batch, 28)) of a folder of audio loops.

    ``fit`` trains on one part and validates on the held-out part; ``test`` serves the held-out
    part again (the labelled MIDI phrases of the Fig. 3 check are read by
    :class:`callbacks.loop_analysis.LoopAnalysis`, not served here).

    Args:
        loops: the loop folder (see the module docstring for metadata and bar counts).
        cache: the ``.npz`` cache file; default ``<loops>.c_wav.npz``.
        batch_size: batch size of both loaders (a smaller set gives one smaller batch).
        val_fraction: share of the loops held out for validation (see :func:`split_indices`).
        seed: seed of the train/validation split.
        num_workers: DataLoader workers.
        demo_root: the built-in demo data root; a missing ``loops`` folder under it is generated.
    """

    def __init__(self, loops: str = "data/demo/loops", cache: str | None = None, batch_size: int = 64,
                 val_fraction: float = 0.2, seed: int = 0, num_workers: int = 0, demo_root: str | None = "data/demo"):
        super().__init__()
        self.loops = Path(loops)
        self.cache = Path(cache) if cache is not None else default_cache_path(self.loops)
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.demo_root = demo_root
        self.data: LoopVectors | None = None
        self._train: torch.Tensor | None = None
        self._val: torch.Tensor | None = None

    def prepare_data(self) -> None:
        ensure_demo_input(self.loops, self.demo_root, "loops")
        load_or_compute(self.loops, self.cache)

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        self.data = load_or_compute(self.loops, self.cache)
        train, val = split_indices(len(self.data.files), self.val_fraction, self.seed)
        vectors = torch.from_numpy(np.ascontiguousarray(self.data.vectors, dtype=np.float32))
        self._train, self._val = vectors[train], vectors[val]

    def _loaded(self) -> LoopVectors:
        if self.data is None:
            raise RuntimeError("AudioLoopDataModule.setup() has not been called")
        return self.data

    def train_vectors(self) -> torch.Tensor:
        """The whole training set, (N_train, 28)."""
        self._loaded()
        return self._train

    def val_vectors(self) -> torch.Tensor:
        """The whole validation set, (N_val, 28)."""
        self._loaded()
        return self._val

    def skip_report(self) -> dict[str, list[str]]:
        """Skipped files by reason."""
        return self._loaded().skipped

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_vectors(), batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        """Held-out loops sharded across ranks without padding, so no loop is counted twice."""
        vectors = self.val_vectors()
        return DataLoader(vectors, batch_size=self.batch_size, sampler=UnpaddedShardSampler(vectors),
                          num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        """The held-out loops again: a loop library is too small to spare a third split."""
        return self.val_dataloader()
