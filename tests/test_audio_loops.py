"""AudioLoopDataModule: C_WAV caching, skipped files with reasons, bar inference, splits, tiny folders."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from datamodules import audio_loops, demo
from datamodules.audio_loops import AudioLoopDataModule, load_or_compute, split_indices
from datamodules.correlation import c_wav
from datamodules.pianoroll.synth import render_phrases

SR = 8000


def loop_audio(n_bars: int, bpm: float, seed: int) -> np.ndarray:
    """A drum+bass loop whose bars differ (so C_WAV depends on where the bar lines fall)."""
    rng = np.random.default_rng(seed)
    roll = np.zeros((16 * n_bars, 57), dtype=bool)
    roll[::4, 0] = roll[4::8, 1] = roll[::2, 2] = True
    for bar in range(n_bars):
        roll[16 * bar:16 * bar + 12, int(rng.integers(28, 50)) - 15] = True
    return render_phrases(roll, bpm, SR)


@pytest.fixture
def loop_folder(tmp_path):
    folder = tmp_path / "loops"
    folder.mkdir()
    for index in range(5):
        sf.write(folder / f"loop_{index}.wav", loop_audio(2, 120, index), SR)
    (folder / "sub").mkdir()
    sf.write(folder / "sub" / "deep.flac", loop_audio(4, 100, 9), SR)
    (folder / "corrupt.wav").write_bytes(b"RIFF\x00\x00not really a wave file")
    sf.write(folder / "empty.wav", np.zeros(0), SR)
    sf.write(folder / "silent.wav", np.zeros(SR), SR)
    sf.write(folder / "tiny.wav", np.random.default_rng(0).standard_normal(100), SR)
    sf.write(folder / "bad_row.wav", loop_audio(1, 120, 7), SR)
    (folder / "metadata.csv").write_text(
        "file,bpm,bars\n"
        + "".join(f"loop_{index}.wav,120,2\n" for index in range(5))
        + "sub/deep.flac,100,4\nbad_row.wav,-5,1\ngone.wav,120,1\n")
    return folder


def test_vectors_skips_and_cache_reuse(loop_folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache.npz"
    data = load_or_compute(loop_folder, cache)
    assert sorted(data.files) == sorted([f"loop_{i}.wav" for i in range(5)] + ["sub/deep.flac"])
    assert data.skip_counts() == {"empty": 1, "invalid metadata": 1, "missing": 1, "silent": 1,
                                  "too short": 1, "unreadable": 1}
    assert data.skipped["unreadable"] == ["corrupt.wav"]
    index = data.files.index("loop_3.wav")
    np.testing.assert_allclose(data.vectors[index], c_wav(loop_audio(2, 120, 3), SR, bpm=120, n_bars=2), atol=1e-4)

    monkeypatch.setattr(audio_loops, "compute_loop_vectors", lambda folder: pytest.fail("cache not reused"))
    cached = load_or_compute(loop_folder, cache)
    np.testing.assert_array_equal(cached.vectors, data.vectors)
    assert cached.files == data.files and cached.skipped == data.skipped


def test_a_changed_folder_is_recomputed(loop_folder, tmp_path):
    cache = tmp_path / "cache.npz"
    assert len(load_or_compute(loop_folder, cache).files) == 6
    sf.write(loop_folder / "added.wav", loop_audio(8, 90, 11), SR)
    assert "added.wav" in load_or_compute(loop_folder, cache).files


def test_bar_count_inference(tmp_path):
    folder = tmp_path / "loops"
    folder.mkdir()
    audio = loop_audio(2, 96, 1)
    for name in ("groove_96bpm.wav", "plain.wav", "bars_only.wav", "bpm_only.wav"):
        sf.write(folder / name, audio, SR)
    (folder / "metadata.csv").write_text("file,bpm,bars\nbars_only.wav,,2\nbpm_only.wav,96,\n")
    data = load_or_compute(folder, tmp_path / "cache.npz")
    vectors = dict(zip(data.files, data.vectors))
    two_bars = c_wav(audio, SR, bpm=96, n_bars=2)
    for name in ("groove_96bpm.wav", "bars_only.wav", "bpm_only.wav"):
        np.testing.assert_allclose(vectors[name], two_bars, atol=1e-4)
    np.testing.assert_allclose(vectors["plain.wav"], c_wav(audio, SR, n_bars=8), atol=1e-4)
    assert not np.allclose(vectors["plain.wav"], two_bars, atol=1e-2)


def test_split_is_a_seeded_partition():
    train, val = split_indices(50, 0.2, seed=3)
    assert len(val) == 10 and sorted(np.concatenate([train, val]).tolist()) == list(range(50))
    np.testing.assert_array_equal(split_indices(50, 0.2, seed=3)[1], val)
    assert not np.array_equal(split_indices(50, 0.2, seed=4)[1], val)
    assert [len(part) for part in split_indices(2, 0.2, seed=0)] == [1, 1]
    with pytest.raises(ValueError, match="val_fraction"):
        split_indices(10, 1.0, seed=0)


def test_datamodule_batches_and_a_single_loop(tmp_path):
    folder = tmp_path / "loops"
    folder.mkdir()
    sf.write(folder / "only.wav", loop_audio(1, 120, 0), SR)
    module = AudioLoopDataModule(str(folder), batch_size=64, demo_root=None)
    module.prepare_data()
    module.setup("fit")
    assert module.cache == tmp_path / "loops.c_wav.npz" and module.cache.exists()
    (batch,) = list(module.train_dataloader())
    (val_batch,) = list(module.val_dataloader())
    assert batch.shape == (1, 28) and batch.dtype == torch.float32
    torch.testing.assert_close(val_batch, batch)
    torch.testing.assert_close(module.train_vectors(), batch)
    assert module.skip_report() == {}


def test_datamodule_split_covers_the_folder(loop_folder):
    module = AudioLoopDataModule(str(loop_folder), batch_size=4, val_fraction=0.2, seed=1, demo_root=None)
    module.setup("fit")
    train, val = module.train_vectors(), module.val_vectors()
    assert (len(train), len(val)) == (5, 1)
    assert [len(batch) for batch in module.train_dataloader()] == [4, 1]
    everything = torch.cat([train, val])
    assert torch.unique(everything, dim=0).shape[0] == 6
    assert torch.equal(torch.cat(list(module.test_dataloader())), val)


def test_no_usable_loop_fails_naming_the_folder(tmp_path):
    folder = tmp_path / "loops"
    folder.mkdir()
    (folder / "broken.ogg").write_bytes(b"OggS garbage")
    with pytest.raises(ValueError, match="no usable loop.*unreadable"):
        load_or_compute(folder, tmp_path / "cache.npz")
    with pytest.raises(FileNotFoundError, match="missing"):
        AudioLoopDataModule(str(tmp_path / "missing"), demo_root=str(tmp_path / "demo")).prepare_data()


def test_missing_demo_loops_are_created(tmp_path, monkeypatch):
    build_loops = demo.build_loops
    monkeypatch.setattr(demo.parts, "build_loops", lambda stage, seed, **_: build_loops(stage, seed, n_loops=3))
    module = AudioLoopDataModule(str(tmp_path / "demo" / "loops"), batch_size=2, demo_root=str(tmp_path / "demo"))
    module.prepare_data()
    module.setup("fit")
    assert len(module.train_vectors()) + len(module.val_vectors()) == 3


def test_non_finite_loops_are_skipped_and_the_detector_trains_on_the_rest(tmp_path):
    """NaN and infinite samples are counted under their own reason; a finite loop, however loud,
    gives a finite vector; a detector trained on the folder reports finite test metrics."""
    from tests.helpers import run_train

    folder = tmp_path / "loops"
    folder.mkdir()
    for index in range(6):
        sf.write(folder / f"loop_{index}.wav", loop_audio(2, 120, index), SR)
    poisoned = loop_audio(2, 120, 6)
    poisoned[100:200] = np.nan
    sf.write(folder / "nan.wav", poisoned, SR, subtype="FLOAT")
    sf.write(folder / "inf.wav", np.where(np.arange(len(poisoned)) == 7, np.inf, loop_audio(2, 120, 7)), SR,
             subtype="FLOAT")
    sf.write(folder / "loud.wav", loop_audio(2, 120, 8).astype(np.float64) * 1e300, SR, subtype="DOUBLE")

    data = load_or_compute(folder, tmp_path / "cache.npz")
    assert data.skip_counts() == {"non-finite": 2}
    assert sorted(data.skipped["non-finite"]) == ["inf.wav", "nan.wav"]
    assert np.isfinite(data.vectors).all() and len(data.files) == 7
    loud = data.vectors[data.files.index("loud.wav")]
    np.testing.assert_allclose(loud, c_wav(loop_audio(2, 120, 8), SR, n_bars=8), atol=1e-5)

    trainer, module, datamodule, _ = run_train([
        "experiment=loop_detector", f"datamodule.loops={folder}", f"datamodule.cache={tmp_path / 'cache.npz'}",
        "datamodule.demo_root=null", f"run_dir={tmp_path / 'run'}", "logger=none", "trainer.accelerator=cpu",
        "model.pretrain_epochs=2", "model.svdd_epochs=2", "callbacks.loop_analysis=null",
        "trainer.enable_progress_bar=false",
    ])
    assert datamodule.skip_report() == data.skipped
    tested = {key: value.item() for key, value in trainer.callback_metrics.items() if key.startswith("test/")}
    assert {"test/ae_loss", "test/svdd_loss", "test/score", "test/loop_rate"} <= set(tested)
    assert all(np.isfinite(value) for value in tested.values()), tested
    assert np.isfinite(module.threshold)
