"""Bar-to-bar correlation vectors: the 28 numbers the loop detector reads.

Both functions compare the 8 bars of an 8-bar phrase pairwise and return the upper triangle
(k=1, row-major) of the 8 x 8 matrix: pairs (0,1), (0,2), ..., (0,7), (1,2), ..., (6,7).

- :func:`c_midi` works on pianoroll phrases (128 steps x 57 columns, 16 steps per bar).
- :func:`c_wav` works on audio loops, comparing one mel power spectrum per bar.
"""
from __future__ import annotations

import functools

import librosa
import numpy as np
import torch

N_BARS = 8
STEPS_PER_BAR = 16
N_PAIRS = N_BARS * (N_BARS - 1) // 2
NORMALISATION_EPS = 1e-5
N_MELS = 128
MIN_BAR_SAMPLES = 256

_ROWS, _COLS = np.triu_indices(N_BARS, k=1)


def _pair_counts_numpy(phrases: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Active cells shared by each bar pair, and the pair's summed cell counts, from packed bits."""
    cells = phrases if phrases.dtype == bool else phrases != 0
    packed = np.packbits(cells.reshape(len(cells), N_BARS, -1), axis=-1)
    counts = np.bitwise_count(packed).sum(axis=-1, dtype=np.int64)
    shared = np.bitwise_count(packed[:, _ROWS] & packed[:, _COLS]).sum(axis=-1, dtype=np.int64)
    return shared, counts[:, _ROWS] + counts[:, _COLS]


def _pair_counts_torch(phrases: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same counts from per-phrase bar Gram matrices, on the tensor's device."""
    # Cell counts are integers below 2**24, so float32 holds them exactly.
    bars = phrases.reshape(len(phrases), N_BARS, -1).to(torch.float32)
    gram = bars @ bars.transpose(1, 2)
    counts = torch.diagonal(gram, dim1=1, dim2=2)
    rows = torch.as_tensor(_ROWS, device=phrases.device)
    cols = torch.as_tensor(_COLS, device=phrases.device)
    return gram[:, rows, cols], counts[:, rows] + counts[:, cols]


def c_midi(phrases, similarity: str = "hamming"):
    """Bar-to-bar similarity of pianoroll phrases: ``(N, 128, P)`` -> ``(N, 28)``, ``(128, P)`` -> ``(28,)``.

    ``similarity="hamming"`` (the paper's C_MIDI): d_ij = number of cells that differ between bars i
    and j, divided by (max of the phrase's 28 distances + 1e-5); the value is 1 - d. The
    normalisation is per phrase, so it is scale-free: a phrase whose bars differ by one cell looks
    as uncorrelated as one whose bars share nothing.

    ``similarity="iou"``: |bar_i AND bar_j| / |bar_i OR bar_j| over active cells, which keeps the
    absolute scale. Two empty bars are identical, so 0/0 is defined as 1.

    Accepts numpy arrays or torch tensors (bool or numeric, 0/1 valued) and returns the same kind,
    float32, on the input's device. All pairs of all phrases are computed at once from the shared
    cell counts: ``|a XOR b| = |a| + |b| - |a AND b|`` twice over, ``|a OR b| = |a| + |b| - |a AND b|``
    (numpy: popcounts of bit-packed bars; torch: bar Gram matrices, which suit GPUs).
    """
    if similarity not in ("hamming", "iou"):
        raise ValueError(f"similarity must be 'hamming' or 'iou', got {similarity!r}")
    is_numpy = isinstance(phrases, np.ndarray)
    if not is_numpy and not isinstance(phrases, torch.Tensor):
        raise TypeError(f"phrases must be a numpy array or a torch tensor, got {type(phrases).__name__}")
    single = phrases.ndim == 2
    if single:
        phrases = phrases[None]
    if phrases.ndim != 3 or phrases.shape[1] != N_BARS * STEPS_PER_BAR:
        raise ValueError(f"expected phrases of shape (N, {N_BARS * STEPS_PER_BAR}, P), got {tuple(phrases.shape)}")
    if is_numpy:
        shared, total = _pair_counts_numpy(phrases)
        if similarity == "hamming":
            distance = total - 2 * shared
            values = 1 - distance / (distance.max(axis=1, keepdims=True) + NORMALISATION_EPS)
        else:
            union = total - shared
            values = np.divide(shared, union, out=np.ones(union.shape), where=union > 0)
        values = values.astype(np.float32)
    else:
        shared, total = _pair_counts_torch(phrases)
        if similarity == "hamming":
            distance = total - 2 * shared
            values = 1 - distance / (distance.amax(dim=1, keepdim=True) + NORMALISATION_EPS)
        else:
            union = total - shared
            values = torch.where(union > 0, shared / union.clamp(min=1), torch.ones_like(union))
    return values[0] if single else values


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
    return matrix[_ROWS, _COLS]


def c_wav(audio: np.ndarray, sr: int, bpm: float | None = None, n_bars: int = N_BARS) -> np.ndarray:
    """C_WAV of a mono audio loop of ``n_bars`` bars of 4/4: ``(28,)`` float32.

    The loop is cut into 8 bars (:func:`bar_segments`, tiling loops shorter than 8 bars), each bar
    becomes one 128-band mel power spectrum of the whole bar (:func:`bar_mel_spectra`), and the
    result is the Pearson correlation between the bar spectra (:func:`pearson_upper`).
    """
    segments = bar_segments(audio, sr, bpm=bpm, n_bars=n_bars)
    return pearson_upper(bar_mel_spectra(segments, sr)).astype(np.float32)
