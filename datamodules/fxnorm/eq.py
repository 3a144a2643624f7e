"""EQ normalisation: match a stem's mean magnitude spectrum to a per-stem-type reference."""
from __future__ import annotations

import numpy as np
import scipy.fft
import scipy.signal

from datamodules.fxnorm.audio import as_audio, is_silent
from datamodules.fxnorm.loudness import normalize_loudness

N_FFT = 65536
HOP = 16384
MEASURE_LUFS = -30.0
FIR_TAPS = 1001
#: Savitzky-Golay window (bins) for smoothing spectra, per stem type (polynomial order 1).
SMOOTHING_WINDOW = {"vocals": 401, "other": 401, "bass": 151, "drums": 151}


def mean_spectrum(audio: np.ndarray, sr: int, n_fft: int = N_FFT, hop: int = HOP) -> np.ndarray:
    """Mean STFT magnitude over frames, per channel: (channels, n_fft // 2 + 1).

    Each channel is first loudness-normalised to -30 LUFS on its own so the spectra of quiet and
    loud stems are comparable. Frames are sqrt-Hann windowed and not centred; a channel shorter
    than one frame is zero-padded to one frame. Silent channels (peak <= -50 dBFS) give zeros.
    """
    audio = as_audio(audio)
    window = np.sqrt(scipy.signal.get_window("hann", n_fft)).astype(np.float32)
    spectra = np.zeros((audio.shape[0], n_fft // 2 + 1))
    for channel, signal in enumerate(audio):
        if is_silent(signal):
            continue
        signal = normalize_loudness(signal, sr, MEASURE_LUFS)[0]
        if signal.size < n_fft:
            signal = np.pad(signal, (0, n_fft - signal.size))
        frames = np.lib.stride_tricks.sliding_window_view(signal.astype(np.float32), n_fft)[::hop]
        total = np.zeros(n_fft // 2 + 1)
        for start in range(0, len(frames), 32):  # bounded memory for long stems
            total += np.abs(scipy.fft.rfft(frames[start : start + 32] * window, axis=1)).sum(axis=0)
        spectra[channel] = total / len(frames)
    return spectra


def smooth_spectrum(spectrum: np.ndarray, window: int) -> np.ndarray:
    """Savitzky-Golay smoothing (order 1) along the last axis, floored at a tiny positive value."""
    window = min(window, spectrum.shape[-1] - (1 - spectrum.shape[-1] % 2))
    smoothed = scipy.signal.savgol_filter(spectrum, window, 1, axis=-1)
    return np.maximum(smoothed, 1e-12)


def zero_phase_fir(audio: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """``scipy.signal.filtfilt(taps, 1, audio, axis=-1)`` computed with FFT convolution.

    filtfilt runs a direct-form filter, O(samples x taps), twice; for a 1001-tap FIR over a
    3-minute stem that takes seconds. This reproduces its odd-extension padding (3 x taps, or
    less for very short signals) and steady-state initial conditions exactly: for an FIR filter
    those equal prepending the first sample ``taps - 1`` times. The convolutions run in float32
    (five times faster; agreement with filtfilt to about 1e-6 of full scale).
    """
    audio = np.atleast_2d(audio)
    pad = min(3 * len(taps), audio.shape[-1] - 1)

    def forward(x: np.ndarray) -> np.ndarray:
        history = np.repeat(x[:, :1], len(taps) - 1, axis=1)
        padded = np.concatenate([history, x], axis=1).astype(np.float32)
        full = scipy.signal.oaconvolve(padded, taps[None, :].astype(np.float32), axes=1)
        return full[:, len(taps) - 1 : len(taps) - 1 + x.shape[1]].astype(np.float64)

    left = 2 * audio[:, :1] - audio[:, pad:0:-1]
    right = 2 * audio[:, -1:] - audio[:, -2 : -pad - 2 : -1]
    extended = np.concatenate([left, audio, right], axis=1)
    filtered = forward(forward(extended)[:, ::-1])[:, ::-1]
    return filtered[:, pad : pad + audio.shape[1]]


def eq_filter(gain: np.ndarray, sr: int, numtaps: int = FIR_TAPS) -> np.ndarray:
    """Linear-phase FIR taps (window method, Hamming) with magnitude ``gain`` on an rfft grid."""
    freqs = np.linspace(0.0, sr / 2, len(gain))
    return scipy.signal.firwin2(numtaps, freqs, gain, fs=sr, window="hamming")


def normalize_eq(
    audio: np.ndarray,
    sr: int,
    reference_spectrum: np.ndarray,
    smoothing_window: int = 401,
    numtaps: int = FIR_TAPS,
    max_gain_db: float = 40.0,
) -> np.ndarray:
    """Filter each channel so its mean spectrum approaches ``reference_spectrum``.

    The channel's mean spectrum (:func:`mean_spectrum`) is smoothed like the reference; the FIR
    magnitude is sqrt(reference / input) because the zero-phase forward-backward pass squares
    it. The overall correction is limited to +-``max_gain_db`` so bins where the stem has almost
    no energy are not boosted without bound. Silent stems and silent channels are unchanged.
    """
    audio = as_audio(audio)
    out = audio.copy()
    if is_silent(audio):
        return out
    spectra = mean_spectrum(audio, sr, n_fft=2 * (len(reference_spectrum) - 1))
    limit = 10.0 ** (max_gain_db / 40.0)
    for channel, spectrum in enumerate(spectra):
        if not spectrum.any():
            continue
        gain = np.sqrt(reference_spectrum / smooth_spectrum(spectrum, smoothing_window))
        taps = eq_filter(np.clip(gain, 1.0 / limit, limit), sr, numtaps)
        out[channel] = zero_phase_fir(audio[channel], taps)[0]
    return out
