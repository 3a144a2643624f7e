"""generate.py end to end with tiny checkpoints: files, round-trip through MIDI, rejection, config errors."""
from __future__ import annotations

import json

import numpy as np
import pretty_midi
import pytest
import torch

import generate
from callbacks.metrics import note_density, unique_pitch
from datamodules.pianoroll import N_DRUM_CLASSES, midi_to_phrases, unpack_phrases
from framework.seeding import sampling_generator
from lightning_modules.loop_detector import LoopDetector
from tests.helpers import save_checkpoint
from tests.test_prior import save_tiny_vqvae, tiny_prior


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Paths of a tiny prior (decoding with a tiny random VQ-VAE) and of a random loop detector."""
    root = tmp_path_factory.mktemp("checkpoints")
    save_tiny_vqvae(root / "vqvae.ckpt")
    prior = tiny_prior(vqvae_ckpt=str(root / "vqvae.ckpt"))
    torch.manual_seed(2)
    detector = LoopDetector(pretrain_epochs=1, svdd_epochs=1)
    detector.center.fill_(0.5)
    return {"prior": save_checkpoint(prior, root / "prior.ckpt"), "detector": save_checkpoint(detector, root / "detector.ckpt")}


def canonical(phrase: np.ndarray) -> np.ndarray:
    """What a MIDI file can hold of a phrase: at most one (the lowest) bass pitch per step."""
    out = phrase.copy()
    bass = out[:, N_DRUM_CLASSES:]
    lowest = bass.argmax(axis=1)
    bass[:] = False
    bass[np.arange(len(bass)), lowest] = phrase[:, N_DRUM_CLASSES:].any(axis=1)
    return out


def read_phrases(out) -> np.ndarray:
    return unpack_phrases(torch.from_numpy(np.load(out / "phrases.npz")["packed"])).numpy()


def test_generate_writes_midi_previews_npz_and_summary(checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    args = [f"prior={checkpoints['prior']}", "n=6", "batch_size=4", f"out={out}", "preview=2", "wav=true",
            "sample_rate=8000", "sampling.mode=top_p", "sampling.p=0.6", "seed=3"]
    assert generate.main(args) == 0

    prior = tiny_prior(vqvae_ckpt=None)
    prior.load_state_dict(torch.load(checkpoints["prior"], weights_only=False)["state_dict"])
    expected_codes = prior.sample_codes(6, sampling_generator(3), mode="top_p", top_p=0.6)
    arrays = np.load(out / "phrases.npz")
    assert np.array_equal(arrays["codes"], expected_codes.numpy())
    assert "scores" not in arrays

    phrases = read_phrases(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(capsys.readouterr().out)
    assert (summary["written"], summary["shortfall"], summary["generated"], summary["rounds"]) == (6, 0, 6, 2)
    assert summary["sampling"] == {"mode": "top_p", "temperature": 1.0, "top_k": 0, "top_p": 0.6}
    assert summary["metrics"]["UP"] == pytest.approx(unique_pitch(torch.from_numpy(phrases)).mean().item())
    assert summary["metrics"]["ND"] == pytest.approx(note_density(torch.from_numpy(phrases)).mean().item())
    assert "LS" not in summary["metrics"]

    midi_files = sorted((out / "midi").glob("*.mid"))
    assert [p.name for p in midi_files] == [f"loop_{i:05d}.mid" for i in range(6)]
    for phrase, path in zip(phrases, midi_files):
        drums = [instrument for instrument in pretty_midi.PrettyMIDI(str(path)).instruments if instrument.is_drum]
        assert sum(len(instrument.notes) for instrument in drums) == phrase[:, :N_DRUM_CLASSES].sum()
        assert np.array_equal(midi_to_phrases(path), canonical(phrase)[None])
    assert (out / "pianorolls.png").stat().st_size > 0
    assert sorted(p.name for p in (out / "previews").glob("*.wav")) == ["loop_00.wav", "loop_01.wav"]


def test_phrases_without_stacked_bass_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(0)
    phrases = np.zeros((3, 128, 57), dtype=bool)
    phrases[:, :, :N_DRUM_CLASSES] = rng.random((3, 128, N_DRUM_CLASSES)) < 0.3
    pitch = rng.integers(N_DRUM_CLASSES, 57, size=(3, 16)).repeat(8, axis=1)  # 16 notes of 8 steps, repeats merge
    np.put_along_axis(phrases, pitch[..., None], True, axis=2)
    paths = generate.write_midi_files(phrases, tmp_path, tempo=97.0, seed=0)
    for phrase, path in zip(phrases, paths):
        assert np.array_equal(midi_to_phrases(path), phrase[None])


def test_rejection_keeps_only_loops_scoring_below_the_threshold(checkpoints, tmp_path):
    detector = LoopDetector.load_from_checkpoint(checkpoints["detector"])
    candidates = generate.LSTMPrior.load_from_checkpoint(checkpoints["prior"]).sample(32, torch.Generator().manual_seed(0))
    threshold = detector.score_phrases(candidates).median().item()

    out = tmp_path / "out"
    args = [f"prior={checkpoints['prior']}", f"detector={checkpoints['detector']}", f"reject.threshold={threshold}",
            "n=5", "batch_size=8", f"out={out}", "preview=2"]
    assert generate.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    arrays = np.load(out / "phrases.npz")
    phrases = read_phrases(out)
    assert summary["written"] == 5 and len(phrases) == 5
    assert (arrays["scores"] < threshold).all()
    assert np.allclose(arrays["scores"], detector.score_phrases(torch.from_numpy(phrases)).numpy(), atol=1e-6)
    assert summary["metrics"]["LS"] == pytest.approx(arrays["scores"].mean(), rel=1e-6)
    assert summary["generated"] == 8 * summary["rounds"]
    assert 0 < summary["acceptance_rate"] < 1


def test_rejection_reports_a_shortfall(checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    args = [f"prior={checkpoints['prior']}", f"detector={checkpoints['detector']}", "reject.threshold=0.0",
            "reject.max_rounds=2", "n=5", "batch_size=4", f"out={out}"]
    assert generate.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["written"], summary["shortfall"], summary["generated"], summary["acceptance_rate"]) == (0, 5, 8, 0.0)
    assert "only 0 of 5 loops" in capsys.readouterr().err
    assert read_phrases(out).shape == (0, 128, 57)


@pytest.mark.parametrize(
    "args, message",
    [
        (["prior=p.ckpt", "sampling.temperatur=0.5"], "Valid keys at sampling: k, mode, p, temperature"),
        (["prior=p.ckpt", "samples=3"], "Valid keys at the top level:"),
        (["n=3"], "prior=... is required"),
        (["prior=p.ckpt", "reject.threshold=0.01"], "reject.threshold needs detector=CKPT"),
        (["prior=missing.ckpt"], "prior=missing.ckpt: no such checkpoint file"),
        (["prior=p.ckpt", "sampling.mode=nucleus"], "valid modes: temperature, top_k, top_p"),
        (["prior=p.ckpt", "n=0"], "n=0 must be at least 1"),
    ],
)
def test_bad_arguments_fail_with_a_clear_message(args, message, capsys):
    assert generate.main(args) == 2
    assert message in capsys.readouterr().err


def test_a_non_empty_output_folder_is_kept_unless_overwrite(checkpoints, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert generate.main([f"prior={checkpoints['prior']}", f"out={tmp_path}", "n=1"]) == 2
    assert "overwrite=true" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("key, other", [("prior", "detector"), ("detector", "prior")])
def test_a_checkpoint_of_another_class_fails_in_one_line_naming_it(checkpoints, tmp_path, capsys, key, other):
    given = {"prior": checkpoints["prior"], key: checkpoints[other]}
    assert generate.main([*(f"{k}={v}" for k, v in given.items()), f"out={tmp_path / 'out'}"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"input error: {key}={checkpoints[other]}: not a readable ")
