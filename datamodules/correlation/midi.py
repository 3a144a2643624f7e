"""C_MIDI: bar-to-bar similarity of pianoroll phrases, straight from their bit-packed bytes."""
from __future__ import annotations

import numpy as np
import torch

from datamodules.correlation.bars import N_BARS, N_PAIRS, PAIR_COLS, PAIR_ROWS, STEPS_PER_BAR

NORMALISATION_EPS = 1e-5
_PAIR_ROWS, _PAIR_COLS = torch.as_tensor(PAIR_ROWS), torch.as_tensor(PAIR_COLS)
WORD_BYTES = 8
NUMPY_CHUNK = 2048  # phrases per pass of the numpy popcount: keeps the working set in the L2 cache

# Masks of the SWAR popcount on int64 words; each has bit 63 clear, so no step can overflow.
_M1, _M2, _M4 = 0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F


def _padded_bar_words(bars: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """``(N, 8, bytes)`` uint8 bars, zero-padded to whole 64-bit words: ``(N, 8, words)`` (int64 in torch)."""
    padding = -bars.shape[-1] % WORD_BYTES
    if isinstance(bars, np.ndarray):
        padded = np.zeros((*bars.shape[:-1], bars.shape[-1] + padding), dtype=np.uint8)
        padded[..., :bars.shape[-1]] = bars
        return padded.view(np.uint64)
    return torch.nn.functional.pad(bars, (0, padding)).view(torch.int64)


def _pair_counts_numpy(bars: np.ndarray, with_bar_counts: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """XOR popcounts of the 28 bar pairs ``(N, 28)`` (and of the 8 bars ``(N, 8)``) with ``np.bitwise_count``.

    Words are laid out bar-major and phrase-minor, so every XOR, popcount and sum below runs over
    long contiguous rows; chunks keep those rows in cache.
    """
    n = len(bars)
    xor_counts = np.empty((n, N_PAIRS), dtype=np.int64)
    bar_counts = np.empty((n, N_BARS), dtype=np.int64) if with_bar_counts else None
    for start in range(0, n, NUMPY_CHUNK):
        words = np.ascontiguousarray(_padded_bar_words(bars[start:start + NUMPY_CHUNK]).transpose(1, 2, 0))
        counts = np.empty((N_PAIRS, words.shape[-1]), dtype=np.uint16)
        pair = 0
        for i in range(N_BARS - 1):
            later = N_BARS - 1 - i
            differing = np.bitwise_count(words[i] ^ words[i + 1:])
            np.add.reduce(differing, axis=1, dtype=np.uint16, out=counts[pair:pair + later])
            pair += later
        xor_counts[start:start + NUMPY_CHUNK] = counts.T
        if with_bar_counts:
            bar_counts[start:start + NUMPY_CHUNK] = np.bitwise_count(words).sum(axis=1, dtype=np.int64).T
    return xor_counts, bar_counts


def _popcount_int64(words: torch.Tensor) -> torch.Tensor:
    """Set bits of each int64 word, by the SWAR bit-slicing sums (torch has no popcount)."""
    words = (words & _M1) + ((words >> 1) & _M1)
    words = (words & _M2) + ((words >> 2) & _M2)
    words = (words + (words >> 4)) & _M4
    words = words + (words >> 8)
    words = words + (words >> 16)
    words = words + (words >> 32)
    return words & 0x7F


def _pair_counts_torch(bars: torch.Tensor, with_bar_counts: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same counts with int64 bit arithmetic on the tensor's own device (for accelerators)."""
    words = _padded_bar_words(bars)
    rows, cols = _PAIR_ROWS.to(bars.device), _PAIR_COLS.to(bars.device)
    xor_counts = _popcount_int64(words[:, rows] ^ words[:, cols]).sum(dim=-1)
    bar_counts = _popcount_int64(words).sum(dim=-1) if with_bar_counts else None
    return xor_counts, bar_counts


def _similarity_from_counts(xor_counts: torch.Tensor, bar_counts: torch.Tensor | None, similarity: str) -> torch.Tensor:
    """C_MIDI values ``(N, 28)`` float32 from the pair XOR counts (and bar counts, for ``iou``).

    ``|a AND b| = (|a| + |b| - |a XOR b|) / 2`` and ``|a OR b| = |a| + |b| - |a AND b|``.
    """
    if similarity == "hamming":
        distance = xor_counts.to(torch.float32)
        return 1 - distance / (distance.amax(dim=1, keepdim=True) + NORMALISATION_EPS)
    rows, cols = _PAIR_ROWS.to(bar_counts.device), _PAIR_COLS.to(bar_counts.device)
    total = bar_counts[:, rows] + bar_counts[:, cols]
    shared = (total - xor_counts) // 2
    union = total - shared
    values = shared.to(torch.float32) / union.clamp(min=1).to(torch.float32)
    return torch.where(union > 0, values, torch.ones_like(values))


def _check_similarity(similarity: str) -> None:
    if similarity not in ("hamming", "iou"):
        raise ValueError(f"similarity must be 'hamming' or 'iou', got {similarity!r}")


def c_midi_packed(packed, similarity: str = "hamming"):
    """C_MIDI of bit-packed phrases: uint8 ``(N, 16 * P)`` -> ``(N, 28)``, ``(16 * P,)`` -> ``(28,)``.

    The layout is that of :func:`datamodules.pianoroll.pack_phrases` (the cells of each phrase
    time-major, 8 to a byte), so each bar is a run of ``2 * P`` whole bytes (114 for P = 57) and
    the bar pairs are compared by popcounts of XORed 64-bit words, never unpacking a cell. Numpy
    arrays and CPU tensors use ``np.bitwise_count`` (hardware popcount); tensors on other devices
    use int64 bit arithmetic there. Returns the input's kind, float32, on its device; see
    :func:`c_midi` for the similarities.
    """
    _check_similarity(similarity)
    is_numpy = isinstance(packed, np.ndarray)
    if not is_numpy and not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a numpy array or a torch tensor, got {type(packed).__name__}")
    single = packed.ndim == 1
    if single:
        packed = packed[None]
    uint8 = np.uint8 if is_numpy else torch.uint8
    if packed.dtype != uint8 or packed.ndim != 2 or packed.shape[1] == 0 or packed.shape[1] % (2 * N_BARS):
        raise ValueError(
            f"expected packed phrases uint8 of shape (N, 16 * P) (912 bytes for P = 57), "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    bars = packed.reshape(len(packed), N_BARS, packed.shape[1] // N_BARS)
    on_cpu = is_numpy or bars.device.type == "cpu"
    if on_cpu:
        xor_counts, bar_counts = _pair_counts_numpy(bars if is_numpy else bars.numpy(), similarity == "iou")
        xor_counts = torch.from_numpy(xor_counts)
        bar_counts = None if bar_counts is None else torch.from_numpy(bar_counts)
    else:
        xor_counts, bar_counts = _pair_counts_torch(bars, similarity == "iou")
    values = _similarity_from_counts(xor_counts, bar_counts, similarity)
    if is_numpy:
        values = values.numpy()
    return values[0] if single else values


def _pack_cells(phrases):
    """``(N, 128, P)`` numeric phrases -> uint8 ``(N, 16 * P)`` packed as by ``pack_phrases``, same kind and device."""
    n_phrases, steps, columns = phrases.shape
    cells = phrases.reshape(n_phrases, steps * columns) != 0
    if isinstance(cells, np.ndarray):
        return np.packbits(cells, axis=1)
    if cells.device.type == "cpu":
        return torch.from_numpy(np.packbits(cells.numpy(), axis=1))
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=cells.device)
    return (cells.reshape(n_phrases, -1, 8).to(torch.uint8) << shifts).sum(dim=-1).to(torch.uint8)


def c_midi(phrases, similarity: str = "hamming"):
    """Bar-to-bar similarity of pianoroll phrases: ``(N, 128, P)`` -> ``(N, 28)``, ``(128, P)`` -> ``(28,)``.

    ``similarity="hamming"`` (the paper's C_MIDI): d_ij = number of cells that differ between bars i
    and j, divided by (max of the phrase's 28 distances + 1e-5); the value is 1 - d. The
    normalisation is per phrase, so it is scale-free: a phrase whose bars differ by one cell looks
    as uncorrelated as one whose bars share nothing.

    ``similarity="iou"``: |bar_i AND bar_j| / |bar_i OR bar_j| over active cells, which keeps the
    absolute scale. Two empty bars are identical, so 0/0 is defined as 1.

    Accepts numpy arrays or torch tensors (bool or numeric, nonzero = active) and returns the same
    kind, float32, on the input's device. The phrases are bit-packed and handed to
    :func:`c_midi_packed`; phrases already stored packed should go there directly.
    """
    _check_similarity(similarity)
    if not isinstance(phrases, (np.ndarray, torch.Tensor)):
        raise TypeError(f"phrases must be a numpy array or a torch tensor, got {type(phrases).__name__}")
    single = phrases.ndim == 2
    if single:
        phrases = phrases[None]
    if phrases.ndim != 3 or phrases.shape[1] != N_BARS * STEPS_PER_BAR or phrases.shape[2] == 0:
        raise ValueError(f"expected phrases of shape (N, {N_BARS * STEPS_PER_BAR}, P), got {tuple(phrases.shape)}")
    values = c_midi_packed(_pack_cells(phrases), similarity)
    return values[0] if single else values
