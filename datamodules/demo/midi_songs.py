"""Demo MIDI songs: bass, drums and a distractor track, with per-window loop labels (``labels.json``)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import mido
import numpy as np
from tqdm import tqdm

from datamodules.demo import patterns

TICKS_PER_BEAT = 480
TICKS_PER_STEP = TICKS_PER_BEAT // 4
WINDOW_BARS = 8

GM_DRUM_NOTES = ((35, 36), (38, 40, 37), (42, 44), (41, 43, 45), (46,), (47, 48), (49, 57, 55), (50,), (51, 59))
DISCARDED_DRUM_NOTES = (54, 56, 70)  # tambourine, cowbell, maracas: not phrase classes
DISTRACTOR_PROGRAMS = (0, 4, 25, 27, 48)
DRUM_CHANNEL = 9
META_TYPES = ("time_signature", "set_tempo")


def _tempo_map(rng: np.random.Generator, n_bars: int, steps_per_bar: int, changes: bool) -> list[tuple[int, float]]:
    """(tick, BPM) tempo events: one tempo, or a jump at a bar / a ritardando over the last bars."""
    bpm = float(rng.integers(70, 161))
    events = [(0, bpm)]
    if changes:
        bar_ticks = steps_per_bar * TICKS_PER_STEP
        if rng.random() < 0.5:
            jump_bar = int(rng.integers(4, n_bars - 2))
            new_bpm = float(np.clip(bpm + rng.choice([-1, 1]) * rng.integers(8, 30), 60, 180))
            events.append((jump_bar * bar_ticks, new_bpm))
        else:
            first_beat = (n_bars - 3) * bar_ticks // TICKS_PER_BEAT
            last_beat = n_bars * bar_ticks // TICKS_PER_BEAT
            for beat in range(first_beat, last_beat):
                slowdown = 0.3 * (beat - first_beat + 1) / (last_beat - first_beat)
                events.append((beat * TICKS_PER_BEAT, bpm * (1 - slowdown)))
    return events


def _closing_bar(style: patterns.Style) -> patterns.Bar:
    """A final hit: kick and crash on the downbeat and the tonic held through the whole bar."""
    drums = ((0, patterns.KICK, 110), (0, patterns.CRASH, 110))
    return patterns.Bar(style.steps, drums, ((0, style.steps, style.chord_root(0), 90),))


def _note_events(channel: int, notes: Iterable[tuple[int, int, int, int]]) -> list[tuple[int, int, str, dict]]:
    """(tick, order, message type, fields) for (on tick, off tick, pitch, velocity) notes; note-offs sort first."""
    events = []
    for on, off, pitch, velocity in notes:
        events.append((on, 1, "note_on", {"channel": channel, "note": pitch, "velocity": velocity}))
        events.append((off, 0, "note_off", {"channel": channel, "note": pitch, "velocity": 0}))
    return events


def _track(name: str, events: list[tuple[int, int, str, dict]]) -> mido.MidiTrack:
    """A MIDI track of (absolute tick, order at equal ticks, message type, fields) events."""
    track = mido.MidiTrack([mido.MetaMessage("track_name", name=name, time=0)])
    tick = 0
    for absolute, _, kind, fields in sorted(events, key=lambda event: (event[0], event[1])):
        message_class = mido.MetaMessage if kind in META_TYPES else mido.Message
        track.append(message_class(kind, time=absolute - tick, **fields))
        tick = absolute
    track.append(mido.MetaMessage("end_of_track", time=0))
    return track


def _song_midi(rng: np.random.Generator, bars: list[patterns.Bar], style: patterns.Style, with_bass: bool,
               tempo_changes: bool) -> mido.MidiFile:
    """The song as a type-1 MIDI file: conductor track plus drum, bass and distractor tracks in random order."""
    steps = style.steps
    conductor = [(0, 0, "time_signature", {"numerator": steps // 4, "denominator": 4})]
    for tick, bpm in _tempo_map(rng, len(bars), steps, tempo_changes):
        conductor.append((tick, 1, "set_tempo", {"tempo": mido.bpm2tempo(bpm)}))

    drum_notes = [int(rng.choice(choices)) for choices in GM_DRUM_NOTES]
    extra_drum = int(rng.choice(DISCARDED_DRUM_NOTES)) if rng.random() < 0.25 else None
    drum_hits, bass_notes, chord_notes = [], [], []
    for index, bar in enumerate(bars):
        bar_tick = index * steps * TICKS_PER_STEP
        for step, drum_class, velocity in bar.drums:
            on = bar_tick + step * TICKS_PER_STEP + int(rng.integers(0, 12))
            drum_hits.append((on, on + 60, drum_notes[drum_class], velocity))
        if extra_drum is not None:
            for step in range(4, steps, 8):
                on = bar_tick + step * TICKS_PER_STEP
                drum_hits.append((on, on + 60, extra_drum, 60))
        for start, length, pitch, velocity in bar.bass:
            on = bar_tick + start * TICKS_PER_STEP + int(rng.integers(0, 12))
            off = bar_tick + (start + length) * TICKS_PER_STEP - int(rng.integers(0, 30))
            bass_notes.append((on, off, pitch, velocity))
        chord_root = bar.bass[0][2] + 24
        for beat in range(0, steps // 4, 2):
            on = bar_tick + beat * TICKS_PER_BEAT
            for interval in (0, style.scale[2 % len(style.scale)], 7):
                chord_notes.append((on, on + 2 * TICKS_PER_BEAT - 20, chord_root + interval, 55))

    bass_program = int(rng.integers(32, 40))
    distractor_program = int(rng.choice(DISTRACTOR_PROGRAMS))
    instruments = [
        _track("Drums", _note_events(DRUM_CHANNEL, drum_hits)),
        _track("Keys", [(0, 0, "program_change", {"channel": 1, "program": distractor_program})]
               + _note_events(1, chord_notes)),
    ]
    if with_bass:
        instruments.append(_track("Bass", [(0, 0, "program_change", {"channel": 0, "program": bass_program})]
                                  + _note_events(0, bass_notes)))
    midi = mido.MidiFile(type=1, ticks_per_beat=TICKS_PER_BEAT)
    midi.tracks.append(_track("Conductor", conductor))
    for index in rng.permutation(len(instruments)):
        midi.tracks.append(instruments[index])
    return midi


def window_labels(sections: list[patterns.Section], n_bars: int) -> dict[str, list[int]]:
    """Start bars of the 8-bar windows that are loops and non-loops (definition: module docstring)."""
    tags = ["closing"] * n_bars
    for number, section in enumerate(sections):
        for bar in range(section.start, section.end):
            tags[bar] = f"loop{number}" if section.loop_period else "through"
    labels: dict[str, list[int]] = {"loop": [], "non_loop": []}
    for start in range(n_bars - WINDOW_BARS + 1):
        window = set(tags[start:start + WINDOW_BARS])
        if len(window) == 1:
            (tag,) = window
            if tag.startswith("loop"):
                labels["loop"].append(start)
            elif tag == "through":
                labels["non_loop"].append(start)
    return labels


def _song_kinds(rng: np.random.Generator, n_songs: int) -> list[str]:
    """'3/4', 'no_bass' or '4/4' per song: ~6% and ~3% (at least one each), the rest 4/4."""
    n_waltz = max(1, round(0.06 * n_songs))
    n_no_bass = max(1, round(0.03 * n_songs))
    kinds = ["4/4"] * n_songs
    order = rng.permutation(n_songs)
    for index in order[:n_waltz]:
        kinds[index] = "3/4"
    for index in order[n_waltz:n_waltz + n_no_bass]:
        kinds[index] = "no_bass"
    return kinds


def song_path(index: int) -> str:
    """Path of song ``index`` relative to the MIDI folder (songs are grouped in folders of 50)."""
    return f"{index // 50:02d}/song_{index:03d}.mid"


def build_midi(stage: Path, seed: int, n_songs: int = 200) -> None:
    """Write ``stage/midi/`` and ``stage/labels.json``."""
    rng = np.random.default_rng([seed, 1])
    kinds = _song_kinds(rng, n_songs)
    tempo_changes = rng.random(n_songs) < 0.2
    tempo_changes[rng.choice(np.flatnonzero(np.array(kinds) == "4/4"))] = True
    labels = {}
    for index in tqdm(range(n_songs), desc="demo MIDI songs", unit="song"):
        style = patterns.random_style(rng, steps=12 if kinds[index] == "3/4" else 16)
        n_bars = int(rng.integers(15, 48))
        sections = patterns.song_sections(style, rng, n_bars)
        bars = [bar for section in sections for bar in section.bars] + [_closing_bar(style)]
        midi = _song_midi(rng, bars, style, with_bass=kinds[index] != "no_bass",
                          tempo_changes=bool(tempo_changes[index]))
        path = stage / "midi" / song_path(index)
        path.parent.mkdir(parents=True, exist_ok=True)
        midi.save(str(path))
        ingestible = kinds[index] == "4/4"
        labels[song_path(index)] = window_labels(sections, len(bars)) if ingestible else {"loop": [], "non_loop": []}
    (stage / "labels.json").write_text(json.dumps(labels, indent=1, sort_keys=True) + "\n")


def read_window_labels(path: str | os.PathLike) -> dict[tuple[str, int], bool]:
    """``labels.json`` as {(MIDI path relative to the MIDI folder, window start bar): is a loop}."""
    labels = json.loads(Path(path).read_text())
    return {(file, start): kind == "loop" for file, kinds in labels.items() for kind in ("loop", "non_loop")
            for start in kinds[kind]}
