"""Panning normalisation with the Stereo Panning Spectrum (amplitude panning, linear law).

Per STFT bin, the channel similarity psi = 2|L||R| / (|L|^2 + |R|^2) (paper eq. 4) is 1 for a
centred source and falls towards 0 as it moves to one side. The partial similarities
psi_L = |R|/|L| and psi_R = |L|/|R| (eq. 5) differ in sign exactly as the channels differ in
level, so a bin lies on the side of its louder channel. With the linear law the channel gains
are 1 - alpha and alpha for a position alpha in [0, 1/2] on the quieter side, and the level
ratio is r = quiet / loud = alpha / (1 - alpha).

Re-panning scales each channel's magnitude by the ratio of the reference gains (same side,
reference similarity) to the estimated ones and keeps the phase (eq. 6). The paper estimates
alpha from psi = 2 alpha; this module inverts eq. 4 exactly instead, r = psi / (1 + sqrt(1 -
psi^2)), because the shortcut is off by up to 0.1 in psi: a re-panned bin would then measure a
different similarity than the reference, and a second normalisation would re-pan it again.
With the exact inverse the gains are (loud + quiet) / ((1 + r_ref) |X|) times 1 for the louder
and r_ref for the quieter channel: the bin keeps |L| + |R| (the linear law's invariant) and its
similarity becomes the reference exactly.

Which frames are re-panned follows the authors: all but the near-silent ones, by an absolute
floor on the peak of the frame's mono spectrum (:func:`frame_floor`), so a quiet verse is
re-panned like its chorus. A bin with no side (every bin of a mono stem) gets one from a fixed
comb (:func:`_repan`), so mono stems reach the reference similarity like wet training stems do.

The STFT (2048 samples, hop 1024, sqrt-Hann, one frame of zero padding at each end) runs over
blocks of frames, so memory stays bounded for any song length.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import scipy.fft
import scipy.signal

from datamodules.fxnorm.audio import as_audio, extended_block, is_silent, peak
from datamodules.fxnorm.drc import MEASURE_PEAK_DB

N_FFT = 2048
HOP = 1024
FRAME_THRESHOLD_DB = -10.0
#: Bins above this frequency (Hz) keep unity gain, per stem type.
CUTOFF_HZ = {"vocals": 16000.0, "bass": 16000.0, "other": 16000.0, "drums": 6000.0}
#: Savitzky-Golay window (bins, order 1) for the reference similarity.
SMOOTHING_WINDOW = 101
#: Width (bins, 172 Hz at 44.1 kHz) of the alternating bands that give side-less bins a side.
COMB_BINS = 8
_FRAMES_PER_BLOCK = 64
_EPS = 1e-12


def _window(dtype: np.dtype) -> np.ndarray:
    return np.sqrt(scipy.signal.get_window("hann", N_FFT)).astype(dtype)


def frame_count(samples: int) -> int:
    """Frames of the STFT: frame f covers samples [(f - 1) HOP, (f + 1) HOP), so every sample lies in two."""
    return -(-samples // HOP) + 1


def _frame_blocks(samples: int) -> Iterator[tuple[int, int]]:
    count = frame_count(samples)
    for first in range(0, count, _FRAMES_PER_BLOCK):
        yield first, min(first + _FRAMES_PER_BLOCK, count)


def _stft(audio: np.ndarray, first: int, last: int) -> np.ndarray:
    """(channels, frames, bins) spectra of frames ``first`` .. ``last - 1``."""
    block = extended_block(audio, (first - 1) * HOP, last * HOP)
    frames = np.lib.stride_tricks.sliding_window_view(block, N_FFT, axis=1)[:, ::HOP] * _window(audio.dtype)
    return scipy.fft.rfft(frames, axis=2, workers=1)


def _overlap_add(out: np.ndarray, spectrum: np.ndarray, first: int) -> None:
    """Add the windowed inverse of frames ``first``.. into ``out``; sqrt-Hann squared sums to one at 50 %."""
    frames = scipy.fft.irfft(spectrum, N_FFT, axis=2, workers=1) * _window(out.dtype)
    channels, count, _ = frames.shape
    hops = np.zeros((channels, count + 1, HOP), dtype=out.dtype)
    hops[:, :-1] += frames[:, :, :HOP]
    hops[:, 1:] += frames[:, :, HOP:]
    start = (first - 1) * HOP
    lo, hi = max(start, 0), min(start + hops.shape[1] * HOP, out.shape[1])
    out[:, lo:hi] += hops.reshape(channels, -1)[:, lo - start : hi - start]


def _active(spectrum: np.ndarray, floor: float) -> np.ndarray:
    """Frames of a (2, frames, bins) block whose mono spectrum ``|L + R|`` peaks at or above ``floor``."""
    return np.abs(spectrum[0] + spectrum[1]).max(axis=1) >= floor


def frame_floor(audio: np.ndarray, threshold_db: float = FRAME_THRESHOLD_DB) -> float:
    """The magnitude below which a frame's mono spectrum counts as silent, for this stem.

    The authors' rule is absolute: ``max |STFT(L + R)| < threshold_db`` (dB re 1, unnormalised
    STFT) at the level their chain delivers a stem to this stage, the DRC's measuring level of
    -10 dBFS peak. Here the stem keeps its own level, so the floor is scaled by the stem's peak
    relative to that level: the result does not depend on the stem's gain, and for a stem at
    -10 dBFS it is the authors' threshold exactly. A full-scale sine's frame peaks at ~1,300 times
    its amplitude, so only frames about 60 dB or more below the stem's peak stay untouched.
    """
    return 10.0 ** ((threshold_db - MEASURE_PEAK_DB) / 20.0) * peak(audio)


def similarity(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Paper eq. 4: psi = 2|L||R| / (|L|^2 + |R|^2), in [0, 1]."""
    return 2.0 * left * right / (left**2 + right**2 + _EPS)


def mean_similarity(audio: np.ndarray, threshold_db: float = FRAME_THRESHOLD_DB) -> np.ndarray:
    """Mean psi per bin over the active frames (:func:`frame_floor`): the stem's Stereo Panning
    Spectrum feature. Mono input is duplicated to stereo (psi = 1 everywhere). A stem without an
    active frame (its channels cancel in the mono sum) is averaged over all frames.
    """
    audio = as_audio(audio, stereo=True)
    floor = frame_floor(audio, threshold_db)
    total, count = np.zeros(N_FFT // 2 + 1), 0
    everything, frames = np.zeros(N_FFT // 2 + 1), 0
    for first, last in _frame_blocks(audio.shape[1]):
        spectrum = _stft(audio, first, last)
        psi = similarity(np.abs(spectrum[0]), np.abs(spectrum[1]))
        active = _active(spectrum, floor)
        total += psi[active].sum(axis=0)
        count += int(active.sum())
        everything += psi.sum(axis=0)
        frames += psi.shape[0]
    return total / count if count else everything / frames


def smooth_similarity(psi: np.ndarray, window: int = SMOOTHING_WINDOW) -> np.ndarray:
    return np.clip(scipy.signal.savgol_filter(psi, window, 1), 0.0, 1.0)


def level_ratio(psi: np.ndarray) -> np.ndarray:
    """Quiet/loud magnitude ratio r in [0, 1] of a bin with similarity psi (inverse of eq. 4)."""
    psi = np.clip(psi, 0.0, 1.0)
    return psi / (1.0 + np.sqrt(1.0 - psi**2))


def _repan(spectrum: np.ndarray, reference_ratio: np.ndarray) -> None:
    """Give every bin of ``spectrum`` (2, frames, bins) the level ratio ``reference_ratio``, in place.

    A bin keeps its side (its louder channel). A bin with no side, |L| = |R| as in every bin of a
    mono stem, gets the side of its band in a comb of :data:`COMB_BINS`-bin bands alternating left
    and right. Both channels keep the common phase, so the stem's mono sum L + R is unchanged and it
    reaches the reference similarity like a stereo stem. Bands are wider than a partial's main lobe
    (three bins), which per-bin alternation would split and the inverse STFT blur back towards
    psi = 1. A broadband stem stays centred; one whose energy sits in a single band leans to that
    band's side, as any re-panning of a mono source must (psi depends on magnitudes only).
    """
    left, right = np.abs(spectrum)
    loud = (left + right) / (1.0 + reference_ratio)  # |L| + |R| is kept
    quiet = loud * reference_ratio
    left_band = (np.arange(spectrum.shape[-1]) // COMB_BINS) % 2 == 0
    centred = left == right
    for channel, (this, other) in enumerate(((left, right), (right, left))):
        louder = np.where(centred, left_band if channel == 0 else ~left_band, this > other)
        spectrum[channel] *= np.where(louder, loud, quiet) / np.maximum(this, _EPS)


def normalize_panning(
    audio: np.ndarray,
    sr: int,
    reference_psi: np.ndarray,
    cutoff_hz: float = 16000.0,
    threshold_db: float = FRAME_THRESHOLD_DB,
    reference_scale: float = 1.0,
) -> np.ndarray:
    """Re-pan every bin of every active frame to the reference similarity, keeping its side.

    ``reference_psi`` has N_FFT/2 + 1 bins. ``reference_scale`` multiplies it (the authors used
    0.9, pushing every stem slightly wider than the dataset mean; 1 matches the mean). Frames whose
    mono spectrum stays below :func:`frame_floor` (near-silence) and bins above ``cutoff_hz`` keep
    unity gain; bins without a side get one as :func:`_repan` describes. Mono input is duplicated
    to stereo; silent stems are returned unchanged.
    """
    audio = as_audio(audio, stereo=True)
    if is_silent(audio):
        return audio.copy()
    bins = int(np.count_nonzero(scipy.fft.rfftfreq(N_FFT, 1.0 / sr) <= cutoff_hz))
    reference_ratio = level_ratio(reference_scale * np.asarray(reference_psi)[:bins]).astype(audio.dtype)
    floor = frame_floor(audio, threshold_db)
    out = np.zeros_like(audio)
    for first, last in _frame_blocks(audio.shape[1]):
        spectrum = _stft(audio, first, last)
        selected = np.flatnonzero(_active(spectrum, floor))
        if selected.size:
            touched = spectrum[:, selected, :bins]
            _repan(touched, reference_ratio)
            spectrum[:, selected, :bins] = touched
        _overlap_add(out, spectrum, first)
    return out
