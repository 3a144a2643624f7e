"""Reverberation: the training-time augmentation and the short inference-time reverb.

Room impulse responses are synthesised as exponentially decaying Gaussian noise with an RT60
(60 dB decay time), one independent noise tail per channel so the reverb is decorrelated in
stereo, normalised to unit energy. This needs no impulse-response collection and gives a diffuse
late field, which is what matters for normalisation; it has no early reflections.
"""
from __future__ import annotations

import numpy as np
import pyloudnorm
import scipy.signal

from datamodules.fxnorm.audio import as_audio, fft_filter, is_silent

#: Stem types that receive reverberation.
REVERB_STEMS = ("vocals", "other")
AUGMENT_RT60_S = (2.0, 4.0)
INFERENCE_RT60_S = (0.6, 1.2)
SHELF_GAIN_DB = -30.0
LOW_SHELF_HZ = (500.0, 700.0)
HIGH_SHELF_HZ = (7000.0, 10000.0)
#: Padding (s) after the impulse response for the shelving filters' own decay.
_SHELF_DECAY_S = 0.05


def room_impulse_response(sr: int, rt60: float, rng: np.random.Generator, channels: int = 2) -> np.ndarray:
    """(channels, samples) decaying noise reaching -60 dB after ``rt60`` seconds, unit energy per channel."""
    n = max(int(rt60 * sr), 1)
    envelope = 10.0 ** (-3.0 * np.arange(n) / n)  # -60 dB at n samples
    response = rng.standard_normal((channels, n)) * envelope
    return response / np.sqrt(np.sum(response**2, axis=1, keepdims=True))


def shelf_filter(audio: np.ndarray, sr: int, kind: str, cutoff_hz: float, gain_db: float) -> np.ndarray:
    """RBJ-cookbook shelving biquad (``kind`` 'low_shelf' or 'high_shelf'), as in pyloudnorm."""
    biquad = pyloudnorm.IIRfilter(gain_db, 1 / np.sqrt(2), cutoff_hz, sr, kind)
    return scipy.signal.lfilter(biquad.b, biquad.a, audio, axis=-1)


def _convolve(audio: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Causal convolution of each channel with its kernel row, cut to the input length (later taps cannot reach it)."""
    return fft_filter(audio, kernel[:, : audio.shape[1]])


def augment_reverb(
    audio: np.ndarray,
    sr: int,
    rng: np.random.Generator,
    rt60_range: tuple[float, float] = AUGMENT_RT60_S,
    shelf_gain_db: float = SHELF_GAIN_DB,
) -> np.ndarray:
    """Training augmentation: x + reverb(EQ(x)) with a random room and random band limits.

    EQ: a ``shelf_gain_db`` low shelf at U(500, 700) Hz and high shelf at U(7, 10) kHz, so mainly
    the mid band excites the room; RT60 ~ U(``rt60_range``). The tail is cut at the stem's end so
    the length is kept. Both are linear and time-invariant, so the shelves filter the impulse
    response (plus 50 ms for their own decay) instead of the stem, and the dry path is a unit
    impulse in the same kernel: one convolution. Mono input is duplicated to stereo; silent
    stems are returned unchanged.
    """
    audio = as_audio(audio, stereo=True)
    if is_silent(audio):
        return audio.copy()
    low, high = rng.uniform(*LOW_SHELF_HZ), rng.uniform(*HIGH_SHELF_HZ)
    response = room_impulse_response(sr, rng.uniform(*rt60_range), rng)
    kernel = np.pad(response, ((0, 0), (0, int(_SHELF_DECAY_S * sr))))
    kernel = shelf_filter(shelf_filter(kernel, sr, "low_shelf", low, shelf_gain_db), sr, "high_shelf", high, shelf_gain_db)
    kernel[:, 0] += 1.0
    return _convolve(audio, kernel)


def inference_reverb(
    audio: np.ndarray, sr: int, rng: np.random.Generator, rt60_range: tuple[float, float] = INFERENCE_RT60_S, wet: float = 0.5
) -> np.ndarray:
    """Short room (RT60 below 1.5 s) mixed 50/50 with the dry stem, for dry stems at inference."""
    audio = as_audio(audio, stereo=True)
    if is_silent(audio):
        return audio.copy()
    kernel = wet * room_impulse_response(sr, rng.uniform(*rt60_range), rng)
    kernel[:, 0] += 1.0 - wet
    return _convolve(audio, kernel)
