"""Pianoroll phrases -> playable MIDI (LOOPS.md section 8)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pretty_midi

from datamodules.pianoroll.layout import (
    BASS_LOWEST,
    BASS_PLAYBACK_PROGRAM,
    DRUM_PLAYBACK_NOTES,
    N_COLUMNS,
    N_DRUM_CLASSES,
    PHRASE_STEPS,
    STEPS_PER_BEAT,
)
from framework.io import atomic_path


def phrases_to_midi(
    phrases: np.ndarray, path: str | Path | None = None, tempo: float = 120.0, seed: int = 0
) -> pretty_midi.PrettyMIDI:
    """Consecutive phrases (N, 128, 57) or one (128, 57) as a 4/4 MIDI file (written when ``path`` is given).

    Bass: program 33, velocity 80 + N(0, 2), one note per run of active cells of one pitch. Drums:
    channel 10, velocity 90 + N(0, 2), one sixteenth per hit on the class's playback note. ``seed``
    makes the velocities reproducible.
    """
    phrases = np.asarray(phrases, dtype=bool)
    if phrases.shape[-2:] != (PHRASE_STEPS, N_COLUMNS) or phrases.ndim not in (2, 3):
        raise ValueError(f"phrases must be (N, {PHRASE_STEPS}, {N_COLUMNS}) or ({PHRASE_STEPS}, {N_COLUMNS}), got {phrases.shape}")
    roll = phrases.reshape(-1, N_COLUMNS)
    step_seconds = 60.0 / tempo / STEPS_PER_BEAT
    rng = np.random.default_rng(seed)

    bass_cells = np.pad(roll[:, N_DRUM_CLASSES:], ((1, 1), (0, 0))).T.astype(np.int8)
    edges = np.diff(bass_cells, axis=1)
    run_pitch, run_start = np.nonzero(edges == 1)  # column-major: runs of each pitch in time order
    _, run_end = np.nonzero(edges == -1)
    bass_velocity = _velocities(rng, 80, len(run_pitch))
    hit_step, hit_class = np.nonzero(roll[:, :N_DRUM_CLASSES])
    drum_velocity = _velocities(rng, 90, len(hit_step))

    midi = pretty_midi.PrettyMIDI(resolution=480, initial_tempo=tempo)
    midi.time_signature_changes.append(pretty_midi.TimeSignature(4, 4, 0.0))
    bass = pretty_midi.Instrument(program=BASS_PLAYBACK_PROGRAM, name="bass")
    bass.notes = [
        pretty_midi.Note(int(v), int(p) + BASS_LOWEST, s * step_seconds, e * step_seconds)
        for v, p, s, e in zip(bass_velocity, run_pitch, run_start, run_end)
    ]
    drums = pretty_midi.Instrument(program=0, is_drum=True, name="drums")
    drums.notes = [
        pretty_midi.Note(int(v), DRUM_PLAYBACK_NOTES[c], s * step_seconds, (s + 1) * step_seconds)
        for v, s, c in zip(drum_velocity, hit_step, hit_class)
    ]
    midi.instruments = [bass, drums]
    if path is not None:
        with atomic_path(path) as tmp:
            midi.write(str(tmp))
    return midi


def _velocities(rng: np.random.Generator, mean: float, count: int) -> np.ndarray:
    return np.clip(np.rint(rng.normal(mean, 2.0, count)), 1, 127).astype(int)
