"""Loop extraction through train.py: outputs, labelled loops kept, empty caches, 1 vs 2 processes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from datamodules.correlation import c_midi
from datamodules.phrase_scoring import PackedPhraseBatches, load_labelled_phrases
from datamodules.phrases import PhraseDataModule
from datamodules.pianoroll import load_phrase_cache, unpack_phrases, write_phrase_cache
from lightning_modules.loop_detector import LoopDetector
from tests.helpers import load_packed_in_memory, run_train, run_train_subprocess


@pytest.fixture(scope="module")
def detector(demo_root, tmp_path_factory):
    """A briefly trained demo detector: (checkpoint path, demo phrase cache)."""
    run_dir = tmp_path_factory.mktemp("detector")
    run_train([
        "experiment=loop_detector", f"paths.demo={demo_root}", f"run_dir={run_dir}", "logger=none",
        "model.pretrain_epochs=10", "model.svdd_epochs=30", "trainer.max_epochs=40",
        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "stages=[fit]",
    ])
    return run_dir / "checkpoints" / "last.ckpt", demo_root / "phrases"


def extract(detector_ckpt, phrases, out, run_dir, demo_root):
    return run_train([
        "experiment=extract_loops", f"detector={detector_ckpt}", f"phrases={phrases}", f"out={out}",
        f"paths.demo={demo_root}",
        f"run_dir={run_dir}", "logger=none", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
        "datamodule.batch_size=1000",
    ])


def test_extraction_matches_in_memory_scoring_and_keeps_labelled_loops(detector, demo_root, tmp_path):
    """Extraction reads batches on demand; every score and kept phrase equals the whole cache scored in memory."""
    ckpt, phrases = detector
    out = tmp_path / "loops"
    extract(ckpt, phrases, out, tmp_path / "run", demo_root)

    source = load_phrase_cache(phrases)
    in_memory = load_packed_in_memory(phrases)
    scores = np.load(out / "scores.npy")
    loaded = LoopDetector.load_from_checkpoint(ckpt)
    packed_batches = torch.from_numpy(in_memory).split(1000)  # the batches extraction scores, from memory
    assert np.array_equal(scores, torch.cat([loaded.score_packed(batch) for batch in packed_batches]).numpy())
    expected = loaded.loop_score(c_midi(unpack_phrases(torch.from_numpy(in_memory)))).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-7)  # C_MIDI from the bits as from the cells

    keep = scores < loaded.threshold
    loops = load_phrase_cache(out)
    assert np.array_equal(load_packed_in_memory(out), in_memory[keep])
    assert list(loops.sources) == list(source.sources[keep])
    assert np.array_equal(loops.start_bars, source.start_bars[keep])
    loop_module = PhraseDataModule(cache=str(out), val_fraction=0.2)  # the VQ-VAE's loop split: by song too
    loop_module.setup("fit")
    songs = {split: set(loops.sources[loop_module.splits[split].numpy()]) for split in ("train", "val")}
    assert len(songs["val"]) > 1 and not songs["train"] & songs["val"]
    report = json.loads((out / "report.json").read_text())
    assert report["n_phrases"] == len(source) and report["n_loops"] == int(keep.sum())
    assert report["kept_fraction"] == pytest.approx(keep.mean())
    assert (out / "scores.png").stat().st_size > 0

    labelled = load_labelled_phrases(phrases, demo_root / "midi", demo_root / "labels.json", demo_root)
    kept_loops = keep[labelled.label == 1].mean()
    kept_non_loops = keep[labelled.label == 0].mean()
    assert kept_non_loops < 0.1 and kept_loops > kept_non_loops + 0.2


def test_empty_cache_extracts_nothing(detector, demo_root, tmp_path):
    ckpt, _ = detector
    empty = tmp_path / "empty"
    write_phrase_cache(empty, np.zeros((0, 912), np.uint8), [], [])
    out = tmp_path / "loops"
    extract(ckpt, empty, out, tmp_path / "run", demo_root)
    assert len(load_phrase_cache(out)) == 0
    assert np.load(out / "scores.npy").shape == (0,)
    report = json.loads((out / "report.json").read_text())
    assert report["n_phrases"] == 0 and report["n_loops"] == 0 and report["kept_fraction"] == 0.0


def test_missing_detector_and_cache_fail_naming_them(detector, demo_root, tmp_path):
    ckpt, _ = detector
    with pytest.raises(ValueError, match="detector"):
        extract("null", tmp_path / "phrases", tmp_path / "out", tmp_path / "run", demo_root)
    with pytest.raises(FileNotFoundError, match="no phrase cache"):
        extract(ckpt, tmp_path / "nowhere", tmp_path / "out", tmp_path / "run", demo_root)


def test_batches_cover_every_phrase_once():
    packed = np.arange(10 * 912, dtype=np.int64).astype(np.uint8).reshape(10, 912)
    batches = PackedPhraseBatches(packed, batch_size=4)
    assert len(batches) == 3
    indices = torch.cat([batches[b][0] for b in range(len(batches))])
    assert torch.equal(indices, torch.arange(10))
    assert torch.equal(batches[2][1], torch.from_numpy(packed[8:]))
    assert len(PackedPhraseBatches(packed[:0], batch_size=4)) == 1


@pytest.mark.slow
def test_two_processes_extract_what_one_does(detector, demo_root, tmp_path):
    ckpt, phrases = detector
    args = [f"detector={ckpt}", f"phrases={phrases}", f"paths.demo={demo_root}", "logger=none", "datamodule.batch_size=700"]
    extract(ckpt, phrases, tmp_path / "one", tmp_path / "run1", demo_root)
    run_train_subprocess(["experiment=extract_loops", *args, f"out={tmp_path / 'two'}", f"run_dir={tmp_path / 'run2'}"])
    assert np.array_equal(np.load(tmp_path / "one" / "scores.npy"), np.load(tmp_path / "two" / "scores.npy"))
    one, two = load_phrase_cache(tmp_path / "one"), load_phrase_cache(tmp_path / "two")
    assert np.array_equal(one.packed, two.packed) and list(one.sources) == list(two.sources)
