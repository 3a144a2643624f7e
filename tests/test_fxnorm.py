"""Effect normalisation: each normaliser moves its feature to its target on real-format audio."""
from __future__ import annotations

import math

import numpy as np
import pyloudnorm
import pytest
import scipy.signal

from datamodules.demo.multitrack import process_stem, synthesize_song
from datamodules.fxnorm import (
    STAGES,
    STEMS,
    FxNormalizer,
    augment_reverb,
    compress,
    exhaustive_compressor_search,
    inference_reverb,
    mean_similarity,
    mean_spectrum,
    normalize_drc,
    normalize_eq,
    normalize_loudness,
    normalize_panning,
    onset_peak_stats,
    search_compressor,
    smooth_spectrum,
    zero_phase_fir,
)
from datamodules.fxnorm.audio import fft_filter
from datamodules.fxnorm import eq
from datamodules.fxnorm.drc import peak_normalize, smoothing_coefficient
from datamodules.fxnorm.loudness import channel_loudness, integrated_loudness

SR = 44100


def harmonic_tone(seconds: float, f0: float = 220.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    tone = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 12)) + 0.05 * rng.standard_normal(t.size)
    return 0.3 * tone / np.max(np.abs(tone))


def hits(seconds: float, amplitudes: np.ndarray, seed: int = 0) -> np.ndarray:
    """Decaying 200 Hz bursts every 0.25 s with the given amplitudes (cycled), in stereo."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    x = np.zeros(n)
    burst = np.exp(-np.arange(8000) / 1500) * np.sin(2 * np.pi * 200 * np.arange(8000) / SR)
    for i, start in enumerate(range(0, n - 8000, SR // 4)):
        x[start : start + 8000] += amplitudes[i % len(amplitudes)] * burst
    return np.stack([x, 0.8 * x]) + 1e-4 * rng.standard_normal((2, n))


@pytest.fixture(scope="module")
def fitted():
    """A normalizer fitted on three short synthetic wet songs, and one more song to normalise."""
    songs = []
    for i in range(4):
        rng = np.random.default_rng(i)
        dry = synthesize_song(rng, 2.5)
        songs.append({k: process_stem(v, k, SR, rng) for k, v in dry.items()})
    return FxNormalizer.fit(songs[:3], SR, progress=False), songs[3]


def test_loudness_reaches_target_within_0_1_lu():
    meter = pyloudnorm.Meter(SR)
    for level, target in ((0.1, -30.73), (0.5, -34.18), (0.05, -20.0)):
        audio = level * np.stack([harmonic_tone(3.0), harmonic_tone(3.0, seed=1)])
        out = normalize_loudness(audio, SR, target)
        assert abs(meter.integrated_loudness(out.T) - target) < 0.1


def test_loudness_scales_down_instead_of_clipping():
    spiky = hits(3.0, np.array([1.0]))
    out = normalize_loudness(spiky, SR, -5.0)
    assert np.max(np.abs(out)) == pytest.approx(1.0)


def test_integrated_loudness_equals_pyloudnorm():
    rng = np.random.default_rng(0)
    for sr, n in ((SR, int(0.41 * SR)), (SR, 3 * SR + 17), (48000, 2 * 48000), (22050, 17641)):
        audio = rng.standard_normal((2, n)) * np.linspace(1e-4, 0.5, n) ** 2  # quiet start: both gates act
        meter = pyloudnorm.Meter(sr)
        assert integrated_loudness(audio, sr) == pytest.approx(meter.integrated_loudness(audio.T), abs=1e-9)
        expected = [meter.integrated_loudness(channel) for channel in audio]
        np.testing.assert_allclose(channel_loudness(audio, sr), expected, atol=1e-9)
        assert integrated_loudness(audio.astype(np.float32), sr) == pytest.approx(meter.integrated_loudness(audio.T), abs=1e-6)
    assert integrated_loudness(np.full((2, SR), 1e-6), SR) == -np.inf  # every block below -70 LUFS


def test_zero_phase_fir_equals_filtfilt():
    taps = scipy.signal.firwin2(1001, [0, 0.2, 0.5, 1], [1, 3, 0.5, 0.1])
    for n in (500, 1001, 3100, 50000):
        x = np.random.default_rng(n).standard_normal((2, n))
        reference = scipy.signal.filtfilt(taps, [1.0], x, axis=-1, padlen=min(3 * len(taps), n - 1))
        assert np.max(np.abs(zero_phase_fir(x, taps) - reference)) < 1e-12 * np.max(np.abs(reference))
        single = zero_phase_fir(x.astype(np.float32), taps)
        assert single.dtype == np.float32 and np.max(np.abs(single - reference)) < 1e-5 * np.max(np.abs(reference))
    other = scipy.signal.firwin2(1001, [0, 0.5, 1], [0.2, 1, 2])
    x = np.random.default_rng(0).standard_normal((2, 20000))
    per_channel = zero_phase_fir(x, np.stack([taps, other]))
    np.testing.assert_allclose(per_channel[1], scipy.signal.filtfilt(other, [1.0], x[1]), atol=1e-10)


@pytest.mark.parametrize("odd", [False, True])
def test_fft_filter_equals_direct_convolution(odd):
    """Blocks of the overlap-save filter join seamlessly, with any delay and either extension."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 70000))
    kernels = rng.standard_normal((2, 301))
    for delay in (0, 150, 300):
        padded = np.pad(x, ((0, 0), (300, 300)))
        if odd:
            padded = np.concatenate([2 * x[:, :1] - x[:, 300:0:-1], x, 2 * x[:, -1:] - x[:, -2:-302:-1]], axis=1)
        expected = np.stack([np.convolve(p, k)[delay + 300 : delay + 300 + x.shape[1]] for p, k in zip(padded, kernels)])
        np.testing.assert_allclose(fft_filter(x, kernels, delay, odd), expected, atol=1e-9)


def test_mean_spectrum_equals_direct_computation():
    rng = np.random.default_rng(0)
    audio = rng.standard_normal((2, 200000)) * np.array([[0.1], [0.02]])
    audio[1] = scipy.signal.lfilter([1.0], [1.0, -0.9], audio[1])
    window = np.sqrt(scipy.signal.get_window("hann", 4096))
    expected = []
    for channel in audio:
        gain = 10 ** ((-30 - pyloudnorm.Meter(SR).integrated_loudness(channel)) / 20)
        frames = np.lib.stride_tricks.sliding_window_view(gain * channel, 4096)[::1024]
        expected.append(np.abs(np.fft.rfft(frames * window, axis=1)).mean(axis=0))
    np.testing.assert_allclose(mean_spectrum(audio, SR, n_fft=4096, hop=1024), expected, rtol=1e-9)


def _log_distance(spectrum: np.ndarray, reference: np.ndarray, sr: int) -> float:
    band = (np.linspace(0, sr / 2, reference.size) > 50) & (np.linspace(0, sr / 2, reference.size) < 16000)
    return float(np.mean(np.abs(np.log10(spectrum[band] / reference[band]))))


def test_eq_moves_mean_spectrum_to_reference():
    rng = np.random.default_rng(0)
    dark = scipy.signal.sosfilt(scipy.signal.butter(2, 1000, fs=SR, output="sos"), rng.standard_normal((2, 3 * SR)))
    reference = smooth_spectrum(mean_spectrum(dark, SR).mean(axis=0), 401)
    white = 0.1 * rng.standard_normal((2, 3 * SR))
    before = _log_distance(smooth_spectrum(mean_spectrum(white, SR), 401)[0], reference, SR)
    after = _log_distance(smooth_spectrum(mean_spectrum(normalize_eq(white, SR, reference), SR), 401)[0], reference, SR)
    assert after < 0.25 * before  # a 1001-tap FIR cannot follow the reference below ~100 Hz exactly


def test_drc_brings_mean_onset_peak_inside_reference():
    audio = hits(4.0, np.random.default_rng(0).uniform(0.85, 1.0, 16))
    ref_mean, ref_std = -14.24, 1.37
    assert onset_peak_stats(audio, SR)[0] > ref_mean + ref_std
    out = normalize_drc(audio, SR, ref_mean, ref_std, 4, 7.5, 400.0)
    measuring_gain = peak_normalize(audio).max() / audio.max()  # the output keeps the input's level
    mean, _ = onset_peak_stats(out * measuring_gain, SR, normalize=False)
    assert ref_mean - ref_std < mean < ref_mean + ref_std
    assert np.all(np.abs(out) <= np.abs(audio))  # gain reduction only, no make-up gain


def test_drc_does_not_depend_on_input_level():
    audio = hits(3.0, np.random.default_rng(1).uniform(0.85, 1.0, 12))
    out = normalize_drc(audio, SR, -14.24, 1.37, 4, 7.5, 400.0)
    assert not np.allclose(out, audio)
    np.testing.assert_allclose(normalize_drc(0.1 * audio, SR, -14.24, 1.37, 4, 7.5, 400.0), 0.1 * out, rtol=1e-9, atol=1e-12)


def test_drc_leaves_stem_below_target_unchanged():
    audio = hits(3.0, np.array([1.0, 0.1, 0.3, 0.05]))
    assert np.array_equal(normalize_drc(audio, SR, -10.0, 0.5, 4, 7.5, 400.0), audio)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_drc_search_equals_exhaustive_grid(seed):
    rng = np.random.default_rng(seed)
    audio = peak_normalize(hits(2.0, rng.uniform(0.3, 1.0, 8), seed=seed))
    for target in (-11.0, -13.5, -16.0, -60.0):
        fast, runs = search_compressor(audio, SR, target, 4, 10.0, 180.0)
        reference, reference_runs = exhaustive_compressor_search(audio, SR, target, 4, 10.0, 180.0)
        assert fast == reference
        assert runs <= 12 <= reference_runs or reference_runs <= 12


def test_compressor_matches_plain_loop():
    rng = np.random.default_rng(0)
    audio = rng.uniform(-1, 1, (2, 3000)) * np.linspace(0.01, 1, 3000)
    threshold, ratio, attack, release = -12.0, 5.0, smoothing_coefficient(SR, 1.0), smoothing_coefficient(SR, 20.0)
    state, expected = 0.0, np.empty(3000)
    for i, level in enumerate(np.abs(audio).max(axis=0)):
        level_db = 20 * math.log10(level)
        target = (1 / ratio - 1) * (level_db - threshold) if level_db > threshold else 0.0
        coefficient = attack if target < state else release
        state = coefficient * state + (1 - coefficient) * target
        expected[i] = 10 ** (state / 20)
    np.testing.assert_allclose(compress(audio, SR, threshold, ratio, 1.0, 20.0), audio * expected, rtol=1e-12)


def test_panning_moves_similarity_toward_reference_and_keeps_side():
    source = harmonic_tone(3.0)
    left_panned = np.stack([source, 0.2 * source])
    reference = np.full(1025, 0.8)
    out = normalize_panning(left_panned, SR, reference)
    band = slice(10, 700)
    before = np.mean(np.abs(mean_similarity(left_panned)[band] - 0.8))
    after = np.mean(np.abs(mean_similarity(out)[band] - 0.8))
    assert after < 0.25 * before
    rms = np.sqrt(np.mean(out**2, axis=1))
    assert rms[0] > rms[1] > 0.2 * rms[0] * 1.5  # still on the left, but nearer the reference (wider psi)


def test_panning_gives_every_active_bin_the_reference_similarity():
    """The exact inverse of eq. 4 sets each re-panned bin to the reference similarity; what the
    overlapping frames of the inverse STFT blur is the only thing a second pass changes (~1 %)."""
    rng = np.random.default_rng(0)
    source = harmonic_tone(3.0)
    audio = np.stack([source, 0.3 * source]) + 0.01 * rng.standard_normal((2, source.size))
    reference = np.linspace(0.9, 0.5, 1025)
    once = normalize_panning(audio, SR, reference, cutoff_hz=SR / 2)
    band = slice(10, 900)
    before = np.mean(np.abs(mean_similarity(audio)[band] - reference[band]))
    after = np.mean(np.abs(mean_similarity(once)[band] - reference[band]))
    assert after < 0.4 * before and after < 0.04
    twice = normalize_panning(once, SR, reference, cutoff_hz=SR / 2)
    assert np.sqrt(np.mean((twice - once) ** 2) / np.mean(once**2)) < 0.02
    assert np.all(np.abs(once.sum(axis=0)) > 0) and np.mean(once[0] ** 2) > np.mean(once[1] ** 2)  # still on the left


def test_panning_leaves_bins_above_cutoff_untouched():
    """Re-centring a hard-left tone changes it a lot below the cutoff and barely above it
    (what remains is sqrt-Hann leakage into lower bins)."""
    t = np.arange(2 * SR) / SR

    def change(frequency: float) -> float:
        tone = np.sin(2 * np.pi * frequency * t)
        audio = np.stack([tone, 0.1 * tone])
        out = normalize_panning(audio, SR, np.full(1025, 1.0), cutoff_hz=16000.0)
        return float(np.sqrt(np.mean((out - audio) ** 2) / np.mean(audio**2)))

    assert change(18000.0) < 0.05
    assert change(1000.0) > 0.3


def test_reverb_augmentation_equals_direct_formula():
    """x + reverb(EQ(x)), the EQ folded into the impulse response, equals filtering the stem itself."""
    from datamodules.fxnorm.reverb import LOW_SHELF_HZ, HIGH_SHELF_HZ, room_impulse_response, shelf_filter

    audio = np.stack([harmonic_tone(1.5), harmonic_tone(1.5, f0=330.0)])
    out = augment_reverb(audio, SR, np.random.default_rng(3), rt60_range=(0.5, 0.8))
    rng = np.random.default_rng(3)
    low, high = rng.uniform(*LOW_SHELF_HZ), rng.uniform(*HIGH_SHELF_HZ)
    response = room_impulse_response(SR, rng.uniform(0.5, 0.8), rng)
    send = shelf_filter(shelf_filter(audio, SR, "low_shelf", low, -30.0), SR, "high_shelf", high, -30.0)
    expected = audio + np.stack([np.convolve(s, r)[: audio.shape[1]] for s, r in zip(send, response)])
    np.testing.assert_allclose(out, expected, atol=1e-9)


def test_silent_stems_unchanged_by_every_effect():
    quiet = 10 ** (-55 / 20) * np.random.default_rng(0).uniform(-1, 1, (2, SR))
    rng = np.random.default_rng(0)
    outputs = [
        normalize_loudness(quiet, SR, -20.0),
        normalize_eq(quiet, SR, np.ones(32769)),
        normalize_drc(quiet, SR, -20.0, 0.5, 4, 7.5, 400.0),
        normalize_panning(quiet, SR, np.full(1025, 0.5)),
        augment_reverb(quiet, SR, rng),
        inference_reverb(quiet, SR, rng),
    ]
    for out in outputs:
        assert np.array_equal(out, quiet)


def test_mono_stem_is_repanned_like_a_training_stem(fitted):
    """A mono stem reaches the fitted reference similarity instead of staying at psi = 1."""
    normalizer, _ = fitted
    mono = harmonic_tone(2.0)[None, :]
    out = normalizer.normalize_stem("other", mono, SR, stages=STAGES[1:])  # no reverb: still mono at panning
    assert out.shape == (2, mono.shape[1])
    band = slice(10, 500)
    reference = normalizer.panning_reference["other"][band]
    assert np.mean(np.abs(mean_similarity(out)[band] - reference)) < 0.3 * np.mean(1.0 - reference)


@pytest.mark.parametrize("kind", ["tonal", "broadband"])
def test_panning_of_mono_keeps_the_mono_sum_and_reaches_the_reference(kind):
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(3 * SR)
    mono = (harmonic_tone(3.0) + 0.02 * noise if kind == "tonal" else 0.1 * noise).astype(np.float32)
    out = normalize_panning(np.stack([mono, mono]), SR, np.full(1025, 0.6), cutoff_hz=SR / 2)
    np.testing.assert_allclose(out.sum(axis=0), 2 * mono, atol=1e-5)  # complementary combs
    band = slice(10, 900)
    assert np.mean(np.abs(mean_similarity(out)[band] - 0.6)) < 0.1  # from 0.4 at psi = 1
    if kind == "broadband":  # centred; a tonal stem leans to the side of its strongest band
        energy = np.mean(out**2, axis=1)
        assert abs(energy[0] - energy[1]) < 0.05 * energy.mean()


def test_panning_repans_a_quiet_section_like_the_loud_one():
    """The authors' frame rule leaves only near-silence alone: a section 12 dB below the loudest
    one is re-panned too (a rule relative to the loudest frame skipped it)."""
    source = harmonic_tone(4.0)
    source[: 2 * SR] *= 10 ** (-12 / 20)
    audio = np.stack([source, 0.2 * source])
    out = normalize_panning(audio, SR, np.full(1025, 0.8))
    band = slice(10, 700)
    for section in (slice(0, 2 * SR - 4096), slice(2 * SR + 4096, 4 * SR)):
        assert abs(np.mean(mean_similarity(out[:, section])[band]) - 0.8) < 0.05
    assert np.mean(mean_similarity(audio[:, : 2 * SR])[band]) < 0.5


def test_panning_does_not_depend_on_the_stem_level():
    rng = np.random.default_rng(1)
    audio = np.stack([harmonic_tone(2.0), 0.3 * harmonic_tone(2.0, seed=1)]) + 1e-3 * rng.standard_normal((2, 2 * SR))
    audio[:, SR // 2 : SR] *= 1e-4  # near-silence in the middle
    reference = np.full(1025, 0.6)
    loud = normalize_panning(audio, SR, reference)
    quiet = normalize_panning(0.05 * audio, SR, reference)
    np.testing.assert_allclose(0.05 * loud, quiet, atol=1e-12)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_rejected(bad, fitted):
    normalizer, _ = fitted
    audio = np.stack([harmonic_tone(1.0)] * 2)
    audio[1, 100] = bad
    calls = [
        lambda: normalize_loudness(audio, SR, -20.0),
        lambda: normalize_eq(audio, SR, np.ones(32769)),
        lambda: normalize_drc(audio, SR, -14.0, 1.0, 4, 7.5, 400.0),
        lambda: normalize_panning(audio, SR, np.ones(1025)),
        lambda: augment_reverb(audio, SR, np.random.default_rng(0)),
        lambda: normalizer.normalize_song({"vocals": audio}, SR),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="NaN or infinite"):
            call()


def test_half_second_song_is_normalised(fitted):
    normalizer, song = fitted
    short = {k: v[:, : SR // 2] for k, v in song.items()}
    out = normalizer.normalize_song(short, SR, seed=0)
    meter = pyloudnorm.Meter(SR)
    for kind, audio in out.items():
        assert audio.shape == (2, SR // 2) and np.all(np.isfinite(audio))
        on_target = abs(meter.integrated_loudness(audio.T.astype(np.float64)) - normalizer.loudness_target[kind]) < 0.1
        assert on_target or np.max(np.abs(audio)) == pytest.approx(1.0)  # else scaled down to avoid clipping


def test_song_loudness_hits_fitted_targets(fitted):
    normalizer, song = fitted
    out = normalizer.normalize_song(song, SR, seed=0)
    meter = pyloudnorm.Meter(SR)
    for kind in STEMS:
        assert abs(meter.integrated_loudness(out[kind].T.astype(np.float64)) - normalizer.loudness_target[kind]) < 0.1


def test_features_round_trip(tmp_path, fitted):
    normalizer, song = fitted
    normalizer.save(tmp_path / "features.npz")
    loaded = FxNormalizer.load(tmp_path / "features.npz")
    for kind in STEMS:
        np.testing.assert_array_equal(loaded.eq_reference[kind], normalizer.eq_reference[kind])
        np.testing.assert_array_equal(loaded.panning_reference[kind], normalizer.panning_reference[kind])
        assert loaded.drc_reference[kind] == normalizer.drc_reference[kind]
        assert loaded.loudness_target[kind] == normalizer.loudness_target[kind]
    a = normalizer.normalize_song(song, SR, seed=1)
    b = loaded.normalize_song(song, SR, seed=1)
    for kind in STEMS:
        np.testing.assert_allclose(a[kind], b[kind], atol=1e-6)


def test_musdb18_reference_skips_eq_and_panning():
    normalizer = FxNormalizer.musdb18_reference()
    assert normalizer.loudness_target["drums"] == -34.18 and normalizer.drc_reference["vocals"] == (-14.24, 1.37)
    assert all(normalizer.eq_reference[k] is None and normalizer.panning_reference[k] is None for k in STEMS)
    audio = np.stack([harmonic_tone(2.0), 0.5 * harmonic_tone(2.0)])
    out = normalizer.normalize_stem("other", audio, SR, stages=("eq", "panning"))
    np.testing.assert_array_equal(out, audio)


def test_inference_reverb_runs(fitted):
    normalizer, song = fitted
    dry = {"vocals": song["vocals"]}
    with_reverb = normalizer.normalize_song(dry, SR, inference=True)["vocals"]
    without = normalizer.normalize_song(dry, SR, inference=True, reverb=False)["vocals"]
    assert np.max(np.abs(with_reverb - without)) > 1e-3


def _relative_change(after: np.ndarray, before: np.ndarray) -> float:
    return float(np.sqrt(np.mean((after - before) ** 2) / np.mean(before**2)))


def test_each_normaliser_is_nearly_idempotent_on_dense_audio():
    """On audio with dense spectra (partly panned, differently coloured noises) a second pass of EQ
    or panning changes the stem by 1-2 % (EQ: what the 1001-tap filter cannot realise; panning:
    the overlap of the inverse STFT's frames) and a second loudness pass by nothing. DRC leaves a
    stem inside its band alone (``test_drc_leaves_stem_below_target_unchanged``)."""
    rng = np.random.default_rng(0)
    n = 4 * SR
    low = scipy.signal.lfilter([1.0], [1.0, -0.95], rng.standard_normal(n))
    high, centre = 0.3 * rng.standard_normal(n), 0.5 * rng.standard_normal(n)
    audio = 0.05 * np.stack([0.9 * low + 0.3 * high + centre, 0.3 * low + 0.9 * high + centre])
    dark = scipy.signal.sosfilt(scipy.signal.butter(2, 1000, fs=SR, output="sos"), rng.standard_normal((2, n)))
    eq_reference = smooth_spectrum(mean_spectrum(dark, SR).mean(axis=0), 401)
    stages = {
        "eq": (lambda x: normalize_eq(x, SR, eq_reference), 0.02),
        "panning": (lambda x: normalize_panning(x, SR, np.linspace(0.9, 0.5, 1025)), 0.03),
        "loudness": (lambda x: normalize_loudness(x, SR, -31.0), 1e-9),
    }
    for name, (normalize, tolerance) in stages.items():
        once = normalize(audio)
        assert _relative_change(once, audio) > 0.05, name  # the first pass does act
        assert _relative_change(normalize(once), once) < tolerance, name


def test_normalising_twice_changes_little(fitted):
    """A second pass of the whole chain (without reverb) on the synthetic songs.

    Every feature stays where the first pass put it: loudness within 0.01 LU, the EQ feature
    (distance of the smoothed mean spectrum to the reference) within 0.2 dB while the first pass
    moved it by more than 0.5 dB, the panning spectrum no farther from its reference. Stems the
    DRC does not compress change by less than 10 % relative RMS: these harmonic stems have sparse
    spectra whose smoothed ripple the EQ filter partly follows, and the per-channel EQ reshapes
    what panning set per frequency. Stems the DRC compressed are compressed again (the stage is
    one-shot, see ``datamodules.fxnorm.drc``), so only their features are checked.
    """
    normalizer, song = fitted
    once = normalizer.normalize_song(song, SR, reverb=False)
    twice = normalizer.normalize_song(once, SR, reverb=False)
    meter = pyloudnorm.Meter(SR)
    band = (np.linspace(0, SR / 2, 32769) > 50) & (np.linspace(0, SR / 2, 32769) < 16000)
    left_alone = []
    for kind in STEMS:
        loudness = [meter.integrated_loudness(x[kind].T.astype(np.float64)) for x in (once, twice)]
        assert abs(loudness[1] - loudness[0]) < 0.01, kind

        def eq_distance(audio: np.ndarray) -> float:
            smoothed = smooth_spectrum(mean_spectrum(audio, SR), eq.SMOOTHING_WINDOW[kind])
            return float(np.mean(np.abs(10 * np.log10(smoothed[:, band] / normalizer.eq_reference[kind][band]))))

        before, first, second = (eq_distance(x[kind]) for x in (song, once, twice))
        assert before - first > 0.5 and abs(second - first) < 0.2, kind

        def panning_distance(audio: np.ndarray) -> float:
            return float(np.mean(np.abs(mean_similarity(audio) - normalizer.panning_reference[kind])))

        assert panning_distance(twice[kind]) < panning_distance(once[kind]) + 0.01, kind
        drc_again = normalizer.normalize_stem(kind, once[kind], SR, stages=("drc",))
        if np.array_equal(drc_again, once[kind]):
            left_alone.append(kind)
            assert _relative_change(twice[kind], once[kind]) < 0.1, kind
    assert left_alone  # the waveform bound was checked on some stems
