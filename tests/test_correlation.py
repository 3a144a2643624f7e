"""C_MIDI against naive per-pair loops, and C_WAV's bar handling, tiling and degenerate cases."""
from __future__ import annotations

import itertools

import librosa
import numpy as np
import pytest
import torch

from datamodules.correlation import bar_mel_spectra, bar_segments, c_midi, c_midi_packed, c_wav, pearson_upper
from datamodules.correlation.midi import _pair_counts_numpy, _pair_counts_torch
from datamodules.pianoroll import pack_phrases
from datamodules.pianoroll.synth import render_phrases

SR = 8000
PAIRS = list(itertools.combinations(range(8), 2))


def naive_c_midi(phrase: np.ndarray, similarity: str) -> np.ndarray:
    bars = [phrase[16 * i:16 * (i + 1)].astype(bool) for i in range(8)]
    if similarity == "hamming":
        distances = np.array([np.sum(bars[i] ^ bars[j]) for i, j in PAIRS], dtype=float)
        return 1 - distances / (distances.max() + 1e-5)
    values = []
    for i, j in PAIRS:
        union = np.sum(bars[i] | bars[j])
        values.append(np.sum(bars[i] & bars[j]) / union if union else 1.0)
    return np.array(values)


def random_phrases(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    phrases = rng.random((n, 128, 57)) < rng.uniform(0.02, 0.3, size=(n, 1, 1))
    phrases[0, 16:32] = phrases[0, :16]  # two identical bars
    phrases[1, 32:48] = False  # an empty bar
    phrases[2] = False  # an empty phrase
    return phrases


@pytest.mark.parametrize("similarity", ["hamming", "iou"])
def test_c_midi_matches_naive_loop_for_numpy_and_torch(similarity):
    phrases = random_phrases(12)
    expected = np.stack([naive_c_midi(phrase, similarity) for phrase in phrases])
    from_numpy = c_midi(phrases, similarity)
    from_torch = c_midi(torch.from_numpy(phrases).float(), similarity)
    assert isinstance(from_numpy, np.ndarray) and from_numpy.shape == (12, 28)
    assert isinstance(from_torch, torch.Tensor) and from_torch.dtype == torch.float32
    np.testing.assert_allclose(from_numpy, expected, atol=1e-6)
    np.testing.assert_allclose(from_torch.numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(c_midi(phrases[3], similarity), expected[3], atol=1e-6)


@pytest.mark.parametrize("similarity", ["hamming", "iou"])
def test_c_midi_packed_matches_naive_loop_for_numpy_and_torch(similarity):
    phrases = random_phrases(12, seed=3)
    expected = np.stack([naive_c_midi(phrase, similarity) for phrase in phrases])
    packed = pack_phrases(phrases)
    from_numpy = c_midi_packed(packed, similarity)
    from_torch = c_midi_packed(torch.from_numpy(packed), similarity)
    assert isinstance(from_numpy, np.ndarray) and from_numpy.dtype == np.float32 and from_numpy.shape == (12, 28)
    assert isinstance(from_torch, torch.Tensor) and from_torch.dtype == torch.float32
    np.testing.assert_allclose(from_numpy, expected, atol=1e-6)
    np.testing.assert_allclose(from_torch.numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(c_midi_packed(packed[5], similarity), expected[5], atol=1e-6)


def test_torch_popcount_backend_counts_like_numpy():
    """The int64 bit arithmetic used off the CPU gives numpy's popcounts, including words with bit 63 set
    and more phrases than one numpy chunk."""
    rng = np.random.default_rng(4)
    n = 2100
    bars = np.packbits(rng.random((n, 8 * 912)) < rng.uniform(0, 1, size=(n, 1)), axis=1).reshape(n, 8, 114)
    bars[0] = 0xFF
    xor_numpy, bars_numpy = _pair_counts_numpy(bars, with_bar_counts=True)
    xor_torch, bars_torch = _pair_counts_torch(torch.from_numpy(bars), with_bar_counts=True)
    assert np.array_equal(xor_torch.numpy(), xor_numpy)
    assert np.array_equal(bars_torch.numpy(), bars_numpy)
    assert np.all(bars_numpy[0] == 912)
    reference = np.unpackbits(bars, axis=2).astype(bool)
    assert np.array_equal(bars_numpy, reference.sum(axis=2))
    assert np.array_equal(xor_numpy[:, 0], (reference[:, 0] ^ reference[:, 1]).sum(axis=1))
    assert np.array_equal(xor_numpy[:, -1], (reference[:, 6] ^ reference[:, 7]).sum(axis=1))


@pytest.mark.parametrize("similarity", ["hamming", "iou"])
def test_c_midi_of_an_empty_batch_is_empty(similarity):
    assert c_midi(np.zeros((0, 128, 57), dtype=bool), similarity).shape == (0, 28)
    assert c_midi(torch.zeros(0, 128, 57), similarity).shape == (0, 28)
    assert c_midi_packed(np.zeros((0, 912), dtype=np.uint8), similarity).shape == (0, 28)
    assert c_midi_packed(torch.zeros(0, 912, dtype=torch.uint8), similarity).shape == (0, 28)


def test_c_midi_of_looped_phrases_is_one_exactly_for_repeating_bar_pairs():
    rng = np.random.default_rng(1)
    one_bar = np.tile(rng.random((16, 57)) < 0.2, (8, 1))
    two_bar = np.tile(rng.random((32, 57)) < 0.2, (4, 1))
    np.testing.assert_allclose(c_midi(one_bar), np.ones(28))
    repeats = np.array([(j - i) % 2 == 0 for i, j in PAIRS])
    values = c_midi(two_bar)
    np.testing.assert_allclose(values[repeats], 1.0)
    np.testing.assert_allclose(values[~repeats], 0.0, atol=1e-6)
    # IoU keeps the absolute scale: the alternating bars still share some cells.
    assert np.all(c_midi(two_bar, "iou")[~repeats] < 1)


def test_c_midi_rejects_bad_shapes_and_similarities():
    with pytest.raises(ValueError, match="shape"):
        c_midi(np.zeros((2, 100, 57)))
    with pytest.raises(ValueError, match="similarity"):
        c_midi(np.zeros((2, 128, 57)), "cosine")
    with pytest.raises(ValueError, match="packed"):
        c_midi_packed(np.zeros((2, 912), dtype=np.int64))
    with pytest.raises(ValueError, match="packed"):
        c_midi_packed(np.zeros((2, 100), dtype=np.uint8))


def drum_and_bass_bar(pitch: int) -> np.ndarray:
    roll = np.zeros((16, 57), dtype=bool)
    roll[[0, 8], 0] = roll[[4, 12], 1] = roll[::2, 2] = True
    roll[0:6, pitch - 15] = roll[8:14, pitch + 7 - 15] = True
    return roll


@pytest.mark.parametrize("bpm", [100, None])
def test_one_bar_loop_tiled_to_eight_bars_correlates_above_099(bpm):
    audio = render_phrases(drum_and_bass_bar(40), 100, sr=SR)
    values = c_wav(audio, SR, bpm=bpm, n_bars=1)
    assert values.shape == (28,) and values.dtype == np.float32
    assert values.min() > 0.99


def test_through_varying_audio_correlates_less_than_a_loop():
    loop = render_phrases(np.tile(drum_and_bass_bar(40), (8, 1)), 120, sr=SR)
    bars = [drum_and_bass_bar(pitch) for pitch in (28, 33, 40, 45, 31, 38, 43, 35)]
    varying = render_phrases(np.concatenate(bars), 120, sr=SR)
    assert c_wav(varying, SR, bpm=120).mean() < c_wav(loop, SR, bpm=120).mean() - 0.2


def test_silence_and_a_silent_bar_give_documented_values_not_nan():
    np.testing.assert_array_equal(c_wav(np.zeros(8 * 1024), SR), np.ones(28))
    t = np.arange(8 * 1024) / SR
    audio = np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    audio[3 * 1024:4 * 1024] = 0.0
    values = c_wav(audio, SR)
    assert not np.isnan(values).any()
    with_silent = np.array([3 in pair for pair in PAIRS])
    np.testing.assert_array_equal(values[with_silent], 0.0)
    assert values[~with_silent].min() > 0.9


def test_pearson_matches_numpy_corrcoef_for_varying_spectra():
    spectra = np.random.default_rng(2).random((8, 128))
    expected = np.corrcoef(spectra)[np.triu_indices(8, k=1)]
    np.testing.assert_allclose(pearson_upper(spectra), expected, atol=1e-12)


def test_each_bar_spectrum_covers_the_whole_bar():
    # Sound only in the second half of every bar, a different tone in even and odd bars: a method
    # looking at the first half of each bar would see eight silent bars.
    bar = 2048
    t = np.arange(bar // 2) / SR
    audio = np.zeros(8 * bar)
    for index in range(8):
        audio[index * bar + bar // 2:(index + 1) * bar] = np.sin(2 * np.pi * (300 if index % 2 else 1200) * t)
    values = c_wav(audio, SR)
    alternate = np.array([(j - i) % 2 == 1 for i, j in PAIRS])
    assert values[~alternate].min() > 0.99
    assert values[alternate].max() < 0.2


def test_mel_filterbank_follows_the_real_sample_rate():
    for sr in (8000, 22050):
        t = np.arange(8 * 4096) / sr
        spectrum = bar_mel_spectra(bar_segments(np.sin(2 * np.pi * 1000 * t), sr), sr)[0]
        edges = librosa.mel_frequencies(n_mels=spectrum.size + 2, fmax=sr / 2)
        strongest = int(np.argmax(spectrum))
        # The band with most energy is the band around 1 kHz at this sample rate.
        assert edges[strongest] < 1000 < edges[strongest + 2]


def test_bar_segments_trim_pad_and_tile():
    sr = 1000
    bar_length = 4 * 60 / 120 * sr  # 2000 samples at 120 BPM
    ramp = np.arange(3 * 2000 + 500, dtype=float)  # 3 bars plus a tail to trim
    segments = bar_segments(ramp, sr, bpm=120, n_bars=3)
    assert segments.shape == (8, int(bar_length))
    for index in range(8):
        np.testing.assert_array_equal(segments[index], segments[index % 3])
    np.testing.assert_array_equal(segments[1], ramp[2000:4000])
    padded = bar_segments(np.ones(2 * 2000 - 300), sr, bpm=120, n_bars=2)
    assert padded[1, -300:].sum() == 0 and padded[1, :-300].min() == 1
    with pytest.raises(ValueError, match="at least"):
        c_wav(np.ones(8 * 100), sr)
