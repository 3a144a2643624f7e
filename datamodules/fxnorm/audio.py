"""Shared checks and small helpers for (channels, samples) float audio arrays."""
from __future__ import annotations

import numpy as np

#: A stem whose peak is at or below this level (dBFS) is left untouched by every effect.
SILENCE_PEAK_DB = -50.0


def as_audio(audio: np.ndarray, name: str = "audio", stereo: bool = False) -> np.ndarray:
    """Validate ``audio`` as a finite (channels, samples) array and return it as float64.

    A 1-D array is read as mono ``(1, n)``. With ``stereo=True`` a mono input is duplicated to
    two identical channels (a centred source), and more than two channels is an error.
    """
    array = np.asarray(audio)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"{name}: expected a (channels, samples) array, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name}: contains NaN or infinite samples")
    array = array.astype(np.float64, copy=False)
    if stereo:
        if array.shape[0] == 1:
            array = np.repeat(array, 2, axis=0)
        elif array.shape[0] != 2:
            raise ValueError(f"{name}: expected mono or stereo audio, got {array.shape[0]} channels")
    return array


def peak_db(audio: np.ndarray) -> float:
    """Sample peak in dBFS (``-inf`` for digital silence)."""
    peak = float(np.max(np.abs(audio)))
    return 20.0 * np.log10(peak) if peak > 0 else -np.inf


def is_silent(audio: np.ndarray) -> bool:
    """Whether the peak lies at or below :data:`SILENCE_PEAK_DB` (such stems are not processed)."""
    return peak_db(audio) <= SILENCE_PEAK_DB


def db_to_gain(db: float | np.ndarray) -> float | np.ndarray:
    return 10.0 ** (np.asarray(db) / 20.0)
