"""Standard MIDI File -> bass+drum pianoroll phrases (LOOPS.md section 1).

The reader is our own, compiled with numba: one pass locates the events, a second pairs notes,
follows programs, picks the tracks and fills the grid, and a third counts the cells of each
window; Python only reads the file and its chunk headers. That is what makes bulk ingest of the
Lakh MIDI set fast (``benchmarks/ingest.py``). The compiled code indexes only positions it has
checked against the file's length, so a hostile file is a counted skip, never a crash.

Notes are read as pretty_midi reads them: a note-off closes every pending note-on of the same
track, channel and pitch that began at an earlier tick (an off that closes none drops the notes
begun at its own tick, so zero-length notes vanish), unclosed notes are dropped, the program is
the one in force on the note's channel when it closes, and "tracks" are pretty_midi's instruments
(track, channel, program) in the order their first note closes. Unlike pretty_midi, time-signature
events are read from every track, not only the first.
"""
from __future__ import annotations

import os
import struct
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
    PACKED_BYTES,
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


# Reasons the compiled reader returns by code, in the order they are checked.
_REASONS = ("", "no_time_signature", "not_4_4", "absurd_tempo", "too_long", "no_drums", "no_bass")
_DETAILS = {"absurd_tempo": f"a tempo is zero or faster than {MAX_BPM:g} BPM",
            "too_long": f"notes beyond {MAX_STEPS // STEPS_PER_BAR} bars"}
_KEYS = 16 * 128  # (channel, pitch) pairs of one track
_BASS_FIRST, _BASS_END = BASS_PROGRAMS.start, BASS_PROGRAMS.stop


@numba.njit(cache=True, nogil=True)
def _chosen_notes(b, track, delta, status, data_at, meta_type, meta_length, count, ticks_per_beat):  # pragma: no cover - compiled
    """Check the meta events and pair the notes of the first drum and the first bass instrument.

    Returns (reason code, pitch, onset tick, offset tick, notes kept), the note arrays indexed
    [0] for the drums and [1] for the bass. Notes pair as pretty_midi pairs them: a note-off (or a
    note-on of velocity 0) closes every pending note-on of its track, channel and pitch that
    began at an earlier tick, and if there is none it drops those that began at its own tick
    (zero-length notes). A note's instrument is (track, channel, the program in force on that
    channel when it closes, 0 before any change); the first drum and the first bass instrument
    are those whose first note closes first.
    """
    signatures = bad_signatures = bad_tempi = note_ons = 0
    last_note_tick = -1
    # Pending note-ons of each (channel, pitch) of the current track: a FIFO linked through next_on.
    head = np.full(_KEYS, -1, np.int64)
    tail = np.full(_KEYS, -1, np.int64)
    owner = np.full(_KEYS, -1, np.int64)  # the track a key's list belongs to (lists of older tracks are stale)
    next_on = np.empty(count, np.int64)
    on_tick = np.empty(count, np.int64)
    program = np.zeros(16, np.int64)
    program_track = np.full(16, -1, np.int64)
    chosen = np.full(2, -1, np.int64)  # instrument of the drums and of the bass: (track * 16 + channel) * 128 + program
    n_notes = np.zeros(2, np.int64)
    pitches = np.empty((2, count), np.int64)
    onsets = np.empty((2, count), np.int64)
    offsets = np.empty((2, count), np.int64)
    tick = 0
    for i in range(count):
        t = track[i]
        tick = delta[i] if i == 0 or track[i - 1] != t else tick + delta[i]
        if meta_type[i] == 0x58:
            signatures += 1
            at = data_at[i]
            if meta_length[i] < 2 or b[at] != 4 or b[at + 1] != 2:
                bad_signatures += 1
        elif meta_type[i] == 0x51:
            at = data_at[i]
            microseconds = (np.int64(b[at]) << 16) | (np.int64(b[at + 1]) << 8) | np.int64(b[at + 2])
            if meta_length[i] < 3 or microseconds * MAX_BPM < 60e6:
                bad_tempi += 1
        kind, channel = status[i] & 0xF0, status[i] & 0x0F
        if kind == 0xC0:
            program[channel], program_track[channel] = b[data_at[i]], t
            continue
        if kind != 0x80 and kind != 0x90:
            continue
        pitch, velocity = np.int64(b[data_at[i]]), b[data_at[i] + 1]
        last_note_tick = max(last_note_tick, tick)
        key = channel * 128 + pitch
        if owner[key] != t:
            owner[key], head[key] = t, -1
        if kind == 0x90 and velocity > 0:
            note_ons += 1
            on_tick[i], next_on[i] = tick, -1
            if head[key] == -1:
                head[key] = i
            else:
                next_on[tail[key]] = i
            tail[key] = i
            continue
        current = program[channel] if program_track[channel] == t else 0
        if channel == DRUM_CHANNEL:
            role = 0
        elif _BASS_FIRST <= current < _BASS_END:
            role = 1
        else:
            role = -1
        instrument = (t * 16 + channel) * 128 + current
        closed = False
        while head[key] != -1 and on_tick[head[key]] < tick:
            if role >= 0:
                if chosen[role] == -1:
                    chosen[role] = instrument
                if chosen[role] == instrument:
                    k = n_notes[role]
                    pitches[role, k], onsets[role, k], offsets[role, k] = pitch, on_tick[head[key]], tick
                    n_notes[role] = k + 1
            head[key] = next_on[head[key]]
            closed = True
        if not closed:  # an off that closes nothing drops the notes begun at its own tick
            head[key] = -1

    reason = 0
    if signatures == 0:
        reason = 1
    elif bad_signatures:
        reason = 2
    elif bad_tempi:
        reason = 3
    elif note_ons and STEPS_PER_BEAT * last_note_tick // ticks_per_beat > MAX_STEPS:
        reason = 4
    elif n_notes[0] == 0:
        reason = 5
    elif n_notes[1] == 0:
        reason = 6
    return reason, pitches, onsets, offsets, n_notes


@numba.njit(cache=True, nogil=True)
def _notes_grid(pitches, onsets, offsets, n_notes, ticks_per_beat, drum_class_of_note):  # pragma: no cover - compiled
    """The (steps, 57) grid of the chosen notes: drum onsets on step floor(4 beats), bass from
    floor(4 on) to ceil(4 off) - 1 (at least one step), the lowest sounding pitch per step; the
    song spans step 0 to the last step either instrument occupies."""
    steps = 0
    for k in range(n_notes[0]):
        if drum_class_of_note[pitches[0, k]] >= 0:
            steps = max(steps, STEPS_PER_BEAT * onsets[0, k] // ticks_per_beat + 1)
    # Bass notes in range as +1 at their first step and -1 after their last.
    n_changes = 0
    change_pitch = np.empty(2 * n_notes[1], np.int64)
    change_sign = np.empty(2 * n_notes[1], np.int64)
    change_step = np.empty(2 * n_notes[1], np.int64)
    for k in range(n_notes[1]):
        if BASS_LOWEST <= pitches[1, k] <= BASS_HIGHEST:
            on = STEPS_PER_BEAT * onsets[1, k] // ticks_per_beat
            off = max(-(-STEPS_PER_BEAT * offsets[1, k] // ticks_per_beat), on + 1)
            steps = max(steps, off)
            change_pitch[n_changes], change_sign[n_changes], change_step[n_changes] = pitches[1, k] - BASS_LOWEST, 1, on
            change_pitch[n_changes + 1], change_sign[n_changes + 1], change_step[n_changes + 1] = pitches[1, k] - BASS_LOWEST, -1, off
            n_changes += 2
    grid = np.zeros((steps, N_COLUMNS), np.bool_)
    for k in range(n_notes[0]):
        column = drum_class_of_note[pitches[0, k]]
        if column >= 0:
            grid[STEPS_PER_BEAT * onsets[0, k] // ticks_per_beat, column] = True
    # The changes listed per step; sweeping the steps, the lowest sounding pitch can only change
    # where a note starts or ends.
    first_change = np.full(steps + 1, -1, np.int64)
    next_change = np.empty(n_changes, np.int64)
    for c in range(n_changes):
        next_change[c], first_change[change_step[c]] = first_change[change_step[c]], c
    sounding = np.zeros(N_BASS_PITCHES, np.int64)
    lowest = -1
    for step in range(steps):
        c = first_change[step]
        if c != -1:
            while c != -1:
                sounding[change_pitch[c]] += change_sign[c]
                c = next_change[c]
            lowest = -1
            for p in range(N_BASS_PITCHES):
                if sounding[p] > 0:
                    lowest = p
                    break
        if lowest >= 0:
            grid[step, N_DRUM_CLASSES + lowest] = True
    return grid


@numba.njit(cache=True, nogil=True)
def _song_grid(b, starts, ends, data_bytes, ticks_per_beat, drum_class_of_note):  # pragma: no cover - compiled
    """The song's (steps, 57) grid from the file bytes ``b`` and its track chunks ``b[starts[t]:ends[t]]``.

    Returns (scan error, reason code, grid); the grid is empty unless both codes are 0.
    """
    capacity = 1
    for t in range(len(starts)):
        capacity += (ends[t] - starts[t]) // 2  # every event takes at least two bytes
    track = np.empty(capacity, np.int64)
    delta = np.empty(capacity, np.int64)
    status = np.empty(capacity, np.int64)
    data_at = np.empty(capacity, np.int64)
    meta_type = np.empty(capacity, np.int64)
    meta_length = np.empty(capacity, np.int64)
    count, error = _scan(b, starts, ends, data_bytes, track, delta, status, data_at, meta_type, meta_length)
    if error:
        return error, 0, np.zeros((0, N_COLUMNS), np.bool_)
    reason, pitches, onsets, offsets, n_notes = _chosen_notes(
        b, track, delta, status, data_at, meta_type, meta_length, count, ticks_per_beat
    )
    if reason:
        return 0, reason, np.zeros((0, N_COLUMNS), np.bool_)
    return 0, 0, _notes_grid(pitches, onsets, offsets, n_notes, ticks_per_beat, drum_class_of_note)


@numba.njit(cache=True, nogil=True)
def _window_starts(grid):  # pragma: no cover - compiled
    """Start bars of the full 8-bar windows (1-bar stride) with >= 32 drum and >= 32 bass cells."""
    n_windows = max((len(grid) - PHRASE_STEPS) // STEPS_PER_BAR + 1, 0)
    n_bars = n_windows + BARS_PER_PHRASE - 1 if n_windows else 0
    drums = np.zeros(n_bars + 1, np.int64)  # cumulative active cells of each instrument, bar by bar
    bass = np.zeros(n_bars + 1, np.int64)
    for bar in range(n_bars):
        d = m = 0
        for step in range(bar * STEPS_PER_BAR, (bar + 1) * STEPS_PER_BAR):
            for column in range(N_DRUM_CLASSES):
                d += grid[step, column]
            for column in range(N_DRUM_CLASSES, N_COLUMNS):
                m += grid[step, column]
        drums[bar + 1], bass[bar + 1] = drums[bar] + d, bass[bar] + m
    keep = np.empty(n_windows, np.int64)
    n = 0
    for start in range(n_windows):
        stop = start + BARS_PER_PHRASE
        if drums[stop] - drums[start] >= MIN_ACTIVE_CELLS and bass[stop] - bass[start] >= MIN_ACTIVE_CELLS:
            keep[n] = start
            n += 1
    return keep[:n]


@numba.njit(cache=True, nogil=True)
def _packed_windows(grid):  # pragma: no cover - compiled
    """The qualifying windows of a grid bit-packed, (N, 912) uint8, and their start bars.

    A bar is 16 x 57 = 912 cells, a whole number of bytes: each bar is packed once (cells in
    row-major order, most significant bit first, as ``np.packbits``) and a window is the bytes
    of its 8 bars.
    """
    start_bars = _window_starts(grid)
    packed = np.zeros((len(start_bars), PACKED_BYTES), np.uint8)
    if len(start_bars) == 0:
        return packed, start_bars
    bar_bytes = PACKED_BYTES // BARS_PER_PHRASE
    bars = np.zeros((start_bars[-1] + BARS_PER_PHRASE, bar_bytes), np.uint8)
    for bar in range(len(bars)):
        bit = 0
        for step in range(bar * STEPS_PER_BAR, (bar + 1) * STEPS_PER_BAR):
            for column in range(N_COLUMNS):
                if grid[step, column]:
                    bars[bar, bit >> 3] = bars[bar, bit >> 3] | (128 >> (bit & 7))
                bit += 1
    for i in range(len(start_bars)):
        for j in range(BARS_PER_PHRASE):
            for k in range(bar_bytes):
                packed[i, j * bar_bytes + k] = bars[start_bars[i] + j, k]
    return packed, start_bars


def window_phrases(grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Phrases (N, 128, 57) of a song grid and their start bars: every full 8-bar window at a 1-bar
    stride with at least 32 active drum cells and 32 active bass cells."""
    start_bars = _window_starts(np.ascontiguousarray(grid, dtype=np.bool_))
    if len(start_bars) == 0:
        return NO_WINDOWS
    rows = start_bars[:, None] * STEPS_PER_BAR + np.arange(PHRASE_STEPS)
    return grid[rows], start_bars


def compile_kernels() -> None:
    """Compile (or load from numba's on-disk cache) the reader's kernels for the types files give.

    Bulk ingest calls this before starting worker processes, so that they all load one finished
    cache: numba's cache is not safe against concurrent first compiles.
    """
    empty = np.zeros(0, dtype=np.int64)
    _, _, grid = _song_grid(np.frombuffer(bytes(_PAD), dtype=np.uint8), empty, empty, _DATA_BYTES, 1, _DRUM_CLASS_OF_NOTE)
    _window_starts(grid)
    _packed_windows(grid)


def _song_grid_of(path: str | Path) -> np.ndarray:
    """The (steps, 57) grid of one MIDI file; ``SkipFile`` if the file is unusable."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > MAX_FILE_BYTES:
                raise SkipFile("too_large", f"{size} bytes")
            data = handle.read()
    except OSError as error:
        raise SkipFile("unreadable", str(error)) from error
    ticks_per_beat, tracks = _chunks(data)
    b = np.frombuffer(data + bytes(_PAD), dtype=np.uint8)
    starts = np.array([start for start, _ in tracks], dtype=np.int64)
    ends = np.array([end for _, end in tracks], dtype=np.int64)
    error, reason, grid = _song_grid(b, starts, ends, _DATA_BYTES, ticks_per_beat, _DRUM_CLASS_OF_NOTE)
    if error:
        raise SkipFile("unreadable", _SCAN_ERRORS[error])
    if reason:
        raise SkipFile(_REASONS[reason], _DETAILS.get(_REASONS[reason], ""))
    return grid


def midi_to_windows(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Phrases (N, 128, 57) bool of one MIDI file and the start bar of each; ``SkipFile`` if unusable.

    A readable, eligible file without a qualifying window gives N = 0.
    """
    return window_phrases(_song_grid_of(path))


def midi_to_packed_windows(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``midi_to_windows`` with the phrases bit-packed, (N, 912) uint8 as ``pack_phrases`` packs
    them; the (N, 128, 57) phrases are never formed."""
    return _packed_windows(_song_grid_of(path))


def midi_to_phrases(path: str | Path) -> np.ndarray:
    """Phrases (N, 128, 57) bool of one MIDI file (see ``midi_to_windows``)."""
    return midi_to_windows(path)[0]
