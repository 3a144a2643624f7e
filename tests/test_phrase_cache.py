"""Bulk ingest into the phrase cache: bad input, resume, parallel workers, reading and writing caches."""
from __future__ import annotations

import json

import mido
import numpy as np
import pytest

from datamodules import pianoroll
from datamodules.pianoroll import ingestion
from datamodules.pianoroll import (
    ingest,
    load_phrase_cache,
    load_phrases,
    midi_to_windows,
    pack_phrases,
    write_phrase_cache,
)
from tests.helpers import load_packed_in_memory
from tests.test_pianoroll import groove, song, write_midi

BAD_FILES = {
    "bad/truncated.mid": "truncated",
    "bad/empty.mid": "not_midi",
    "bad/random.mid": "not_midi",
    "bad/text.mid": "not_midi",
    "bad/tempo.mid": "absurd_tempo",
    "bad/huge_tick.mid": "too_long",
    "bad/short.mid": "no_phrases",
}


@pytest.fixture(scope="module")
def midi_folder(tmp_path_factory):
    """20 good files (one in a sub-folder with an upper-case suffix), the bad ones, and a stray text file."""
    root = tmp_path_factory.mktemp("midi")
    good = []
    for i in range(20):
        name = f"good/{i:02d}.mid" if i != 7 else "good/deeper/07.MIDI"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        drums, bass = groove(8 + i % 5, bass_pitch=30 + i)
        write_midi(root / name, [(9, 0, drums), (0, 32 + i % 8, bass)])
        good.append(name)
    (root / "bad").mkdir()
    whole = (root / good[0]).read_bytes()
    (root / "bad/truncated.mid").write_bytes(whole[: len(whole) // 2])
    (root / "bad/empty.mid").write_bytes(b"")
    (root / "bad/random.mid").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    (root / "bad/text.mid").write_text("this is not a MIDI file\n")
    song(root / "bad/tempo.mid", tempos=((0, 0),))
    drums, bass = groove(8)
    path = write_midi(root / "bad/huge_tick.mid", [(9, 0, drums), (0, 33, bass)])
    midi = mido.MidiFile(path)
    midi.tracks[2].append(mido.Message("note_on", channel=0, note=40, velocity=90, time=2**28 - 1))
    midi.tracks[2].append(mido.Message("note_off", channel=0, note=40, velocity=0, time=10))
    midi.save(path)
    song(root / "bad/short.mid", bars=4)
    (root / "good/readme.txt").write_text("ignored: not a MIDI suffix\n")
    return root, sorted(good)


def test_ingest_keeps_every_good_phrase_and_counts_every_bad_file(midi_folder, tmp_path):
    root, good = midi_folder
    report = ingest(root, tmp_path / "cache", chunk_size=4, progress=False)

    expected_skips = {}
    for reason in BAD_FILES.values():
        expected_skips[reason] = expected_skips.get(reason, 0) + 1
    assert report["files_seen"] == len(good) + len(BAD_FILES)
    assert report["files_used"] == len(good)
    assert report["skipped"] == expected_skips
    assert json.loads((tmp_path / "cache/report.json").read_text())["skipped"] == expected_skips

    cache = load_phrase_cache(tmp_path / "cache")
    assert report["phrases"] == len(cache) and set(cache.sources) == set(good)
    unpacked = load_phrases(tmp_path / "cache")
    for name in good:
        phrases, start_bars = midi_to_windows(root / name)
        mine = cache.sources == name
        assert len(phrases) > 0
        np.testing.assert_array_equal(unpacked[mine], phrases)
        np.testing.assert_array_equal(cache.start_bars[mine], start_bars)


def test_rerun_rewrites_only_missing_shards(midi_folder, tmp_path):
    root, _ = midi_folder
    out = tmp_path / "cache"
    first = ingest(root, out, chunk_size=5, progress=False)
    before = load_phrase_cache(out)
    shards = sorted(out.glob("shard-*.npz"))
    stamps = {shard.name: shard.stat().st_mtime_ns for shard in shards}
    shards[2].unlink()

    second = ingest(root, out, chunk_size=5, progress=False)
    assert second == first
    assert [name for name, stamp in stamps.items() if (out / name).stat().st_mtime_ns != stamp] == [shards[2].name]
    after = load_phrase_cache(out)
    np.testing.assert_array_equal(after.packed, before.packed)
    np.testing.assert_array_equal(after.sources, before.sources)


def test_interrupted_run_leaves_whole_shards_and_resumes(midi_folder, tmp_path, monkeypatch):
    root, _ = midi_folder
    reference = load_phrase_cache(_ingested(root, tmp_path / "reference"))
    original = ingestion.write_shard
    calls = []

    def failing_write(path, *args):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        original(path, *args)

    monkeypatch.setattr(ingestion, "write_shard", failing_write)
    with pytest.raises(KeyboardInterrupt):
        ingest(root, tmp_path / "cache", chunk_size=5, progress=False)
    monkeypatch.setattr(ingestion, "write_shard", original)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["shard-000000.npz", "shard-000001.npz"]

    ingest(root, tmp_path / "cache", chunk_size=5, progress=False)
    np.testing.assert_array_equal(load_phrase_cache(tmp_path / "cache").packed, reference.packed)


def _ingested(root, out, **kwargs):
    ingest(root, out, progress=False, **kwargs)
    return out


@pytest.mark.slow
def test_two_workers_give_the_same_cache(midi_folder, tmp_path):
    root, _ = midi_folder
    one = load_phrase_cache(_ingested(root, tmp_path / "one", chunk_size=6))
    two = load_phrase_cache(_ingested(root, tmp_path / "two", chunk_size=6, workers=2))
    np.testing.assert_array_equal(two.packed, one.packed)
    np.testing.assert_array_equal(two.sources, one.sources)
    np.testing.assert_array_equal(two.start_bars, one.start_bars)
    assert json.loads((tmp_path / "one/report.json").read_text())["skipped"] == json.loads((tmp_path / "two/report.json").read_text())["skipped"]


def test_empty_folder_gives_an_empty_cache(tmp_path):
    (tmp_path / "midi").mkdir()
    report = ingest(tmp_path / "midi", tmp_path / "cache", progress=False)
    assert (report["files_seen"], report["phrases"], report["shards"]) == (0, 0, [])
    cache = load_phrase_cache(tmp_path / "cache")
    assert len(cache) == 0 and cache.packed.shape == (0, 912) and cache.start_bars.shape == (0,)
    assert load_phrases(tmp_path / "cache").shape == (0, 128, 57)


def test_written_subset_loads_back(tmp_path):
    rng = np.random.default_rng(0)
    phrases = rng.random((6, 128, 57)) < 0.2
    sources = np.array(["a.mid", "b.mid", "a.mid", "c/d.mid", "b.mid", "a.mid"])
    write_phrase_cache(tmp_path / "loops", pack_phrases(phrases), sources, np.arange(6) * 3, report={"threshold": 0.01})
    cache = load_phrase_cache(tmp_path / "loops")
    np.testing.assert_array_equal(load_phrases(tmp_path / "loops"), phrases)
    assert cache.sources.tolist() == sources.tolist() and cache.start_bars.tolist() == [0, 3, 6, 9, 12, 15]
    assert json.loads((tmp_path / "loops/report.json").read_text())["threshold"] == 0.01

    subset = cache.subset(cache.sources == "a.mid")
    write_phrase_cache(tmp_path / "loops", subset.packed, subset.sources, subset.start_bars)
    np.testing.assert_array_equal(load_phrases(tmp_path / "loops"), phrases[[0, 2, 5]])


def test_missing_cache_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no phrase cache at .*nowhere"):
        load_phrase_cache(tmp_path / "nowhere")


def test_command_line(midi_folder, tmp_path, capsys):
    root, good = midi_folder
    report = pianoroll.main([str(root), str(tmp_path / "cache"), "--chunk-size", "64"])
    assert report["files_used"] == len(good) and "27 files, 20 used" in capsys.readouterr().out


def test_packed_shards_read_any_rows_as_the_in_memory_array(midi_folder, tmp_path, monkeypatch):
    root, _ = midi_folder
    ingest(root, tmp_path / "cache", chunk_size=4, progress=False)  # 7 shards, one without phrases
    cache = load_phrase_cache(tmp_path / "cache")
    packed, expected = cache.packed, load_packed_in_memory(tmp_path / "cache")
    assert packed.shape == expected.shape and len(packed.shards) == 7 and packed.nbytes == expected.nbytes
    rng = np.random.default_rng(0)
    random_rows = rng.integers(-len(expected), len(expected), size=200)  # repeats and negative rows
    mask = rng.random(len(expected)) < 0.3
    for key in (slice(None), slice(5, 40), slice(40, 5), slice(3, None, 7), random_rows, mask, [], 17, -1):
        np.testing.assert_array_equal(packed[key], expected[key])
    np.testing.assert_array_equal(np.asarray(packed), expected)
    view = packed.select(random_rows)
    np.testing.assert_array_equal(view[10:30], expected[random_rows][10:30])
    keep = rng.random(len(random_rows)) < 0.5
    np.testing.assert_array_equal(view.select(keep)[:], expected[random_rows][keep])
    with pytest.raises(IndexError):
        packed[len(expected)]

    monkeypatch.setattr(pianoroll.cache, "WRITE_CHUNK_ROWS", 7)  # copy in many chunks
    subset = cache.subset(random_rows)
    subset.save(tmp_path / "subset", report={"kept": "random"})
    copied = load_phrase_cache(tmp_path / "subset")
    np.testing.assert_array_equal(np.asarray(copied.packed), expected[random_rows])
    assert copied.sources.tolist() == cache.sources[random_rows].tolist()
    np.testing.assert_array_equal(copied.start_bars, cache.start_bars[random_rows])
    assert list(copied.files) == sorted(set(cache.sources[random_rows]))


def test_shards_written_by_numpy_savez_are_read(tmp_path):
    phrases = np.random.default_rng(1).random((5, 128, 57)) < 0.2
    (tmp_path / "cache").mkdir()
    np.savez(tmp_path / "cache" / "shard-000000.npz", packed=pack_phrases(phrases), phrase_file=np.array([0, 0, 1, 1, 1]),
             start_bars=np.arange(5), files=np.array(["a.mid", "b.mid"]), file_phrases=np.array([2, 3]),
             file_reasons=np.array(["", ""]))
    (tmp_path / "cache" / "report.json").write_text(json.dumps({"phrases": 5, "shards": ["shard-000000.npz"]}))
    np.testing.assert_array_equal(load_phrases(tmp_path / "cache"), phrases)
    assert load_phrase_cache(tmp_path / "cache").sources.tolist() == ["a.mid"] * 2 + ["b.mid"] * 3


def test_unreadable_shards_fail_naming_the_file(tmp_path):
    phrases = pack_phrases(np.random.default_rng(2).random((40, 128, 57)) < 0.2)
    write_phrase_cache(tmp_path / "cache", phrases, ["a.mid"] * 40, np.arange(40))
    shard = tmp_path / "cache" / "shard-000000.npz"
    arrays = dict(np.load(shard))
    np.savez_compressed(shard, **arrays)
    with pytest.raises(ValueError, match="shard-000000.npz: .*compressed"):
        load_phrase_cache(tmp_path / "cache")

    write_phrase_cache(tmp_path / "cache", phrases, ["a.mid"] * 40, np.arange(40))
    cache = load_phrase_cache(tmp_path / "cache")
    shard.write_bytes(shard.read_bytes()[: 4096])  # cut inside the packed rows
    with pytest.raises(ValueError, match="shard-000000.npz: the file ends inside its packed phrases"):
        cache.packed[30:]
    with pytest.raises(ValueError, match="shard-000000.npz: not a readable phrase shard"):
        load_phrase_cache(tmp_path / "cache")


def test_mutated_files_are_counted_skips_in_a_worker_that_survives(midi_folder, tmp_path):
    """Hundreds of byte-corrupted copies of good files go through the compiled reader in a separate
    process: it exits normally, and every file is used or skipped for a named reason (no parse errors)."""
    import subprocess
    import sys

    root, good = midi_folder
    rng = np.random.default_rng(0)
    (tmp_path / "mutants").mkdir()
    for i in range(400):
        data = bytearray((root / good[i % len(good)]).read_bytes())
        for _ in range(rng.integers(1, 6)):
            data[int(rng.integers(0, len(data)))] = int(rng.choice([0x00, 0x7F, 0x80, 0x90, 0xF0, 0xF7, 0xFF, rng.integers(0, 256)]))
        (tmp_path / "mutants" / f"{i:03d}.mid").write_bytes(bytes(data))
    midi_to_windows(root / good[0])  # compile here, where other tests reuse it; the subprocess loads the cache
    result = subprocess.run([sys.executable, "-m", "datamodules.pianoroll", str(tmp_path / "mutants"), str(tmp_path / "cache")],
                            capture_output=True, text=True, cwd=ingestion.Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "cache" / "report.json").read_text())
    assert report["files_seen"] == 400 and not any(reason.startswith("parse_error") for reason in report["skipped"])
    assert report["files_used"] > 0 and len(report["skipped"]) >= 3


@pytest.mark.parametrize("damage", ["empty", "cut_short", "not_an_archive"])
def test_rerun_remakes_a_damaged_shard(midi_folder, tmp_path, damage):
    root, _ = midi_folder
    out = _ingested(root, tmp_path / "cache", chunk_size=5)
    reference = load_phrase_cache(out)
    shard = out / "shard-000001.npz"
    whole = shard.read_bytes()
    shard.write_bytes({"empty": b"", "cut_short": whole[: len(whole) // 2], "not_an_archive": b"PK\x03\x04" + bytes(64)}[damage])

    ingest(root, out, chunk_size=5, progress=False)
    np.testing.assert_array_equal(load_phrase_cache(out).packed, reference.packed)


@pytest.mark.parametrize("problem", ["missing_folder", "output_is_a_file", "chunk_size"])
def test_command_line_errors_are_one_line(tmp_path, capsys, problem):
    (tmp_path / "midi").mkdir()
    (tmp_path / "a_file").write_text("")
    src, out, extra = {"missing_folder": ("nowhere", "cache", []), "output_is_a_file": ("midi", "a_file", []),
                       "chunk_size": ("midi", "cache", ["--chunk-size", "0"])}[problem]
    with pytest.raises(SystemExit) as exit_:
        pianoroll.main([str(tmp_path / src), str(tmp_path / out), *extra])
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and error.count("\n") == 1
    assert (str(tmp_path / src) if problem == "missing_folder" else "chunk_size" if problem == "chunk_size" else "a_file") in error
