"""Synthetic multitrack songs in the MUSDB18-HQ layout, for the built-in demo data.

Each song is a chord progression rendered as four stems with numpy: a formant-filtered harmonic
"vocal" melody with vibrato, a plucked bass, a drum kit and chord pads ("other"). The training
and test stems are *wet*: a simulated mixing engineer gives each its own random gain, EQ,
compression, panning and reverb, and ``mixture.wav`` is their sum. A few more songs are written
*dry* (mono sources duplicated to stereo, no processing) for trying the mixer on unseen stems.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyloudnorm
import scipy.signal
from tqdm import tqdm

from datamodules.fxnorm.drc import compress
from datamodules.fxnorm.reverb import room_impulse_response
from datamodules.fxnorm.songs import MIXTURE, STEMS, write_song

SR = 44100
MIX_PEAK = 0.98
# Chord progressions as (semitones above the key root, minor?) per bar.
PROGRESSIONS = (
    ((0, False), (7, False), (9, True), (5, False)),
    ((0, False), (5, False), (7, False), (5, False)),
    ((9, True), (5, False), (0, False), (7, False)),
    ((0, False), (9, True), (5, False), (7, False)),
)
# Vowel formants (Hz) and bandwidths (Hz) for the vocal timbre.
VOWELS = ((700, 1220, 2600), (300, 2300, 3000), (500, 1000, 2500), (400, 2000, 2550), (350, 800, 2400))
FORMANT_BANDWIDTHS = (90.0, 110.0, 160.0)
MELODY_RHYTHMS = ((1, 1, 1, 1), (2, 1, 1), (1.5, 0.5, 2), (0.5, 0.5, 1, 2), (3, 1), (1, 0.5, 0.5, 2))


def midi_to_hz(pitch: np.ndarray | float) -> np.ndarray | float:
    return 440.0 * 2.0 ** ((np.asarray(pitch) - 69) / 12)


def _envelope(n: int, sr: int, attack_s: float, release_s: float, decay_s: float | None = None) -> np.ndarray:
    """Linear attack, optional exponential decay, linear release over ``n`` samples."""
    t = np.arange(n) / sr
    env = np.minimum(1.0, t / max(attack_s, 1e-4))
    if decay_s is not None:
        env *= np.exp(-t / decay_s)
    release = min(int(release_s * sr), n)
    env[n - release :] *= np.linspace(1.0, 0.0, release)
    return env


_TABLE_SIZE = 4096


def _harmonics(phase: np.ndarray, amplitudes: np.ndarray) -> np.ndarray:
    """sum_k amplitudes[k-1] sin(k phase), read from a one-period wavetable (one lookup per sample)."""
    k = np.arange(1, len(amplitudes) + 1)[:, None]
    table = amplitudes @ np.sin(k * np.linspace(0, 2 * np.pi, _TABLE_SIZE, endpoint=False)[None, :])
    index = (phase * (_TABLE_SIZE / (2 * np.pi))).astype(np.int64) % _TABLE_SIZE
    return table[index]


def _add(track: np.ndarray, start: int, note: np.ndarray) -> None:
    stop = min(start + note.size, track.size)
    track[start:stop] += note[: stop - start]


def _vocal_note(pitch: int, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n) / sr
    f0 = midi_to_hz(pitch) * (1 + 0.006 * np.sin(2 * np.pi * rng.uniform(4.8, 6.2) * t + rng.uniform(0, 2 * np.pi)))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    n_harmonics = int(min(40, 6000 / midi_to_hz(pitch)))
    partials = midi_to_hz(pitch) * np.arange(1, n_harmonics + 1)
    formants = VOWELS[rng.integers(len(VOWELS))]
    gain = sum(np.exp(-0.5 * ((partials - f) / b) ** 2) for f, b in zip(formants, FORMANT_BANDWIDTHS))
    amplitudes = (0.08 + gain) / np.sqrt(np.arange(1, n_harmonics + 1))
    voice = _harmonics(phase, amplitudes / amplitudes.sum())
    breath = 0.02 * rng.standard_normal(n)
    return (voice + breath) * _envelope(n, sr, 0.04, min(0.08, n / sr / 2))


def synthesize_song(rng: np.random.Generator, seconds: float, sr: int = SR) -> dict[str, np.ndarray]:
    """Dry mono stems {vocals, bass, drums, other} of a song about ``seconds`` long."""
    beat = 60.0 / rng.uniform(85, 130)
    bar_samples = int(round(4 * beat * sr))
    n_bars = max(2, int(round(seconds / (4 * beat))))
    n = n_bars * bar_samples
    key = int(rng.integers(0, 12))
    progression = PROGRESSIONS[rng.integers(len(PROGRESSIONS))]
    tracks = {name: np.zeros(n) for name in STEMS}
    beat_samples = bar_samples / 4
    drum_samples = {name: _drum_sample(name, sr, rng) for name in ("kick", "snare", "hat")}
    melody_pitch = 64 + key % 5
    for bar in range(n_bars):
        offset, minor = progression[bar % len(progression)]
        root = 36 + (key + offset) % 12
        chord = np.array([0, 3 if minor else 4, 7]) + root
        start = bar * bar_samples
        # bass: eighth notes on the root, now and then the fifth or the octave
        for eighth in range(8):
            pitch = root + int(rng.choice([0, 0, 0, 7, 12]))
            length = int(beat_samples / 2)
            phase = 2 * np.pi * midi_to_hz(pitch) * np.arange(length) / sr
            note = _harmonics(phase, np.array([1.0, 0.5, 0.3, 0.18, 0.1])) * _envelope(length, sr, 0.005, 0.01, 0.25)
            _add(tracks["bass"], start + int(eighth * beat_samples / 2), rng.uniform(0.5, 1.0) * note)
        # other: a sustained triad two octaves up, two slightly detuned voices per note
        pad = np.zeros(bar_samples)
        for pitch in chord + 24:
            for detune in (-0.003, 0.003):
                phase = 2 * np.pi * midi_to_hz(pitch) * (1 + detune) * np.arange(bar_samples) / sr + rng.uniform(0, 2 * np.pi)
                pad += _harmonics(phase, 1.0 / np.arange(1, 9))
        _add(tracks["other"], start, rng.uniform(0.6, 1.0) * pad * _envelope(bar_samples, sr, 0.15, 0.1))
        # vocals: most bars sing a rhythm of chord and scale tones around the previous note
        if rng.random() < 0.75:
            position = 0.0
            for length_beats in MELODY_RHYTHMS[rng.integers(len(MELODY_RHYTHMS))]:
                candidates = np.concatenate([chord + 24, chord + 36])
                melody_pitch = int(candidates[np.argmin(np.abs(candidates - melody_pitch - rng.integers(-4, 5)))])
                length = int(length_beats * beat_samples * 0.9)
                note = _vocal_note(melody_pitch, length, sr, rng)
                _add(tracks["vocals"], start + int(position * beat_samples), rng.uniform(0.6, 1.0) * note)
                position += length_beats
        # drums: kick on 1 and 3 (sometimes an extra eighth), snare on 2 and 4, eighth-note hats
        for beat_index in range(4):
            at = start + int(beat_index * beat_samples)
            _add(tracks["drums"], at, rng.uniform(0.7, 1.0) * drum_samples["kick" if beat_index % 2 == 0 else "snare"])
            if beat_index == 2 and rng.random() < 0.4:
                _add(tracks["drums"], start + int(2.5 * beat_samples), rng.uniform(0.5, 0.8) * drum_samples["kick"])
            for half in (0, 1):
                _add(tracks["drums"], at + int(half * beat_samples / 2), rng.uniform(0.3, 0.7) * drum_samples["hat"])
    return {name: track / max(np.max(np.abs(track)), 1e-9) * 0.5 for name, track in tracks.items()}


def _drum_sample(name: str, sr: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(0.4 * sr)) / sr
    if name == "kick":
        frequency = 45 + 80 * np.exp(-t / 0.04)
        return np.sin(2 * np.pi * np.cumsum(frequency) / sr) * np.exp(-t / 0.18)
    noise = rng.standard_normal(t.size)
    if name == "snare":
        band = scipy.signal.sosfilt(scipy.signal.butter(2, (1000, 8000), "bandpass", fs=sr, output="sos"), noise)
        return (0.8 * band + 0.4 * np.sin(2 * np.pi * 190 * t)) * np.exp(-t / 0.09)
    return 0.5 * scipy.signal.sosfilt(scipy.signal.butter(2, 7000, "highpass", fs=sr, output="sos"), noise) * np.exp(-t / 0.03)


def _biquad(audio: np.ndarray, sr: int, kind: str, gain_db: float, q: float, fc: float) -> np.ndarray:
    filt = pyloudnorm.IIRfilter(gain_db, q, fc, sr, kind)
    return scipy.signal.lfilter(filt.b, filt.a, audio, axis=-1)


# Pan range (+-) and reverb (RT60 range s, send level range) a mixing engineer might choose per stem.
_PAN = {"vocals": 0.1, "bass": 0.05, "drums": 0.15, "other": 0.8}
_REVERB = {"vocals": ((1.0, 2.5), (0.1, 0.35)), "other": ((1.0, 2.5), (0.1, 0.35)), "drums": ((0.3, 0.8), (0.03, 0.15)), "bass": None}


def process_stem(dry: np.ndarray, kind: str, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Mono dry stem -> stereo wet stem: random EQ, compression, gain, constant-power pan and reverb."""
    audio = dry
    for _ in range(int(rng.integers(1, 4))):
        audio = _biquad(audio, sr, "peaking", rng.uniform(-8, 8), rng.uniform(0.7, 2.0), np.exp(rng.uniform(np.log(80), np.log(9000))))
    audio = _biquad(audio, sr, "high_shelf", rng.uniform(-6, 6), 0.7, rng.uniform(3000, 10000))
    audio = audio / max(np.max(np.abs(audio)), 1e-9)
    audio = compress(audio, sr, rng.uniform(-30, -8), rng.uniform(1.5, 10), rng.uniform(2, 25), rng.uniform(60, 400))[0]
    audio = audio * 10 ** (rng.uniform(-8, 0) / 20)
    angle = (rng.uniform(-_PAN[kind], _PAN[kind]) + 1) * np.pi / 4
    stereo = np.stack([np.cos(angle) * audio, np.sin(angle) * audio])
    if _REVERB[kind] is not None:
        rt60_range, send_range = _REVERB[kind]
        response = room_impulse_response(sr, rng.uniform(*rt60_range), rng)
        wet = scipy.signal.oaconvolve(stereo.astype(np.float32), response.astype(np.float32), axes=1)[:, : stereo.shape[1]]
        stereo = stereo + rng.uniform(*send_range) * wet
    return stereo


def write_multitrack_demo(
    out: str | os.PathLike,
    seed: int = 0,
    n_train: int = 24,
    n_test: int = 6,
    n_dry: int = 3,
    seconds: tuple[float, float] = (20.0, 40.0),
    sr: int = SR,
) -> Path:
    """Write ``out/multitrack/{train,test}/<song>/`` (wet stems + mixture) and ``out/dry/<song>/``.

    16-bit stereo WAVs at ``sr``. If a mixture would clip, the song's stems and mixture are scaled
    down together so the mixture stays the sum of the stems. Deterministic for a seed.
    """
    out = Path(out)
    jobs = [("train", i) for i in range(n_train)] + [("test", i) for i in range(n_test)] + [("dry", i) for i in range(n_dry)]
    for split, index in tqdm(jobs, desc="multitrack demo", unit="song"):
        rng = np.random.default_rng([seed, ("train", "test", "dry").index(split), index])
        dry = synthesize_song(rng, rng.uniform(*seconds), sr)
        if split == "dry":
            write_song(out / "dry" / f"dry_{index:03d}", {k: np.stack([v, v]) for k, v in dry.items()}, sr, subtype="PCM_16")
            continue
        stems = {kind: process_stem(audio, kind, sr, rng) for kind, audio in dry.items()}
        mixture = sum(stems.values())
        scale = min(1.0, MIX_PEAK / max(np.max(np.abs(mixture)), 1e-9), MIX_PEAK / max(np.max(np.abs(s)) for s in stems.values()))
        stems = {k: v * scale for k, v in stems.items()}
        stems[MIXTURE] = mixture * scale
        write_song(out / "multitrack" / split / f"song_{index:03d}", stems, sr, subtype="PCM_16")
    return out
