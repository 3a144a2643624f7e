"""MIDI -> phrase rules of LOOPS.md section 1, playback (section 8) and phrase packing."""
from __future__ import annotations

import mido
import numpy as np
import pretty_midi
import pytest
import torch

from datamodules.pianoroll import (
    DRUM_CLASS_NOTES,
    SkipFile,
    midi_to_phrases,
    midi_to_windows,
    pack_phrases,
    phrases_to_midi,
    unpack_phrases,
)

TICKS = 480
KICK, SNARE, CLOSED_HAT = 36, 38, 42


def write_midi(path, tracks, time_signatures=((0, 4, 4),), tempos=((0, 500000),), ticks_per_beat=TICKS):
    """A type-1 MIDI file. ``tracks``: (channel, program, notes) with notes (pitch, start beat, end beat);
    ``time_signatures``: (beat, numerator, denominator); ``tempos``: (beat, microseconds per beat)."""
    def messages_to_track(timed):
        track, now = mido.MidiTrack(), 0
        for tick, _, message in sorted(timed, key=lambda item: item[:2]):
            track.append(message.copy(time=tick - now))
            now = tick
        return track

    meta = [(round(b * ticks_per_beat), 0, mido.MetaMessage("time_signature", numerator=n, denominator=d)) for b, n, d in time_signatures]
    meta += [(round(b * ticks_per_beat), 0, mido.MetaMessage("set_tempo", tempo=t)) for b, t in tempos]
    midi = mido.MidiFile(ticks_per_beat=ticks_per_beat)
    midi.tracks.append(messages_to_track(meta))
    for channel, program, notes in tracks:
        timed = [(0, 0, mido.Message("program_change", channel=channel, program=program))]
        for pitch, start, end in notes:
            timed.append((round(start * ticks_per_beat), 2, mido.Message("note_on", channel=channel, note=pitch, velocity=100)))
            timed.append((round(end * ticks_per_beat), 1, mido.Message("note_off", channel=channel, note=pitch, velocity=0)))
        midi.tracks.append(messages_to_track(timed))
    midi.save(path)
    return path


def groove(bars, kick=KICK, bass_pitch=40):
    """Drums (kick on beats, closed hat on eighths: 12 cells a bar) and bass (quarter notes: 16 cells a bar)."""
    drums = [(kick, b, b + 0.25) for b in range(4 * bars)] + [(CLOSED_HAT, b / 2, b / 2 + 0.25) for b in range(8 * bars)]
    bass = [(bass_pitch, b, b + 1) for b in range(4 * bars)]
    return drums, bass


def song(path, bars=8, drums=None, bass=None, **kwargs):
    default_drums, default_bass = groove(bars)
    return write_midi(path, [(9, 0, default_drums if drums is None else drums), (0, 33, default_bass if bass is None else bass)], **kwargs)


def test_groove_gives_one_phrase_per_bar_offset(tmp_path):
    phrases, start_bars = midi_to_windows(song(tmp_path / "a.mid", bars=10))
    assert phrases.shape == (3, 128, 57) and phrases.dtype == bool
    assert start_bars.tolist() == [0, 1, 2]
    assert phrases[0, :16, 0].nonzero()[0].tolist() == [0, 4, 8, 12]  # kick column
    assert phrases[0, :16, 2].nonzero()[0].tolist() == [0, 2, 4, 6, 8, 10, 12, 14]  # closed hat
    assert phrases[0, :, 9 + 40 - 24].all() and phrases[0, :, 9:].sum() == 128  # bass held throughout


@pytest.mark.parametrize(
    "signatures, reason",
    [(((0, 3, 4),), "not_4_4"), (((0, 4, 4), (16, 3, 4)), "not_4_4"), (((0, 4, 8),), "not_4_4"), ((), "no_time_signature")],
)
def test_time_signature_filter(tmp_path, signatures, reason):
    with pytest.raises(SkipFile) as skip:
        midi_to_phrases(song(tmp_path / "a.mid", time_signatures=signatures))
    assert skip.value.reason == reason


def test_time_signature_on_another_track_counts(tmp_path):
    drums, bass = groove(8)
    path = write_midi(tmp_path / "a.mid", [(9, 0, drums), (0, 33, bass)], time_signatures=())
    midi = mido.MidiFile(path)
    midi.tracks[2].insert(0, mido.MetaMessage("time_signature", numerator=3, denominator=4))
    midi.save(path)
    with pytest.raises(SkipFile, match="not_4_4"):
        midi_to_phrases(path)


def test_tempo_changes_do_not_move_the_grid(tmp_path):
    steady = midi_to_phrases(song(tmp_path / "steady.mid"))
    changing = midi_to_phrases(song(tmp_path / "changing.mid", tempos=((0, 500000), (3.5, 300000), (13, 900000))))
    assert len(steady) == 1
    np.testing.assert_array_equal(changing, steady)


def test_absurd_tempo_skipped(tmp_path):
    with pytest.raises(SkipFile, match="absurd_tempo"):
        midi_to_phrases(song(tmp_path / "a.mid", tempos=((0, 500000), (4, 10))))


def test_bass_range_dropped_not_transposed(tmp_path):
    drums, bass = groove(8)
    edges = [(23, 0, 1), (24, 1, 2), (71, 2, 3), (72, 3, 4)]
    phrases = midi_to_phrases(song(tmp_path / "a.mid", bass=edges + bass[4:]))
    first_beat = phrases[0, :16, 9:]
    assert first_beat[0:4].sum() == 0  # pitch 23 dropped
    assert first_beat[4:8, 0].all() and first_beat[8:12, 47].all()  # 24 -> column 9, 71 -> column 56
    assert first_beat[12:16].sum() == 0  # pitch 72 dropped


def test_lowest_bass_note_wins(tmp_path):
    _, bass = groove(8)
    phrases = midi_to_phrases(song(tmp_path / "a.mid", bass=bass + [(30, 0, 2), (50, 1, 3)]))
    columns = phrases[0, :16, 9:].argmax(axis=1) + 24
    assert columns.tolist() == [30] * 8 + [40] * 8
    assert (phrases[0, :, 9:].sum(axis=1) == 1).all()


def test_held_bass_note_covers_floor_on_to_ceil_off(tmp_path):
    _, bass = groove(8)
    notes = [(45, 0.5, 1.3), (47, 2.0, 2.05)] + bass[3:]  # steps 2..5 and one step at 8
    phrases = midi_to_phrases(song(tmp_path / "a.mid", bass=notes))
    active = phrases[0, :12, 9:].any(axis=1).nonzero()[0].tolist()
    assert active == [2, 3, 4, 5, 8]
    assert phrases[0, 2:6, 9 + 45 - 24].all() and phrases[0, 8, 9 + 47 - 24]


def test_drum_class_mapping_and_unmapped_notes(tmp_path):
    drums, bass = groove(8, kick=35)
    mapping = [(note, column) for column, notes in enumerate(DRUM_CLASS_NOTES) for note in notes]
    probes = [(note, 0.25 * i, 0.25 * i + 0.1) for i, (note, _) in enumerate(mapping)]
    phrases = midi_to_phrases(song(tmp_path / "a.mid", drums=drums + probes + [(70, 0.75, 1.0)], bass=bass))
    for i, (note, column) in enumerate(mapping):
        assert phrases[0, i, column], (note, column)
    expected = np.zeros((len(mapping), 9), dtype=bool)
    expected[np.arange(len(mapping)), [column for _, column in mapping]] = True
    expected[0:len(mapping):4, 0] = True  # the groove's kicks (35) on the beats
    expected[0:len(mapping):2, 2] = True  # and closed hats on the eighths
    np.testing.assert_array_equal(phrases[0, : len(mapping), :9], expected)  # note 70 left no trace


def test_drums_mark_the_onset_only(tmp_path):
    drums, bass = groove(8)
    phrases = midi_to_phrases(song(tmp_path / "a.mid", drums=drums + [(SNARE, 0.5, 3.0)], bass=bass))
    assert phrases[0, :, 1].nonzero()[0].tolist() == [2]


@pytest.mark.parametrize("instrument", ["drums", "bass"])
@pytest.mark.parametrize("count, expected", [(32, 1), (31, 0)])
def test_window_needs_32_active_cells_of_each_instrument(tmp_path, instrument, count, expected):
    drums, bass = groove(8)
    pitch = KICK if instrument == "drums" else 40
    sparse = [(pitch, 0.25 * i, 0.25 * i + 0.1) for i in range(0, 4 * count, 4)]  # `count` one-step cells
    if instrument == "drums":
        drums = sparse
    else:
        bass, drums = sparse, drums + [(KICK, 31.75, 31.9)]  # the kick keeps the song 128 steps long
    assert len(midi_to_phrases(song(tmp_path / "a.mid", drums=drums, bass=bass))) == expected


def test_window_must_lie_inside_the_song(tmp_path):
    drums, bass = groove(8)
    bass[-1] = (40, 31, 31.75)  # the song now ends at step 126
    assert len(midi_to_phrases(song(tmp_path / "short.mid", drums=[d for d in drums if d[1] < 31.75], bass=bass))) == 0
    assert len(midi_to_phrases(song(tmp_path / "full.mid"))) == 1


def test_first_drum_and_first_bass_tracks_are_chosen(tmp_path):
    drums, bass = groove(8)
    other_drums = [(SNARE, b, b + 0.25) for b in range(32)]
    other_bass = [(60, b, b + 1) for b in range(32)]
    tracks = [(0, 0, other_bass), (9, 0, drums), (1, 34, bass), (9, 0, other_drums), (2, 32, other_bass)]
    phrases = midi_to_phrases(write_midi(tmp_path / "a.mid", tracks))  # track 1 (program 0) is no bass
    assert phrases[0, :, 1].sum() == 0 and phrases[0, :, 0].sum() == 32
    assert phrases[0, :, 9 + 40 - 24].all() and phrases[0, :, 9:].sum() == 128


@pytest.mark.parametrize("tracks, reason", [([(9, 0, groove(8)[0])], "no_bass"), ([(0, 33, groove(8)[1])], "no_drums")])
def test_missing_instrument_skipped(tmp_path, tracks, reason):
    with pytest.raises(SkipFile) as skip:
        midi_to_phrases(write_midi(tmp_path / "a.mid", tracks))
    assert skip.value.reason == reason


def test_matches_pretty_midi_note_reading(tmp_path):
    """Random 16th-grid songs: our grid equals one built from pretty_midi's notes with the same rules."""
    rng = np.random.default_rng(0)
    for seed in range(4):
        drums = [(int(rng.choice([35, 36, 38, 42, 46, 49, 51, 70])), s / 4, s / 4 + 0.25) for s in np.flatnonzero(rng.random(160) < 0.5)]
        bass = [(int(rng.integers(20, 76)), s / 4, s / 4 + int(rng.integers(1, 6)) / 4) for s in np.flatnonzero(rng.random(160) < 0.4)]
        path = write_midi(tmp_path / f"{seed}.mid", [(9, 0, drums), (0, 33, bass)])
        expected = _reference_phrases(pretty_midi.PrettyMIDI(str(path)))
        np.testing.assert_array_equal(midi_to_phrases(path), expected)


def _messy_track(rng, channel, program, ticks_per_beat, bars=12):
    """Events of one track: overlapping and zero-length notes, offs as velocity-0 ons, stray offs,
    a few notes on other channels and program changes mid-track."""
    events = [(0, mido.Message("program_change", channel=channel, program=program))]
    pitches = [35, 36, 38, 42, 46, 49, 51, 70, 20, 24, 30, 40, 55, 71, 72]
    for _ in range(rng.integers(200, 1200)):
        start = int(rng.integers(0, bars * 4 * ticks_per_beat))
        if rng.random() < 0.3:
            start -= start % (ticks_per_beat // 4)
        end = start + int(rng.integers(0, 3 * ticks_per_beat)) * (rng.random() < 0.9)  # one in ten zero-length
        ch = channel if rng.random() < 0.995 else int(rng.integers(0, 16))
        pitch = int(rng.choice(pitches)) if rng.random() < 0.8 else int(rng.integers(0, 128))
        events.append((start, mido.Message("note_on", channel=ch, note=pitch, velocity=int(rng.integers(1, 128)))))
        off = mido.Message("note_off", channel=ch, note=pitch) if rng.random() < 0.5 else mido.Message("note_on", channel=ch, note=pitch, velocity=0)
        if rng.random() < 0.95:
            events.append((end, off))
        if rng.random() < 0.03:
            events.append((int(rng.integers(0, bars * 4 * ticks_per_beat)), off))
        if rng.random() < 0.003:
            events.append((start, mido.Message("program_change", channel=ch, program=int(rng.integers(0, 128)))))
    track, now = mido.MidiTrack(), 0
    for tick, message in sorted(events, key=lambda event: event[0]):  # stable: an off may follow its on at one tick
        track.append(message.copy(time=tick - now))
        now = tick
    return track


def test_matches_pretty_midi_on_messy_tracks(tmp_path):
    """Random multi-track files with overlapping, zero-length and stray notes: the same phrases as pretty_midi's notes."""
    rng = np.random.default_rng(3)
    compared = phrases = 0
    for seed in range(20):
        ticks = int(rng.choice([96, 120, 384, 480]))
        midi = mido.MidiFile(ticks_per_beat=ticks)
        midi.tracks.append(mido.MidiTrack([mido.MetaMessage("time_signature", numerator=4, denominator=4)]))
        for _ in range(rng.integers(1, 5)):
            midi.tracks.append(_messy_track(rng, int(rng.choice([9, 9, 0, 1])), int(rng.choice([0, 33, 34, 38, 5])), ticks))
        path = tmp_path / f"{seed}.mid"
        midi.save(path)
        reference = pretty_midi.PrettyMIDI(str(path))
        has_drums = any(i.is_drum for i in reference.instruments)
        has_bass = any(not i.is_drum and 32 <= i.program <= 39 for i in reference.instruments)
        if not (has_drums and has_bass):
            with pytest.raises(SkipFile, match="no_drums" if not has_drums else "no_bass"):
                midi_to_phrases(path)
            continue
        ours = midi_to_phrases(path)
        np.testing.assert_array_equal(ours, _reference_phrases(reference), err_msg=f"file {seed}")
        compared, phrases = compared + 1, phrases + len(ours)
    assert compared >= 6 and phrases >= 6


def test_zero_length_notes_are_dropped_as_pretty_midi_drops_them(tmp_path):
    drums, bass = groove(8)
    path = song(tmp_path / "a.mid", drums=drums, bass=bass)
    midi = mido.MidiFile(path)
    for track, channel, pitch in ((midi.tracks[1], 9, SNARE), (midi.tracks[2], 0, 30)):
        ticks = np.cumsum([message.time for message in track])
        at = int(np.searchsorted(ticks, 2 * TICKS))  # on and off at beat 2, in that order, and a stray off at beat 20
        track.insert(at, mido.Message("note_off", channel=channel, note=pitch, time=0))
        track.insert(at, mido.Message("note_on", channel=channel, note=pitch, velocity=100, time=2 * TICKS - ticks[at - 1]))
        track[at + 2] = track[at + 2].copy(time=track[at + 2].time - track[at].time)
        stray = int(np.searchsorted(np.cumsum([message.time for message in track]), 20 * TICKS))
        track.insert(stray, mido.Message("note_off", channel=channel, note=pitch, time=0))
    midi.save(path)
    phrases = midi_to_phrases(path)
    np.testing.assert_array_equal(phrases, midi_to_phrases(song(tmp_path / "clean.mid", drums=drums, bass=bass)))
    np.testing.assert_array_equal(phrases, _reference_phrases(pretty_midi.PrettyMIDI(str(path))))


def _reference_phrases(midi):
    drums = next(i for i in midi.instruments if i.is_drum)
    bass = next(i for i in midi.instruments if not i.is_drum and 32 <= i.program <= 39)
    step = lambda seconds: midi.time_to_tick(seconds) * 4 / midi.resolution  # noqa: E731
    grid = np.zeros((400, 57), dtype=bool)
    last = -1
    classes = {note: column for column, notes in enumerate(DRUM_CLASS_NOTES) for note in notes}
    for note in drums.notes:
        if note.pitch in classes:
            grid[int(np.floor(step(note.start))), classes[note.pitch]] = True
            last = max(last, int(np.floor(step(note.start))))
    bass_roll = np.zeros((400, 128), dtype=bool)
    for note in bass.notes:
        if 24 <= note.pitch <= 71:
            on = int(np.floor(step(note.start)))
            off = max(int(np.ceil(step(note.end))), on + 1)
            bass_roll[on:off, note.pitch] = True
            last = max(last, off - 1)
    for t in np.flatnonzero(bass_roll.any(axis=1)):
        grid[t, 9 + bass_roll[t].argmax() - 24] = True
    grid = grid[: last + 1]
    windows = [grid[s : s + 128] for s in range(0, len(grid) - 127, 16)]
    return np.array([w for w in windows if w[:, :9].sum() >= 32 and w[:, 9:].sum() >= 32], dtype=bool).reshape(-1, 128, 57)


def test_playback_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    phrases = np.zeros((3, 128, 57), dtype=bool)
    phrases[:, :, :9] = rng.random((3, 128, 9)) < 0.3
    pitches = rng.integers(9, 57, size=(3, 32)).repeat(4, axis=1)  # one bass pitch per beat, some repeated
    phrases[np.arange(3)[:, None], np.arange(128)[None, :], pitches] = True
    midi = phrases_to_midi(phrases, tmp_path / "out.mid", tempo=97.0, seed=3)

    assert [(i.program, i.is_drum) for i in midi.instruments] == [(33, False), (0, True)]
    velocities = np.array([n.velocity for i in midi.instruments for n in i.notes])
    assert abs(np.mean([n.velocity for n in midi.instruments[0].notes]) - 80) < 1
    assert abs(np.mean([n.velocity for n in midi.instruments[1].notes]) - 90) < 1 and velocities.std() > 0
    windows, start_bars = midi_to_windows(tmp_path / "out.mid")
    np.testing.assert_array_equal(windows[start_bars % 8 == 0], phrases)
    assert start_bars[start_bars % 8 == 0].tolist() == [0, 8, 16]


def test_playback_merges_runs_of_one_bass_pitch():
    phrase = np.zeros((128, 57), dtype=bool)
    phrase[0:5, 9 + 16] = True
    phrase[5:7, 9 + 17] = True
    phrase[7:9, 9 + 16] = True
    notes = phrases_to_midi(phrase, None, tempo=120.0).instruments[0].notes
    assert [(n.pitch, round(n.start / 0.125), round(n.end / 0.125)) for n in notes] == [(40, 0, 5), (40, 7, 9), (41, 5, 7)]


def test_unpack_equals_numpy_unpackbits():
    packed = np.random.default_rng(0).integers(0, 256, size=(5, 912), dtype=np.uint8)
    expected = np.unpackbits(packed, axis=1).reshape(5, 128, 57).astype(bool)
    unpacked = unpack_phrases(torch.from_numpy(packed))
    assert unpacked.dtype == torch.bool
    np.testing.assert_array_equal(unpacked.numpy(), expected)
    np.testing.assert_array_equal(pack_phrases(expected), packed)
    torch_packed = pack_phrases(torch.from_numpy(expected))  # torch in, torch out, same layout
    assert torch_packed.dtype == torch.uint8 and torch.equal(torch_packed, torch.from_numpy(packed))


@pytest.mark.parametrize(
    "content, reason",
    [(b"", "not_midi"), (b"hello, this is text\n", "not_midi"), (b"MThd\x00\x00\x00\x06\x00\x01\x00\x01\x80\x00", "smpte_division")],
)
def test_unusable_bytes_raise_skipfile(tmp_path, content, reason):
    path = tmp_path / "bad.mid"
    path.write_bytes(content)
    with pytest.raises(SkipFile) as skip:
        midi_to_phrases(path)
    assert skip.value.reason == reason
