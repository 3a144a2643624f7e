"""Songs as folders of WAV stems (the MUSDB18-HQ layout): listing, validated reading, writing."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import soundfile as sf

from framework.errors import InputError
from framework.io import atomic_path

STEMS = ("vocals", "bass", "drums", "other")
MIXTURE = "mixture"


def list_songs(root: str | os.PathLike) -> list[Path]:
    """Song folders directly under ``root`` that hold at least one stem WAV, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"song folder {root} does not exist")
    return sorted(p for p in root.iterdir() if p.is_dir() and any((p / f"{s}.wav").is_file() for s in STEMS))


def stem_info(path: str | os.PathLike) -> tuple[int, int]:
    """(sample rate, length) of one mono or stereo WAV, read from its header; an
    :class:`InputError` naming the file when it is missing, unreadable, empty or has more channels."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: missing")
    try:
        info = sf.info(str(path))
    except (RuntimeError, sf.LibsndfileError) as error:
        raise InputError(f"{path}: unreadable ({error})") from error
    if info.frames == 0:
        raise InputError(f"{path}: no samples")
    if info.channels > 2:
        raise InputError(f"{path}: expected mono or stereo, got {info.channels} channels")
    return info.samplerate, info.frames


def song_info(folder: str | os.PathLike, names: Iterable[str], sr: int | None = None) -> tuple[int, int]:
    """(sample rate, length) shared by the named WAVs of a song, checked without decoding audio:
    an :class:`InputError` names the file that is missing, unreadable or empty, or whose sample
    rate (``sr``, if given, else the first file's) or length differs."""
    folder = Path(folder)
    first = None
    for name in names:
        path = folder / f"{name}.wav"
        rate, length = stem_info(path)
        if first is None:
            first = (path, rate, length)
        expected = sr if sr is not None else first[1]
        if rate != expected:
            raise InputError(f"{path}: sample rate {rate} Hz, expected {expected} Hz")
        if length != first[2]:
            raise InputError(f"{path}: {length} samples, but {first[0].name} has {first[2]}; stems of a song must have equal length")
    if first is None:
        raise InputError(f"{folder}: no stems to read")
    return first[1], first[2]


def read_stem(path: str | os.PathLike, start: int = 0, stop: int | None = None) -> np.ndarray:
    """(2, samples) float32 audio of one WAV (mono duplicated to stereo), optionally a slice."""
    audio, _ = sf.read(str(path), start=start, stop=stop, dtype="float32", always_2d=True)
    audio = audio.T
    if audio.shape[0] == 1:
        audio = np.repeat(audio, 2, axis=0)
    if not np.all(np.isfinite(audio)):
        raise InputError(f"{path}: contains NaN or infinite samples")
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
