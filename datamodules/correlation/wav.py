"""C_WAV: bar-to-bar correlation of an audio loop, one mel power spectrum per whole bar."""
from __future__ import annotations

import functools

import librosa
import numpy as np

from datamodules.correlation.bars import N_BARS, PAIR_COLS, PAIR_ROWS

N_MELS = 128
MIN_BAR_SAMPLES = 256


@functools.lru_cache(maxsize=32)
def _mel_filterbank(sr: int, n_fft: int) -> np.ndarray:
    return librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=N_MELS).astype(np.float64)


def bar_segments(audio: np.ndarray, sr: int, bpm: float | None = None, n_bars: int = N_BARS) -> np.ndarray:
    """Cut a loop of ``n_bars`` bars of 4/4 into 8 equal bar segments, tiling short loops: ``(8, L)``.

    With ``bpm``, one bar lasts 4 * 60 / bpm seconds and the audio is trimmed or zero-padded to
    ``n_bars`` whole bars; without it, one bar is the file length divided by ``n_bars``. A loop
    shorter than 8 bars is repeated until it covers 8 bars (a 3-bar loop gives A B C A B C A B);
    only the first 8 bars of a longer one are used. Bar boundaries fall at the nearest sample of
    the exact (fractional) bar length and every segment keeps the same whole number of samples.
    """
    audio = np.asarray(audio, dtype=np.float64)
    if audio.ndim != 1:
        raise ValueError(f"expected mono audio (1-D), got shape {audio.shape}")
    if n_bars < 1:
        raise ValueError(f"n_bars must be >= 1, got {n_bars}")
    if bpm is not None:
        if not bpm > 0:
            raise ValueError(f"bpm must be positive, got {bpm}")
        loop_length = int(round(n_bars * 240.0 * sr / bpm))
        audio = np.pad(audio[:loop_length], (0, max(0, loop_length - len(audio))))
    bar_length = len(audio) / n_bars
    segment_length = int(bar_length)
    if segment_length < MIN_BAR_SAMPLES:
        raise ValueError(f"a bar would last {bar_length:.1f} samples; at least {MIN_BAR_SAMPLES} are needed")
    repeats = -(-N_BARS // n_bars)
    tiled = np.tile(audio, repeats) if repeats > 1 else audio
    starts = np.round(np.arange(N_BARS) * bar_length).astype(int)
    return np.stack([tiled[start:start + segment_length] for start in starts])


def bar_mel_spectra(segments: np.ndarray, sr: int) -> np.ndarray:
    """One mel power spectrum per bar from a single FFT of the whole bar: ``(8, L)`` -> ``(8, 128)``.

    Every sample of the bar counts equally (rectangular window, no frame hop that could skip part
    of the bar). The FFT is zero-padded to the next power of two, which only interpolates the
    spectrum, so the mel filterbank - built for the audio's real sample rate - can be cached.
    """
    n_fft = 1 << int(np.ceil(np.log2(segments.shape[1])))
    spectrum = np.fft.rfft(segments, n=n_fft, axis=1)
    power = spectrum.real ** 2 + spectrum.imag ** 2
    return (_mel_filterbank(int(sr), n_fft) @ power.T).T


def pearson_upper(spectra: np.ndarray) -> np.ndarray:
    """Pearson correlation between the rows of ``(8, F)`` spectra, upper triangle ``(28,)``.

    Pearson is undefined for a constant spectrum (in practice a silent bar). Such a spectrum is
    given correlation 1 with another constant one (two silent bars are alike) and 0 with any
    spectrum that varies (silence shares no shape with sound), so the result never holds NaN.
    """
    centred = spectra - spectra.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1)
    constant = norms <= 1e-9 * np.linalg.norm(spectra, axis=1)
    unit = centred / np.where(constant, 1.0, norms)[:, None]
    matrix = np.clip(unit @ unit.T, -1.0, 1.0)
    both_constant = constant[:, None] & constant[None, :]
    matrix = np.where(constant[:, None] | constant[None, :], both_constant.astype(np.float64), matrix)
    return matrix[PAIR_ROWS, PAIR_COLS]


def c_wav(audio: np.ndarray, sr: int, bpm: float | None = None, n_bars: int = N_BARS) -> np.ndarray:
    """C_WAV of a mono audio loop of ``n_bars`` bars of 4/4: ``(28,)`` float32.

    The loop is cut into 8 bars (:func:`bar_segments`, tiling loops shorter than 8 bars), each bar
    becomes one 128-band mel power spectrum of the whole bar (:func:`bar_mel_spectra`), and the
    result is the Pearson correlation between the bar spectra (:func:`pearson_upper`). The bars
    are first scaled to a peak of 1: the correlation ignores scale, and the power spectra of any
    finite signal, however loud, stay finite.
    """
    segments = bar_segments(audio, sr, bpm=bpm, n_bars=n_bars)
    peak = np.abs(segments).max()
    if peak > 0:
        segments = segments / peak
    return pearson_upper(bar_mel_spectra(segments, sr)).astype(np.float32)
