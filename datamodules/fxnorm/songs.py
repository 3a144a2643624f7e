"""Songs as folders of WAV stems (the MUSDB18-HQ layout): listing, validated reading, writing."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import soundfile as sf

from framework.io import atomic_path

STEMS = ("vocals", "bass", "drums", "other")
MIXTURE = "mixture"


def list_songs(root: str | os.PathLike) -> list[Path]:
    """Song folders directly under ``root`` that hold at least one stem WAV, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"song folder {root} does not exist")
    return sorted(p for p in root.iterdir() if p.is_dir() and any((p / f"{s}.wav").is_file() for s in STEMS))


def song_info(folder: str | os.PathLike, names: Iterable[str]) -> tuple[int, int]:
    """(sample rate, length) shared by the named WAVs of a song, checked without decoding audio."""
    folder = Path(folder)
    rates, lengths = {}, {}
    for name in names:
        path = folder / f"{name}.wav"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing stem")
        info = sf.info(str(path))
        if info.channels > 2:
            raise ValueError(f"{path}: expected mono or stereo, got {info.channels} channels")
        rates[path], lengths[path] = info.samplerate, info.frames
    first = next(iter(rates))
    for path in rates:
        if rates[path] != rates[first]:
            raise ValueError(f"{path}: sample rate {rates[path]} Hz differs from {first.name} ({rates[first]} Hz)")
        if lengths[path] != lengths[first]:
            raise ValueError(f"{path}: {lengths[path]} samples, but {first.name} has {lengths[first]}; stems of a song must have equal length")
    return rates[first], lengths[first]


def read_stem(path: str | os.PathLike, start: int = 0, stop: int | None = None) -> np.ndarray:
    """(2, samples) float32 audio of one WAV (mono duplicated to stereo), optionally a slice."""
    audio, _ = sf.read(str(path), start=start, stop=stop, dtype="float32", always_2d=True)
    audio = audio.T
    if audio.shape[0] == 1:
        audio = np.repeat(audio, 2, axis=0)
    if not np.all(np.isfinite(audio)):
        raise ValueError(f"{path}: contains NaN or infinite samples")
    return np.ascontiguousarray(audio)


def read_song(folder: str | os.PathLike, names: Iterable[str] = STEMS) -> tuple[dict[str, np.ndarray], int]:
    """The named stems of a song as (2, samples) float32 arrays, and the sample rate."""
    names = tuple(names)
    sr, _ = song_info(folder, names)
    return {name: read_stem(Path(folder) / f"{name}.wav") for name in names}, sr


def write_song(folder: str | os.PathLike, stems: Mapping[str, np.ndarray], sr: int, subtype: str = "FLOAT") -> None:
    """Write (channels, samples) stems as ``folder/<name>.wav``; the folder appears complete or not at all."""
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        for name, audio in stems.items():
            sf.write(str(tmp / f"{name}.wav"), np.asarray(audio, dtype=np.float32).T, sr, subtype=subtype)
