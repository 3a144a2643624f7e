"""Panning normalisation with the Stereo Panning Spectrum (amplitude panning, linear law).

Per STFT bin, the channel similarity psi = 2|L||R| / (|L|^2 + |R|^2) is 1 for a centred source
and falls towards 0 as it moves to one side. The side comes from the partial similarities
psi_L = |R|/|L| and psi_R = |L|/|R| (paper eq. 5): their difference is negative exactly when the
left channel is louder, so a bin is "left" when |L| > |R|. With the linear law the panning gains
are Phi_L = 1 - p, Phi_R = p for a position p in [0, 1] (0 = hard left), estimated as p = psi / 2
on the left and 1 - psi / 2 on the right (the paper's psi = 2 alpha). Re-panning scales each
channel's magnitude by the ratio of the reference gains (same side, reference similarity) to
the estimated ones and keeps the phase (paper eq. 6).
"""
from __future__ import annotations

import numpy as np
import scipy.fft
import scipy.signal

from datamodules.fxnorm.audio import as_audio, is_silent

N_FFT = 2048
HOP = 1024
FRAME_THRESHOLD_DB = -10.0
#: Bins above this frequency (Hz) keep unity gain, per stem type.
CUTOFF_HZ = {"vocals": 16000.0, "bass": 16000.0, "other": 16000.0, "drums": 6000.0}
#: Savitzky-Golay window (bins, order 1) for the reference similarity.
SMOOTHING_WINDOW = 101
_EPS = 1e-12


def _window() -> np.ndarray:
    return np.sqrt(scipy.signal.get_window("hann", N_FFT)).astype(np.float32)


def stft(audio: np.ndarray) -> np.ndarray:
    """(channels, frames, bins) sqrt-Hann STFT, hop N_FFT/2; every sample lies in two frames."""
    n = audio.shape[1]
    n_frames = -(-n // HOP) + 1
    padded = np.pad(audio.astype(np.float32), ((0, 0), (HOP, HOP * (n_frames + 1) - n - HOP)))
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT, axis=1)[:, ::HOP]
    return scipy.fft.rfft(frames * _window(), axis=2)


def istft(spectrum: np.ndarray, length: int) -> np.ndarray:
    """Inverse of :func:`stft` by weighted overlap-add (sqrt-Hann squared sums to one at 50 %)."""
    frames = scipy.fft.irfft(spectrum, n=N_FFT, axis=2) * _window()
    channels, n_frames, _ = frames.shape
    out = np.zeros((channels, n_frames + 1, HOP), dtype=np.float64)
    out[:, :-1] += frames[:, :, :HOP]
    out[:, 1:] += frames[:, :, HOP:]
    return out.reshape(channels, -1)[:, HOP : HOP + length]


def similarity(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Paper eq. 4: psi = 2|L||R| / (|L|^2 + |R|^2), in [0, 1]."""
    return 2.0 * left * right / (left**2 + right**2 + _EPS)


def _active_frames(left: np.ndarray, right: np.ndarray, threshold_db: float) -> np.ndarray:
    """Frames whose mono (mid) energy is within ``threshold_db`` of the loudest frame."""
    energy = np.sum(((left + right) / 2) ** 2, axis=1)
    with np.errstate(divide="ignore"):
        level = 10.0 * np.log10(energy / max(energy.max(), _EPS))
    return level >= threshold_db


def mean_similarity(audio: np.ndarray, threshold_db: float = FRAME_THRESHOLD_DB) -> np.ndarray:
    """Mean psi per bin over the active frames: the stem's Stereo Panning Spectrum feature.

    Mono input is duplicated to stereo (psi = 1 everywhere).
    """
    magnitude = np.abs(stft(as_audio(audio, stereo=True)))
    active = _active_frames(magnitude[0], magnitude[1], threshold_db)
    return similarity(magnitude[0][active], magnitude[1][active]).mean(axis=0)


def smooth_similarity(psi: np.ndarray, window: int = SMOOTHING_WINDOW) -> np.ndarray:
    return np.clip(scipy.signal.savgol_filter(psi, window, 1), 0.0, 1.0)


def _panning_position(psi: np.ndarray, left_side: np.ndarray, centre: np.ndarray) -> np.ndarray:
    position = np.where(left_side, psi / 2, 1.0 - psi / 2)
    return np.where(centre, 0.5, position)


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
    0.9, pushing every stem slightly wider than the dataset mean; 1 matches the mean). Frames more
    than ``-threshold_db`` below the stem's loudest frame and bins above ``cutoff_hz`` keep unity
    gain. Mono input is duplicated to stereo; silent stems are returned unchanged.
    """
    audio = as_audio(audio, stereo=True)
    if is_silent(audio):
        return audio.copy()
    spectrum = stft(audio)
    left, right = np.abs(spectrum[0]), np.abs(spectrum[1])
    left_side = left > right
    centre = left == right
    position = _panning_position(similarity(left, right), left_side, centre)
    target = _panning_position(np.clip(reference_scale * reference_psi, 0.0, 1.0)[None, :], left_side, centre)
    gain_left = (1.0 - target) / np.maximum(1.0 - position, _EPS)
    gain_right = target / np.maximum(position, _EPS)
    untouched = ~_active_frames(left, right, threshold_db)[:, None] | (scipy.fft.rfftfreq(N_FFT, 1.0 / sr) > cutoff_hz)[None, :]
    spectrum[0] *= np.where(untouched, 1.0, gain_left).astype(np.float32)
    spectrum[1] *= np.where(untouched, 1.0, gain_right).astype(np.float32)
    return istft(spectrum, audio.shape[1])
