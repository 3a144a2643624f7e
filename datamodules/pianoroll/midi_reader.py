"""Standard MIDI File -> bass+drum pianoroll phrases (LOOPS.md section 1).

The reader is our own: one compiled pass locates the events (a sequential job by nature) and
everything after it - note pairing, programs, track choice, quantisation, windows - is numpy array
work, which is what makes bulk ingest of the Lakh MIDI set fast. Notes are read as pretty_midi reads
them: a note-on is closed by the first later note-off of the same track, channel and pitch at a later
tick, unclosed notes are dropped, the program is the one in force on the note's channel when it
closes, and "tracks" are pretty_midi's instruments (track, channel, program) in the order their first
note closes. Unlike pretty_midi, time-signature events are read from every track, not only the first.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np

from datamodules.pianoroll.layout import (
    BARS_PER_PHRASE,
    BASS_HIGHEST,
    BASS_LOWEST,
    BASS_PROGRAMS,
    DRUM_CHANNEL,
    DRUM_CLASS_NOTES,
    MIN_ACTIVE_CELLS,
    N_BASS_PITCHES,
    N_COLUMNS,
    N_DRUM_CLASSES,
    PHRASE_STEPS,
    STEPS_PER_BAR,
    STEPS_PER_BEAT,
)

# Guards against pathological files: each would otherwise cost memory out of proportion to its music.
MAX_FILE_BYTES = 16 * 2**20
MAX_STEPS = 4096 * STEPS_PER_BAR
MAX_BPM = 1000.0

_DRUM_CLASS_OF_NOTE = np.full(128, -1, dtype=np.int64)
for _column, _notes in enumerate(DRUM_CLASS_NOTES):
    _DRUM_CLASS_OF_NOTE[list(_notes)] = _column

NO_WINDOWS = (np.zeros((0, PHRASE_STEPS, N_COLUMNS), dtype=bool), np.zeros(0, dtype=np.int64))

# Data bytes following each status byte (channel voice and system common messages); 0 elsewhere.
_DATA_BYTES = np.zeros(256, dtype=np.int64)
_DATA_BYTES[0x80:0xF0] = 2
_DATA_BYTES[0xC0:0xE0] = 1
_DATA_BYTES[[0xF1, 0xF2, 0xF3]] = [1, 2, 1]
_META, _SYSEX, _SYSEX_ESCAPE = 0xFF, 0xF0, 0xF7
_META_TEMPO, _META_TIME_SIGNATURE = 0x51, 0x58
_PAD = 16  # zero bytes appended so look-ahead past the end reads zeros instead of failing


class SkipFile(Exception):
    """A MIDI file that yields no phrases for a known reason (``reason``: a short machine-readable tag)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class _Events:
    """Every event of a file, in file order, as parallel arrays (track-local ticks)."""

    data: np.ndarray  # file bytes as int64, zero-padded
    track: np.ndarray
    tick: np.ndarray
    status: np.ndarray  # running status resolved; 0xFF meta, 0xF0/0xF7 sysex
    data_at: np.ndarray  # offset of the first data byte (meta: of the payload)
    meta_type: np.ndarray  # -1 for non-meta events
    meta_length: np.ndarray  # payload length of meta events


def _chunks(data: bytes) -> tuple[int, list[tuple[int, int]]]:
    """Ticks per beat and the (start, end) byte range of each track chunk."""
    if len(data) < 14 or data[:4] != b"MThd":
        raise SkipFile("not_midi", "no MThd header")
    header_length = struct.unpack(">I", data[4:8])[0]
    _, n_tracks, division = struct.unpack(">HHH", data[8:14])
    if division & 0x8000:
        raise SkipFile("smpte_division", "SMPTE time code instead of ticks per beat")
    if division == 0:
        raise SkipFile("unreadable", "zero ticks per beat")
    tracks = []
    position = 8 + header_length
    while len(tracks) < n_tracks:
        if position + 8 > len(data):
            raise SkipFile("truncated", f"{len(tracks)} of {n_tracks} tracks present")
        name, length = data[position : position + 4], struct.unpack(">I", data[position + 4 : position + 8])[0]
        start, position = position + 8, position + 8 + length
        if position > len(data):
            raise SkipFile("truncated", f"chunk {len(tracks)} ends past the end of the file")
        if name == b"MTrk":
            tracks.append((start, position))
    return division, tracks


_SCAN_ERRORS = {
    1: "a variable-length number is longer than 4 bytes",
    2: "running status with no status in force",
    3: "an event runs past the end of its track",
    4: "a data byte has its high bit set",
}


@numba.njit(cache=True, nogil=True)
def _scan(b, starts, ends, data_bytes, track, delta, status, data_at, meta_type, meta_length):  # pragma: no cover - compiled
    """Walk the track chunks ``b[starts[t]:ends[t]]`` event by event, filling the output arrays.

    Locating events is inherently sequential (variable-length deltas, running status), so this one
    loop is compiled; everything after it works on the arrays. Returns (events found, error code).
    Running status survives meta events and is cancelled by sysex and system common messages.
    """
    n = 0
    for t in range(len(starts)):
        p, end, running = starts[t], ends[t], 0
        while p < end:
            value, length = 0, 0
            while True:
                if p >= end:
                    return n, 3
                c = b[p]
                p += 1
                value = (value << 7) | (c & 0x7F)
                length += 1
                if c < 0x80:
                    break
                if length == 4:
                    return n, 1
            if p >= end:
                return n, 3
            s = b[p]
            if s >= 0x80:
                p += 1
            elif running == 0:
                return n, 2
            else:
                s = running
            track[n], delta[n], status[n], meta_type[n], meta_length[n] = t, value, s, -1, 0
            if s == 0xFF or s == 0xF0 or s == 0xF7:
                if s == 0xFF:
                    if p >= end:
                        return n, 3
                    meta_type[n] = b[p]
                    p += 1
                else:
                    running = 0
                size, length = 0, 0
                while True:
                    if p >= end:
                        return n, 3
                    c = b[p]
                    p += 1
                    size = (size << 7) | (c & 0x7F)
                    length += 1
                    if c < 0x80:
                        break
                    if length == 4:
                        return n, 1
                meta_length[n] = size
                data_at[n] = p
                p += size
            else:
                running = s if s < 0xF0 else 0
                data_at[n] = p
                for k in range(data_bytes[s]):
                    if p >= end:
                        return n, 3
                    if b[p] >= 0x80:
                        return n, 4
                    p += 1
            if p > end:
                return n, 3
            n += 1
    return n, 0


def _read_events(data: bytes, tracks: list[tuple[int, int]]) -> _Events:
    """Locate and decode every event of every track."""
    b = np.frombuffer(data + bytes(_PAD), dtype=np.uint8)
    starts = np.array([start for start, _ in tracks], dtype=np.int64)
    ends = np.array([end for _, end in tracks], dtype=np.int64)
    capacity = int((ends - starts).sum()) // 2 + 1  # every event takes at least two bytes
    track, delta, status, data_at, meta_type, meta_length = (np.empty(capacity, dtype=np.int64) for _ in range(6))
    count, error = _scan(b, starts, ends, _DATA_BYTES, track, delta, status, data_at, meta_type, meta_length)
    if error:
        raise SkipFile("unreadable", _SCAN_ERRORS[error])
    track = track[:count]
    tick = np.cumsum(delta[:count])
    track_start = np.searchsorted(track, np.arange(len(tracks)))
    tick -= np.concatenate([[0], tick])[track_start][track]
    return _Events(
        b.astype(np.int64), track, tick, status[:count], data_at[:count], meta_type[:count], meta_length[:count]
    )


def _check_meta(events: _Events) -> None:
    """Time signatures: at least one, all 4/4. Tempi: positive and at most ``MAX_BPM``."""
    b = events.data
    signatures = np.flatnonzero(events.meta_type == _META_TIME_SIGNATURE)
    if len(signatures) == 0:
        raise SkipFile("no_time_signature")
    at = events.data_at[signatures]
    if np.any(events.meta_length[signatures] < 2) or np.any((b[at] != 4) | (b[at + 1] != 2)):
        raise SkipFile("not_4_4")
    tempi = np.flatnonzero(events.meta_type == _META_TEMPO)
    at = events.data_at[tempi]
    microseconds_per_beat = (b[at] << 16) | (b[at + 1] << 8) | b[at + 2]
    if np.any(events.meta_length[tempi] < 3) or np.any(microseconds_per_beat * MAX_BPM < 60e6):
        raise SkipFile("absurd_tempo", f"a tempo is zero or faster than {MAX_BPM:g} BPM")


@dataclass
class _TrackNotes:
    pitch: np.ndarray
    start: np.ndarray  # ticks
    end: np.ndarray  # ticks


def _chosen_tracks(events: _Events, ticks_per_beat: int) -> tuple[_TrackNotes, _TrackNotes]:
    """Completed notes of the first drum instrument and of the first bass instrument (programs 32-39)."""
    b = events.data
    kind = events.status & 0xF0
    channel = events.status & 0x0F
    pitch = b[events.data_at]
    velocity = b[events.data_at + 1]
    ons = np.flatnonzero((kind == 0x90) & (velocity > 0))
    offs = np.flatnonzero((kind == 0x80) | ((kind == 0x90) & (velocity == 0)))
    if len(ons) and STEPS_PER_BEAT * events.tick[np.concatenate([ons, offs])].max() // ticks_per_beat > MAX_STEPS:
        raise SkipFile("too_long", f"notes beyond {MAX_STEPS // STEPS_PER_BAR} bars")

    # A note-on is closed by the first note-off of the same (track, channel, pitch) at a later tick.
    track_channel = events.track * 16 + channel
    note_key = track_channel * 128 + pitch
    tick_span = int(events.tick.max()) + 1 if len(events.tick) else 1
    offs = offs[np.lexsort((offs, events.tick[offs], note_key[offs]))]
    off_code = note_key[offs] * tick_span + events.tick[offs]
    closer_at = np.searchsorted(off_code, note_key[ons] * tick_span + events.tick[ons], side="right")
    closed = closer_at < len(offs)
    ons = ons[closed]
    closer = offs[closer_at[closed]]
    closed = note_key[closer] == note_key[ons]
    ons, closer = ons[closed], closer[closed]

    # The program in force on the channel of that track when the note closes (0 before any change).
    changes = np.flatnonzero(kind == 0xC0)
    n_events = len(events.status)
    change_code = track_channel[changes] * n_events + changes
    order = np.argsort(change_code)
    changes, change_code = changes[order], change_code[order]
    latest = np.searchsorted(change_code, track_channel[closer] * n_events + closer) - 1
    has_change = latest >= 0
    has_change[has_change] = track_channel[changes[latest[has_change]]] == track_channel[closer[has_change]]
    program = np.where(has_change, pitch[changes[np.maximum(latest, 0)]] if len(changes) else 0, 0)

    instrument = track_channel[closer] * 128 + program
    is_drum = channel[closer] == DRUM_CHANNEL
    is_bass = ~is_drum & (program >= BASS_PROGRAMS.start) & (program < BASS_PROGRAMS.stop)
    chosen = []
    for candidates, reason in ((is_drum, "no_drums"), (is_bass, "no_bass")):
        if not np.any(candidates):
            raise SkipFile(reason)
        # Instruments are ordered by their first closing note-off, so the first one owns the earliest.
        first = instrument[np.flatnonzero(candidates)[np.argmin(closer[candidates])]]
        mine = candidates & (instrument == first)
        chosen.append(_TrackNotes(pitch[ons[mine]], events.tick[ons[mine]], events.tick[closer[mine]]))
    return chosen[0], chosen[1]


def _grid(drums: _TrackNotes, bass: _TrackNotes, ticks_per_beat: int) -> np.ndarray:
    """The song's (steps, 57) binary grid, from step 0 to the last step either instrument occupies."""
    drum_class = _DRUM_CLASS_OF_NOTE[drums.pitch]
    hits = drum_class >= 0
    drum_class = drum_class[hits]
    drum_step = STEPS_PER_BEAT * drums.start[hits] // ticks_per_beat
    in_range = (bass.pitch >= BASS_LOWEST) & (bass.pitch <= BASS_HIGHEST)
    bass_pitch = bass.pitch[in_range] - BASS_LOWEST
    bass_on = STEPS_PER_BEAT * bass.start[in_range] // ticks_per_beat
    bass_off = np.maximum(-(-STEPS_PER_BEAT * bass.end[in_range] // ticks_per_beat), bass_on + 1)
    steps = int(max(drum_step.max(initial=-1) + 1, bass_off.max(initial=0)))

    grid = np.zeros((steps, N_COLUMNS), dtype=bool)
    grid[drum_step, drum_class] = True
    # Bass notes sounding at each step, by pitch: +1 at the onset, -1 after the last step, summed in time.
    size = (steps + 1) * N_BASS_PITCHES
    change = np.bincount(bass_on * N_BASS_PITCHES + bass_pitch, minlength=size)
    change -= np.bincount(bass_off * N_BASS_PITCHES + bass_pitch, minlength=size)
    sounding = np.cumsum(change.reshape(steps + 1, N_BASS_PITCHES), axis=0)[:steps] > 0
    has_bass = sounding.any(axis=1)
    lowest = np.argmax(sounding, axis=1)
    grid[has_bass, N_DRUM_CLASSES + lowest[has_bass]] = True
    return grid


def window_phrases(grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Phrases (N, 128, 57) of a song grid and their start bars: every full 8-bar window at a 1-bar
    stride with at least 32 active drum cells and 32 active bass cells."""
    n_windows = max((len(grid) - PHRASE_STEPS) // STEPS_PER_BAR + 1, 0)
    if n_windows == 0:
        return NO_WINDOWS
    n_bars = n_windows + BARS_PER_PHRASE - 1
    bars = grid[: n_bars * STEPS_PER_BAR].reshape(n_bars, STEPS_PER_BAR, N_COLUMNS)
    keep = np.ones(n_windows, dtype=bool)
    for columns in (slice(0, N_DRUM_CLASSES), slice(N_DRUM_CLASSES, N_COLUMNS)):
        total = np.concatenate([[0], np.cumsum(bars[:, :, columns].sum(axis=(1, 2)))])
        keep &= total[BARS_PER_PHRASE:] - total[:n_windows] >= MIN_ACTIVE_CELLS
    start_bars = np.flatnonzero(keep)
    rows = start_bars[:, None] * STEPS_PER_BAR + np.arange(PHRASE_STEPS)
    return grid[rows], start_bars


def midi_to_windows(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Phrases (N, 128, 57) bool of one MIDI file and the start bar of each; ``SkipFile`` if unusable.

    A readable, eligible file without a qualifying window gives N = 0.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise SkipFile("unreadable", str(error)) from error
    if len(data) > MAX_FILE_BYTES:
        raise SkipFile("too_large", f"{len(data)} bytes")
    ticks_per_beat, tracks = _chunks(data)
    events = _read_events(data, tracks)
    _check_meta(events)
    drums, bass = _chosen_tracks(events, ticks_per_beat)
    return window_phrases(_grid(drums, bass, ticks_per_beat))


def midi_to_phrases(path: str | Path) -> np.ndarray:
    """Phrases (N, 128, 57) bool of one MIDI file (see ``midi_to_windows``)."""
    return midi_to_windows(path)[0]
