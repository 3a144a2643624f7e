"""Built-in demo data: determinism, contents, labels that join with the phrase windows, atomic parts."""
from __future__ import annotations

import csv
import sys
import types
from pathlib import Path

import mido
import numpy as np
import pytest
import soundfile as sf

from datamodules import demo
from datamodules.pianoroll.synth import render_phrases


def all_files(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def small_builders(monkeypatch, n_songs: int = 6, n_loops: int = 4) -> None:
    """Make ``ensure_demo_data`` build a tiny demo (it always asks for the default sizes)."""
    build_midi, build_loops = demo.build_midi, demo.build_loops
    monkeypatch.setattr(demo.parts, "build_midi", lambda stage, seed, **_: build_midi(stage, seed, n_songs=n_songs))
    monkeypatch.setattr(demo.parts, "build_loops", lambda stage, seed, **_: build_loops(stage, seed, n_loops=n_loops))


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    first, second, other = (demo.make_demo(tmp_path / name, seed=seed, parts=("midi", "loops"), n_songs=6, n_loops=4)
                            for name, seed in (("a", 3), ("b", 3), ("c", 4)))
    files = all_files(first)
    assert files == all_files(second)
    assert len([name for name in files if name.endswith(".mid")]) == 6
    assert len([name for name in files if name.endswith(".wav")]) == 4
    assert files["labels.json"] != all_files(other)["labels.json"]


def test_demo_contents_and_counts(demo_root):
    midi_files = sorted((demo_root / "midi").rglob("*.mid"))
    assert len(midi_files) == 200
    kinds = {"3/4": 0, "tempo changes": 0, "no bass": 0}
    for path in midi_files:
        midi = mido.MidiFile(path)
        messages = [message for track in midi.tracks for message in track]
        signatures = {(m.numerator, m.denominator) for m in messages if m.type == "time_signature"}
        kinds["3/4"] += signatures == {(3, 4)}
        kinds["tempo changes"] += sum(m.type == "set_tempo" for m in messages) > 1
        programs = {m.program for m in messages if m.type == "program_change"}
        kinds["no bass"] += not programs & set(range(32, 40))
    assert kinds["3/4"] >= 5 and kinds["tempo changes"] >= 20 and kinds["no bass"] >= 3
    with open(demo_root / "loops" / "metadata.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 300 == len(list((demo_root / "loops").glob("*.wav")))
    assert {int(row["bars"]) for row in rows} == {1, 2, 4, 8}
    assert all(80 <= float(row["bpm"]) <= 160 for row in rows)
    for row in rows[:20]:
        info = sf.info(demo_root / "loops" / row["file"])
        assert info.channels == 1 and info.samplerate == demo.LOOP_SR
        assert info.frames == round(int(row["bars"]) * 240 / float(row["bpm"]) * demo.LOOP_SR)


def test_labels_join_the_phrase_windows_and_match_their_definition(demo_root):
    pianoroll = pytest.importorskip("datamodules.pianoroll")
    labels = demo.read_window_labels(demo_root / "labels.json")
    windows = {}
    for path in sorted((demo_root / "midi").rglob("*.mid")):
        try:
            phrases, starts = pianoroll.midi_to_windows(path)
        except pianoroll.SkipFile:
            continue
        relative = path.relative_to(demo_root / "midi").as_posix()
        windows.update({(relative, int(start)): phrase for phrase, start in zip(phrases, starts)})
    assert sum(labels.values()) > 500 and sum(not value for value in labels.values()) > 500
    assert set(labels) <= set(windows)
    for key, is_loop in labels.items():
        bars = windows[key].reshape(8, 16 * 57)
        repeats = [np.array_equal(bars[i], bars[i + 4]) for i in range(4)]
        # Loop windows repeat a 1-, 2- or 4-bar pattern; through-composed bars never repeat.
        assert all(repeats) if is_loop else not any(repeats), key


@pytest.mark.slow
def test_a_detector_trained_on_demo_loops_separates_labelled_windows(demo_root):
    """Deep SVDD on C_WAV of the demo loops ranks loop windows (via C_MIDI) below non-loop ones."""
    import torch
    from sklearn.metrics import roc_auc_score

    pianoroll = pytest.importorskip("datamodules.pianoroll")
    from datamodules.audio_loops import load_or_compute
    from datamodules.correlation import c_midi
    from lightning_modules.nets.svdd import SVDDDecoder, SVDDEncoder

    torch.manual_seed(0)
    vectors = torch.from_numpy(load_or_compute(demo_root / "loops", demo_root / "test-loops.npz").vectors)
    encoder, decoder = SVDDEncoder(), SVDDDecoder()
    for stage in ("autoencoder", "svdd"):
        parameters = list(encoder.parameters()) + (list(decoder.parameters()) if stage == "autoencoder" else [])
        optimiser = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=0.01)
        if stage == "svdd":
            with torch.no_grad():
                center = encoder(vectors).mean(0)
        for _ in range(150):
            for batch in torch.randperm(len(vectors)).split(64):
                x = vectors[batch]
                if stage == "autoencoder":
                    loss = ((decoder(encoder(x)) - x) ** 2).mean()
                else:
                    loss = ((encoder(x) - center) ** 2).sum(1).mean()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
    labels = demo.read_window_labels(demo_root / "labels.json")
    phrases, is_loop = [], []
    for relative in sorted({relative for relative, _ in labels}):
        file_phrases, starts = pianoroll.midi_to_windows(demo_root / "midi" / relative)
        for phrase, start in zip(file_phrases, starts):
            if (relative, int(start)) in labels:
                phrases.append(phrase)
                is_loop.append(labels[relative, int(start)])
    with torch.no_grad():
        scores = ((encoder(torch.from_numpy(c_midi(np.stack(phrases)))) - center) ** 2).mean(1).numpy()
    assert roc_auc_score(~np.array(is_loop), scores) >= 0.95


def test_ensure_demo_data_builds_once(tmp_path, monkeypatch):
    small_builders(monkeypatch)
    root = demo.ensure_demo_data(tmp_path / "demo", parts=("midi", "loops"))
    before = all_files(root)
    assert demo.part_is_complete(root, "midi") and demo.part_is_complete(root, "loops")

    def fail(*_):
        raise AssertionError("a complete part was rebuilt")

    monkeypatch.setattr(demo.parts, "build_midi", fail)
    monkeypatch.setattr(demo.parts, "build_loops", fail)
    demo.ensure_demo_data(root, parts=("midi", "loops"))
    assert all_files(root) == before


def test_a_failing_part_leaves_no_part_behind(tmp_path, monkeypatch):
    def broken(stage, seed, n_loops=300):
        (stage / "loops").mkdir()
        (stage / "loops" / "half.wav").write_bytes(b"RIFF")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(demo.parts, "build_loops", broken)
    root = tmp_path / "demo"
    with pytest.raises(RuntimeError, match="killed"):
        demo.ensure_demo_data(root, parts=("loops",))
    assert list(root.iterdir()) == []


def test_multitrack_part_moves_both_folders_into_place(tmp_path, monkeypatch):
    def write_multitrack_demo(part_dir, seed):
        for folder in ("multitrack/train/song_a", "multitrack/test/song_b", "dry/song_a"):
            (Path(part_dir) / folder).mkdir(parents=True)
            sf.write(Path(part_dir) / folder / "bass.wav", np.zeros(10), 8000)

    monkeypatch.setitem(sys.modules, "datamodules.demo.multitrack",
                        types.SimpleNamespace(write_multitrack_demo=write_multitrack_demo))
    root = demo.make_demo(tmp_path / "demo", parts=("multitrack",))
    assert (root / "multitrack/train/song_a/bass.wav").exists() and (root / "dry/song_a/bass.wav").exists()
    assert demo.part_is_complete(root, "multitrack")

    monkeypatch.setitem(sys.modules, "datamodules.demo.multitrack",
                        types.SimpleNamespace(write_multitrack_demo=lambda part_dir, seed: None))
    with pytest.raises(RuntimeError, match="did not produce"):
        demo.make_demo(tmp_path / "other", parts=("multitrack",))
    assert [path.name for path in (tmp_path / "other").iterdir()] == []


def test_ensure_demo_input_creates_only_inside_the_demo_root(tmp_path, monkeypatch):
    small_builders(monkeypatch)
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        demo.ensure_demo_input(tmp_path / "elsewhere" / "loops", tmp_path / "demo", "loops")
    assert demo.ensure_demo_input(tmp_path / "demo" / "loops", tmp_path / "demo", "loops").is_dir()
    with pytest.raises(ValueError, match="unknown demo parts"):
        demo.make_demo(tmp_path / "demo", parts=("drums",))


def test_render_phrases_timing_and_pitch():
    sr, bpm = 8000, 120
    roll = np.zeros((2, 128, 57), dtype=bool)
    assert not render_phrases(roll, bpm, sr).any()
    roll[0, :, 33 - 15] = True  # A1 held through the first phrase (55 Hz)
    roll[1, 0, 0] = True  # one kick at the start of the second phrase
    audio = render_phrases(roll, bpm, sr)
    phrase_samples = 8 * 4 * 60 // bpm * sr
    assert audio.shape == (2 * phrase_samples,) and audio.dtype == np.float32
    np.testing.assert_array_equal(audio, render_phrases(roll.reshape(256, 57), bpm, sr))
    first = audio[sr:phrase_samples - sr]
    spectrum = np.abs(np.fft.rfft(first))
    frequencies = np.fft.rfftfreq(len(first), 1 / sr)
    assert abs(frequencies[np.argmax(spectrum)] - 110) < 1  # the bass voice's strongest partial
    kick = np.abs(audio[phrase_samples:phrase_samples + sr // 10]).max()
    assert kick > 10 * np.abs(audio[phrase_samples + sr // 2:phrase_samples + sr]).max()
    assert np.abs(audio).max() <= 0.9 + 1e-6
