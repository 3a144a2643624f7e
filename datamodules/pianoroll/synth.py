"""A small numpy synthesiser that turns bass+drum pianorolls into audio.

Used to render the demo's audio loops and to make audio previews of generated loops, with no
soundfont or external synthesiser. The pianoroll layout is the phrase layout: 16 steps per bar,
columns 0-8 the drum classes (kick, snare, closed hi-hat, low tom, open hi-hat, mid tom, crash,
high tom, ride), columns 9-56 the bass, MIDI pitch = column + 15.

Drums are one-shot samples (tuned decaying sines and filtered noise bursts) triggered at each
active cell. Bass cells of one pitch on consecutive steps form one note, rendered as a few
harmonics under an attack/decay/release envelope.
"""
from __future__ import annotations

import functools

import numpy as np
from scipy import signal

N_DRUMS = 9
BASS_PITCH_OFFSET = 15
DEFAULT_SR = 22050
STEPS_PER_BEAT = 4
PEAK = 0.9

# Per drum class: (sine start Hz, sine end Hz, sine decay s, sine level,
#                  noise band (low Hz, high Hz or None), noise decay s, noise level)
_DRUM_VOICES = (
    (120.0, 60.0, 0.08, 0.50, (40.0, 400.0), 0.02, 0.25),     # kick
    (220.0, 180.0, 0.10, 0.45, (1200.0, 9000.0), 0.16, 0.65),  # snare
    (0.0, 0.0, 0.0, 0.0, (7000.0, None), 0.045, 0.28),         # closed hi-hat
    (105.0, 85.0, 0.35, 0.70, (200.0, 2000.0), 0.05, 0.10),    # low tom
    (0.0, 0.0, 0.0, 0.0, (6000.0, None), 0.32, 0.26),          # open hi-hat
    (150.0, 125.0, 0.30, 0.65, (300.0, 2500.0), 0.05, 0.10),   # mid tom
    (0.0, 0.0, 0.0, 0.0, (3500.0, None), 1.10, 0.35),          # crash
    (200.0, 170.0, 0.25, 0.60, (400.0, 3000.0), 0.05, 0.10),   # high tom
    (0.0, 0.0, 0.0, 0.0, (5000.0, None), 0.70, 0.20),          # ride
)
_BASS_HARMONICS = np.array([0.6, 1.0, 0.7, 0.5, 0.35, 0.25])
_BASS_LEVEL = 0.8


@functools.lru_cache(maxsize=64)
def drum_sample(drum_class: int, sr: int) -> np.ndarray:
    """The one-shot sample of a drum class at sample rate ``sr`` (deterministic)."""
    f_start, f_end, sine_decay, sine_level, (low, high), noise_decay, noise_level = _DRUM_VOICES[drum_class]
    length = int(sr * 5 * max(sine_decay, noise_decay))
    t = np.arange(length) / sr
    out = np.zeros(length)
    if sine_level > 0:
        # Exponential pitch glide from f_start to f_end, integrated to a phase.
        glide = f_end + (f_start - f_end) * np.exp(-t / 0.04)
        out += sine_level * np.sin(2 * np.pi * np.cumsum(glide) / sr) * np.exp(-t / sine_decay)
    noise = np.random.default_rng(1000 + drum_class).standard_normal(length)
    nyquist = sr / 2
    if high is None or high >= nyquist:
        sos = signal.butter(4, min(low, 0.9 * nyquist), btype="highpass", fs=sr, output="sos")
    else:
        sos = signal.butter(2, (low, high), btype="bandpass", fs=sr, output="sos")
    out += noise_level * signal.sosfilt(sos, noise) * np.exp(-t / noise_decay)
    out[: int(0.002 * sr)] *= np.linspace(0, 1, int(0.002 * sr))
    return out


def _bass_note(pitch: int, n_samples: int, sr: int) -> np.ndarray:
    """A bass note lasting ``n_samples`` plus a short release tail."""
    release = int(0.03 * sr)
    t = np.arange(n_samples + release) / sr
    frequency = 440.0 * 2 ** ((pitch - 69) / 12)
    harmonics = np.arange(1, len(_BASS_HARMONICS) + 1)
    audible = harmonics * frequency < sr / 2
    wave = (_BASS_HARMONICS[audible, None] * np.sin(2 * np.pi * frequency * harmonics[audible, None] * t)).sum(0)
    envelope = 0.55 + 0.45 * np.exp(-t / 0.18)
    envelope *= np.minimum(1.0, t / 0.004)
    envelope[n_samples:] *= np.linspace(1, 0, release)
    return _BASS_LEVEL * wave * envelope


def _bass_notes(roll: np.ndarray):
    """(start step, length in steps, MIDI pitch) of each run of one active bass column."""
    bass = roll[:, N_DRUMS:]
    padded = np.zeros((bass.shape[0] + 2, bass.shape[1]), dtype=np.int8)
    padded[1:-1] = bass
    edges = np.diff(padded, axis=0)
    starts_step, starts_col = np.nonzero(edges == 1)
    ends_step, ends_col = np.nonzero(edges == -1)
    start_order = np.lexsort((starts_step, starts_col))
    end_order = np.lexsort((ends_step, ends_col))
    for start, end, column in zip(starts_step[start_order], ends_step[end_order], starts_col[start_order]):
        yield int(start), int(end - start), N_DRUMS + int(column) + BASS_PITCH_OFFSET


def render_phrases(phrases, bpm: float, sr: int = DEFAULT_SR) -> np.ndarray:
    """Render pianoroll phrases to mono float32 audio.

    ``phrases``: bool/0-1 array of shape ``(T, 57)`` or ``(N, T, 57)`` (e.g. ``(N, 128, 57)``); N
    phrases are played one after another. One step is a 16th note at ``bpm``, so the result lasts
    exactly ``T * N`` steps. Sounds ringing past the end wrap around onto the start, which makes
    the audio a seamless loop. Peaks are scaled down to 0.9 when they would exceed it.
    """
    roll = np.asarray(phrases)
    if roll.ndim == 3:
        roll = roll.reshape(-1, roll.shape[-1])
    if roll.ndim != 2 or roll.shape[1] != N_DRUMS + 48:
        raise ValueError(f"expected a pianoroll of shape (T, 57) or (N, T, 57), got {np.shape(phrases)}")
    if not bpm > 0:
        raise ValueError(f"bpm must be positive, got {bpm}")
    roll = roll.astype(bool)
    step_seconds = 60.0 / (bpm * STEPS_PER_BEAT)
    n_samples = int(round(roll.shape[0] * step_seconds * sr))
    if n_samples == 0:
        return np.zeros(0, dtype=np.float32)
    step_starts = np.round(np.arange(roll.shape[0] + 1) * step_seconds * sr).astype(int)
    out = np.zeros(n_samples)

    def add(sound: np.ndarray, start: int) -> None:
        while len(sound):
            chunk = sound[: n_samples - start]
            out[start:start + len(chunk)] += chunk
            sound, start = sound[len(chunk):], 0

    for drum_class in range(N_DRUMS):
        sample = drum_sample(drum_class, int(sr))
        for step in np.flatnonzero(roll[:, drum_class]):
            add(sample, step_starts[step])
    for start, length, pitch in _bass_notes(roll):
        add(_bass_note(pitch, step_starts[start + length] - step_starts[start], int(sr)), step_starts[start])
    peak = np.abs(out).max()
    if peak > PEAK:
        out *= PEAK / peak
    return out.astype(np.float32)
