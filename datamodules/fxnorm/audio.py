"""Shared checks and block-wise FFT filtering for (channels, samples) float audio arrays.

Stems read from WAV files are float32 and the whole chain keeps them in float32: every effect
is accurate to far below audibility in single precision, and the filters below work on blocks of
a few hundred kilobytes, so no stage makes whole-song temporaries (on a 3-minute stem each one
costs tens of milliseconds of page faults, more than the arithmetic it holds).
"""
from __future__ import annotations

import numpy as np
import scipy.fft

#: A stem whose peak is at or below this level (dBFS) is left untouched by every effect.
SILENCE_PEAK_DB = -50.0
#: Smallest FFT size of :func:`fft_filter` (per-block overhead stays small for short kernels).
MIN_FFT = 16384


def as_audio(audio: np.ndarray, name: str = "audio", stereo: bool = False) -> np.ndarray:
    """Validate ``audio`` as a finite (channels, samples) float array.

    float32 input stays float32 (no copy); any other dtype becomes float64. A 1-D array is read
    as mono ``(1, n)``. With ``stereo=True`` a mono input is duplicated to two identical channels
    (a centred source), and more than two channels is an error.
    """
    array = np.asarray(audio)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"{name}: expected a (channels, samples) array, got shape {array.shape}")
    if array.dtype != np.float32:
        array = array.astype(np.float64, copy=False)
    if not (np.isfinite(array.max()) and np.isfinite(array.min())):  # max and min propagate NaN
        raise ValueError(f"{name}: contains NaN or infinite samples")
    if stereo:
        if array.shape[0] == 1:
            array = np.repeat(array, 2, axis=0)
        elif array.shape[0] != 2:
            raise ValueError(f"{name}: expected mono or stereo audio, got {array.shape[0]} channels")
    return array


def peak(audio: np.ndarray) -> float:
    """Largest absolute sample, without an ``abs`` temporary the size of the audio."""
    return float(max(audio.max(), -audio.min()))


def peak_db(audio: np.ndarray) -> float:
    """Sample peak in dBFS (``-inf`` for digital silence)."""
    level = peak(audio)
    return 20.0 * np.log10(level) if level > 0 else -np.inf


def is_silent(audio: np.ndarray) -> bool:
    """Whether the peak lies at or below :data:`SILENCE_PEAK_DB` (such stems are not processed)."""
    return peak_db(audio) <= SILENCE_PEAK_DB


def db_to_gain(db: float | np.ndarray) -> float | np.ndarray:
    return 10.0 ** (np.asarray(db) / 20.0)


def extended_block(audio: np.ndarray, start: int, stop: int, odd: bool = False) -> np.ndarray:
    """``audio[:, start:stop]`` for any ``start < stop``, extended beyond the ends of the signal.

    Outside ``[0, n)`` the samples are zeros, or with ``odd=True`` the odd extension that
    ``scipy.signal.filtfilt`` pads with (``2 x[0] - x[-i]`` before the start, ``2 x[n-1] -
    x[2n-2-i]`` after the end; zeros further than ``n - 1`` samples out). A view when the range
    lies inside the signal.
    """
    n = audio.shape[1]
    if 0 <= start and stop <= n:
        return audio[:, start:stop]
    block = np.zeros((audio.shape[0], stop - start), dtype=audio.dtype)
    inside = slice(max(start, 0), min(stop, n))
    if inside.start < inside.stop:
        block[:, inside.start - start : inside.stop - start] = audio[:, inside]
    if odd:
        before = np.arange(max(start, 1 - n), min(stop, 0))
        block[:, before - start] = 2 * audio[:, :1] - audio[:, -before]
        after = np.arange(max(start, n), min(stop, 2 * n - 1))
        block[:, after - start] = 2 * audio[:, -1:] - audio[:, 2 * n - 2 - after]
    return block


def fft_filter(audio: np.ndarray, kernels: np.ndarray, delay: int = 0, odd: bool = False) -> np.ndarray:
    """FIR filtering by overlap-save: ``y[c, i] = sum_k kernels[c, k] x[c, i + delay - k]``, ``0 <= i < n``.

    ``kernels`` is (taps,) for every channel or (channels, taps). Samples outside the signal
    come from :func:`extended_block` (zeros, or the odd extension). Blocks use real FFTs of a
    fast size of about four kernel lengths, so memory stays bounded for any song length; the
    output has the input's dtype.
    """
    kernels = np.atleast_2d(kernels)
    channels, n = audio.shape
    taps = kernels.shape[1]
    nfft = scipy.fft.next_fast_len(max(4 * taps, MIN_FFT), real=True)
    step = nfft - taps + 1
    response = scipy.fft.rfft(kernels.astype(audio.dtype), nfft, axis=1, workers=1)
    out = np.empty_like(audio)
    for start in range(0, n, step):
        stop = min(start + step, n)
        block = extended_block(audio, start + delay - taps + 1, stop + delay, odd)
        spectrum = scipy.fft.rfft(block, nfft, axis=1, workers=1)
        spectrum *= response
        out[:, start:stop] = scipy.fft.irfft(spectrum, nfft, axis=1, workers=1)[:, taps - 1 : taps - 1 + stop - start]
    return out
