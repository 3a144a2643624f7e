"""Bass+drum pianoroll phrases (LOOPS.md sections 1 and 8) and their bit-packed on-disk cache.

- ``midi_to_windows`` / ``midi_to_phrases``: one Standard MIDI File -> binary phrases (N, 128, 57):
  8 bars x 16 sixteenth steps, columns 0-8 drum classes, 9-56 bass pitches 24..71.
- ``phrases_to_midi``: phrases -> playable MIDI (bass program 33, drums on channel 10).
- ``ingest`` (also ``python -m datamodules.pianoroll SRC OUT [--workers N]``): a folder of MIDI files ->
  a resumable cache of shards; ``load_phrase_cache`` / ``load_phrases`` / ``write_phrase_cache`` read
  and write it, ``unpack_phrases`` unpacks on whatever device the packed tensor lives on.

The MIDI reader is our own: one compiled pass locates the events (a sequential job by nature) and
everything after it - note pairing, programs, track choice, quantisation, windows - is numpy array
work, which is what makes bulk ingest of the Lakh MIDI set fast. Notes are read as pretty_midi reads them: a note-on is closed by the first later note-off of
the same track, channel and pitch at a later tick, unclosed notes are dropped, the program is the one
in force on the note's channel when it closes, and "tracks" are pretty_midi's instruments (track,
channel, program) in the order their first note closes. Unlike pretty_midi, time-signature events are
read from every track, not only the first.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numba
import numpy as np
import pretty_midi
from tqdm import tqdm

from framework.io import atomic_path

if TYPE_CHECKING:
    import torch

STEPS_PER_BEAT = 4
STEPS_PER_BAR = 16
BARS_PER_PHRASE = 8
PHRASE_STEPS = STEPS_PER_BAR * BARS_PER_PHRASE  # 128
BASS_LOWEST, BASS_HIGHEST = 24, 71
N_DRUM_CLASSES = 9
N_BASS_PITCHES = BASS_HIGHEST - BASS_LOWEST + 1  # 48
N_COLUMNS = N_DRUM_CLASSES + N_BASS_PITCHES  # 57
PACKED_BYTES = PHRASE_STEPS * N_COLUMNS // 8  # 912
MIN_ACTIVE_CELLS = 32  # per instrument and window
BASS_PROGRAMS = range(32, 40)
DRUM_CHANNEL = 9

# GM drum notes of each class, in column order; the first-listed playback note represents the class.
DRUM_CLASS_NOTES = (
    (35, 36),  # kick
    (37, 38, 39, 40),  # snare
    (42, 44),  # closed hi-hat
    (41, 43, 45),  # low tom
    (46,),  # open hi-hat
    (47, 48),  # mid tom
    (49, 55, 57),  # crash
    (50,),  # high tom
    (51, 59),  # ride
)
DRUM_PLAYBACK_NOTES = (36, 38, 42, 45, 46, 47, 49, 50, 51)
BASS_PLAYBACK_PROGRAM = 33

# Guards against pathological files: each would otherwise cost memory out of proportion to its music.
MAX_FILE_BYTES = 16 * 2**20
MAX_STEPS = 4096 * STEPS_PER_BAR
MAX_BPM = 1000.0

_DRUM_CLASS_OF_NOTE = np.full(128, -1, dtype=np.int64)
for _column, _notes in enumerate(DRUM_CLASS_NOTES):
    _DRUM_CLASS_OF_NOTE[list(_notes)] = _column

_NO_WINDOWS = (np.zeros((0, PHRASE_STEPS, N_COLUMNS), dtype=bool), np.zeros(0, dtype=np.int64))

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


# --------------------------------------------------------------------------------------------------
# Standard MIDI File reading
# --------------------------------------------------------------------------------------------------


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
        return _NO_WINDOWS
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


# --------------------------------------------------------------------------------------------------
# Playback
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Packed phrases and the phrase cache
# --------------------------------------------------------------------------------------------------

REPORT_NAME = "report.json"
_SHARD_PATTERN = "shard-{:06d}.npz"


def pack_phrases(phrases: np.ndarray) -> np.ndarray:
    """(N, 128, 57) bool -> (N, 912) uint8, the cells of each phrase in row-major order, 8 to a byte."""
    phrases = np.asarray(phrases, dtype=bool)
    return np.packbits(phrases.reshape(len(phrases), PHRASE_STEPS * N_COLUMNS), axis=1)


def unpack_phrases(packed: torch.Tensor) -> torch.Tensor:
    """(N, 912) uint8 -> (N, 128, 57) bool, with torch ops on the tensor's own device."""
    import torch  # here, not at the top: ingest worker processes start much faster without torch

    if packed.dtype != torch.uint8 or packed.shape[-1] != PACKED_BYTES:
        raise ValueError(f"expected uint8 (N, {PACKED_BYTES}), got {packed.dtype} {tuple(packed.shape)}")
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], PHRASE_STEPS, N_COLUMNS).bool()


@dataclass
class PhraseCache:
    """A phrase cache in memory: packed phrases with the source file (relative path) and start bar of each."""

    packed: np.ndarray  # (N, 912) uint8
    sources: np.ndarray  # (N,) str (object array sharing one string per file)
    start_bars: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.packed)

    def subset(self, index: np.ndarray) -> "PhraseCache":
        """The phrases selected by an index or boolean mask."""
        return PhraseCache(self.packed[index], self.sources[index], self.start_bars[index])


def _write_shard(path: Path, packed, phrase_file, start_bars, files, file_phrases, file_reasons) -> None:
    """One shard: phrases (packed, index into ``files``, start bar) and the outcome of each file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(
            handle,
            packed=np.asarray(packed, dtype=np.uint8).reshape(-1, PACKED_BYTES),
            phrase_file=np.asarray(phrase_file, dtype=np.int64),
            start_bars=np.asarray(start_bars, dtype=np.int64),
            files=np.asarray(files, dtype=str),
            file_phrases=np.asarray(file_phrases, dtype=np.int64),
            file_reasons=np.asarray(file_reasons, dtype=str),
        )


def _write_report(out: Path, report: dict) -> None:
    with atomic_path(out / REPORT_NAME) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")


def write_phrase_cache(out: str | Path, packed: np.ndarray, sources, start_bars, report: dict | None = None) -> None:
    """Write phrases (e.g. a subset of another cache) as a phrase cache folder, atomically.

    ``report`` (optional) is stored in report.json alongside the phrase count and shard list.
    """
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.ndim != 2 or packed.shape[1] != PACKED_BYTES:
        raise ValueError(f"packed must be (N, {PACKED_BYTES}) uint8, got {packed.shape}")
    sources = np.asarray(sources, dtype=str)
    start_bars = np.asarray(start_bars)
    if not len(sources) == len(start_bars) == len(packed):
        raise ValueError(f"{len(packed)} phrases but {len(sources)} sources and {len(start_bars)} start bars")
    files, phrase_file, file_phrases = np.unique(sources, return_inverse=True, return_counts=True)
    shard = _SHARD_PATTERN.format(0)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        _write_shard(tmp / shard, packed, phrase_file, start_bars, files, file_phrases, [""] * len(files))
        _write_report(tmp, {**(report or {}), "phrases": len(packed), "shards": [shard]})


def _read_report(cache: Path) -> dict:
    report_path = Path(cache) / REPORT_NAME
    if not report_path.is_file():
        raise FileNotFoundError(
            f"no phrase cache at {cache} ({REPORT_NAME} missing): build one with "
            f"`python -m datamodules.pianoroll MIDI_FOLDER {cache}`"
        )
    return json.loads(report_path.read_text())


def load_phrase_cache(cache: str | Path) -> PhraseCache:
    """All phrases of a cache folder written by ``ingest`` or ``write_phrase_cache``, in shard order."""
    cache = Path(cache)
    packed, sources, start_bars = [np.zeros((0, PACKED_BYTES), np.uint8)], [np.zeros(0, object)], [np.zeros(0, np.int64)]
    for shard in _read_report(cache)["shards"]:
        with np.load(cache / shard) as arrays:
            if arrays["packed"].shape[1:] != (PACKED_BYTES,):
                raise ValueError(f"{cache / shard}: packed phrases have shape {arrays['packed'].shape}")
            packed.append(arrays["packed"])
            sources.append(arrays["files"].astype(object)[arrays["phrase_file"]])
            start_bars.append(arrays["start_bars"])
    return PhraseCache(np.concatenate(packed), np.concatenate(sources), np.concatenate(start_bars))


def load_phrases(cache: str | Path) -> np.ndarray:
    """All phrases of a cache folder, unpacked to (N, 128, 57) bool."""
    packed = load_phrase_cache(cache).packed
    return np.unpackbits(packed, axis=1).reshape(len(packed), PHRASE_STEPS, N_COLUMNS).astype(bool)


# --------------------------------------------------------------------------------------------------
# Bulk ingest
# --------------------------------------------------------------------------------------------------

NO_PHRASES = "no_phrases"
PARSE_ERROR = "parse_error"
_REPORT_EXAMPLES = 5


def _ingest_chunk(job: tuple[str, str, list[str]]) -> int:
    """Convert one chunk of files into one shard; returns the number of files processed."""
    src, shard, files = job
    packed, phrase_file, start_bars, file_phrases, file_reasons = [], [], [], [], []
    for index, name in enumerate(files):
        phrases, starts, reason = _NO_WINDOWS[0], _NO_WINDOWS[1], ""
        try:
            phrases, starts = midi_to_windows(Path(src) / name)
            reason = "" if len(phrases) else NO_PHRASES
        except SkipFile as skip:
            reason = skip.reason
        except Exception as error:  # a defect met in one file must not stop a run over 100,000s of them
            reason = f"{PARSE_ERROR}:{type(error).__name__}"
        packed.append(pack_phrases(phrases))
        phrase_file.append(np.full(len(phrases), index))
        start_bars.append(starts)
        file_phrases.append(len(phrases))
        file_reasons.append(reason)
    _write_shard(
        Path(shard),
        np.concatenate(packed),
        np.concatenate(phrase_file),
        np.concatenate(start_bars),
        files,
        file_phrases,
        file_reasons,
    )
    return len(files)


def _shard_is_current(shard: Path, files: list[str]) -> bool:
    """True when a shard exists and was made from exactly these files (so a re-run may skip it)."""
    if not shard.is_file():
        return False
    try:
        with np.load(shard) as arrays:
            return arrays["files"].tolist() == files
    except (OSError, ValueError, KeyError):
        return False


def _midi_files(src: Path) -> list[str]:
    suffixes = {".mid", ".midi"}
    return sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.suffix.lower() in suffixes and p.is_file())


def ingest(src: str | Path, out: str | Path, workers: int = 1, chunk_size: int = 256, progress: bool = True) -> dict:
    """Convert every MIDI file under ``src`` into a phrase cache at ``out``; returns the report.

    Files are taken in sorted relative-path order, ``chunk_size`` to a shard; each shard is written
    atomically and a re-run skips the shards that already hold their chunk, so an interrupted run
    resumes. ``workers`` > 1 converts chunks in that many spawned processes; the cache is the same.
    ``out/report.json`` (written last) counts files seen, files used, phrases and skip reasons.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"MIDI folder not found: {src}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    files = _midi_files(src)
    chunks = [files[i : i + chunk_size] for i in range(0, len(files), chunk_size)]
    shards = [out / _SHARD_PATTERN.format(i) for i in range(len(chunks))]
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(str(src), str(shard), chunk) for shard, chunk in zip(shards, chunks) if not _shard_is_current(shard, chunk)]
    with tqdm(total=len(files), initial=len(files) - sum(len(job[2]) for job in jobs), unit="file", desc="ingest", disable=not progress) as bar:
        # The first chunk runs here, so the compiled MIDI scanner is cached before worker
        # processes start: numba's on-disk cache is not safe against concurrent first writes.
        serial, parallel = (jobs, []) if workers <= 1 or len(jobs) <= 1 else (jobs[:1], jobs[1:])
        for job in serial:
            bar.update(_ingest_chunk(job))
        if parallel:
            with multiprocessing.get_context("spawn").Pool(min(workers, len(parallel))) as pool:
                for done in pool.imap_unordered(_ingest_chunk, parallel):
                    bar.update(done)
    report = _summarise(shards)
    report["source"] = str(src)
    report["chunk_size"] = chunk_size
    _write_report(out, report)
    return report


def _summarise(shards: list[Path]) -> dict:
    """The ingest report, rebuilt from the per-file outcomes stored in the shards."""
    skipped: Counter = Counter()
    examples: dict[str, list[str]] = {}
    files_seen = files_used = phrases = 0
    for shard in shards:
        with np.load(shard) as arrays:
            files, counts, reasons = arrays["files"], arrays["file_phrases"], arrays["file_reasons"]
        files_seen += len(files)
        files_used += int(np.count_nonzero(counts))
        phrases += int(counts.sum())
        for name, reason in zip(files[reasons != ""], reasons[reasons != ""]):
            skipped[str(reason)] += 1
            if len(examples.setdefault(str(reason), [])) < _REPORT_EXAMPLES:
                examples[str(reason)].append(str(name))
    return {
        "files_seen": files_seen,
        "files_used": files_used,
        "phrases": phrases,
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": dict(sorted(examples.items())),
        "shards": [shard.name for shard in shards],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Convert a folder of MIDI files into a bass+drum phrase cache.")
    parser.add_argument("src", type=Path, help="folder searched recursively for .mid/.midi files")
    parser.add_argument("out", type=Path, help="cache folder (shards + report.json); an existing one is resumed")
    parser.add_argument("--workers", type=int, default=1, help="processes converting chunks in parallel")
    parser.add_argument("--chunk-size", type=int, default=256, help="files per shard")
    args = parser.parse_args(argv)
    report = ingest(args.src, args.out, workers=args.workers, chunk_size=args.chunk_size)
    print(
        f"{report['files_seen']} files, {report['files_used']} used, {report['phrases']} phrases; "
        f"skipped: {json.dumps(report['skipped'])}; report: {args.out / REPORT_NAME}"
    )
    return report


if __name__ == "__main__":
    main()
