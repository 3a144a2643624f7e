"""Multitrack demo data, the MultitrackDataModule and the fxnorm command line."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from datamodules.demo.multitrack import write_multitrack_demo
from datamodules.fxnorm import FxNormalizer, normalize_folder
from datamodules.fxnorm.__main__ import main as fxnorm_main
from datamodules.fxnorm.songs import MIXTURE, STEMS, list_songs, read_song, write_song
from datamodules.multitrack import FixedSegments, MultitrackDataModule, RandomSegments, Song

SR = 44100


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("mt")
    write_multitrack_demo(root, seed=0, n_train=3, n_test=1, n_dry=1, seconds=(2.0, 2.5))
    return root


def make_datamodule(demo, tmp_path, seed=0):
    return MultitrackDataModule(
        root=str(demo / "multitrack"), cache=str(tmp_path / "cache"), segment_seconds=0.5, batch_size=2,
        val_songs=1, seed=seed, segments_per_epoch=4, demo_root=None,
    )


@pytest.fixture(scope="module")
def prepared(demo, tmp_path_factory):
    dm = make_datamodule(demo, tmp_path_factory.mktemp("prepared"))
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_demo_layout_and_mixture_is_sum(demo):
    assert [p.name for p in list_songs(demo / "multitrack" / "train")] == ["song_000", "song_001", "song_002"]
    stems, sr = read_song(demo / "multitrack" / "train" / "song_001", (*STEMS, MIXTURE))
    assert sr == SR and all(a.shape[0] == 2 for a in stems.values())
    assert sf.info(str(demo / "multitrack" / "test" / "song_000" / "vocals.wav")).subtype == "PCM_16"
    residual = stems[MIXTURE] - sum(stems[s] for s in STEMS)
    assert np.max(np.abs(residual)) < 5 / 32768  # 16-bit rounding of five files
    assert np.max(np.abs(stems[MIXTURE])) <= 0.99
    dry, _ = read_song(demo / "dry" / "dry_000")
    assert set(dry) == set(STEMS)


def test_demo_is_deterministic(tmp_path):
    for name in ("a", "b"):
        write_multitrack_demo(tmp_path / name, seed=3, n_train=1, n_test=0, n_dry=0, seconds=(1.0, 1.0))
    a, _ = read_song(tmp_path / "a" / "multitrack" / "train" / "song_000")
    b, _ = read_song(tmp_path / "b" / "multitrack" / "train" / "song_000")
    for s in STEMS:
        np.testing.assert_array_equal(a[s], b[s])


def test_batches_have_the_documented_shapes(prepared):
    stems, mixture = next(iter(prepared.train_dataloader()))
    assert stems.shape == (2, 8, SR // 2) and mixture.shape == (2, 2, SR // 2)
    assert stems.dtype == mixture.dtype == torch.float32
    assert len(prepared.val_set) > 0
    assert (prepared.cache / "features.npz").is_file()
    assert len(list_songs(prepared.cache / "train")) == 3 and len(list_songs(prepared.cache / "test")) == 1


def test_prepare_data_resumes_without_rewriting(prepared):
    before = {p: p.stat().st_mtime_ns for p in (prepared.cache / "train").rglob("*.wav")}
    prepared.prepare_data()
    assert before == {p: p.stat().st_mtime_ns for p in (prepared.cache / "train").rglob("*.wav")}


def test_segments_reproducible_by_seed_and_fresh_per_epoch(prepared):
    songs = prepared.train_set.songs
    a = RandomSegments(songs, SR // 2, seed=0)
    b = RandomSegments(songs, SR // 2, seed=0)
    c = RandomSegments(songs, SR // 2, seed=1)
    assert all(np.array_equal(a[k][0], b[k][0]) for k in range(3))
    assert not np.array_equal(a[0][0], c[0][0])
    loader = prepared.train_dataloader()
    loader.sampler.set_epoch(0)
    epoch0 = list(loader.sampler)
    loader.sampler.set_epoch(1)
    assert set(epoch0).isdisjoint(loader.sampler)


def test_silent_segments_are_skipped(tmp_path):
    n = SR
    rng = np.random.default_rng(0)
    stems = {s: np.zeros((2, n), np.float32) for s in (*STEMS, MIXTURE)}
    for s in (*STEMS, MIXTURE):
        stems[s][:, n // 2 :] = 0.1 * rng.standard_normal((2, n - n // 2))
    write_song(tmp_path / "half_silent", stems, SR)
    song = Song(tmp_path / "half_silent", SR)
    fixed = FixedSegments([song], SR // 4)
    assert [start for _, start in fixed.index] == [2 * SR // 4, 3 * SR // 4]
    random = RandomSegments([song], SR // 4, seed=0)
    assert all(np.abs(random[k][1].numpy()).max() > 0.01 for k in range(10))


def test_unequal_stem_lengths_rejected_naming_the_file(tmp_path):
    stems = {s: np.zeros((2, 1000), np.float32) for s in (*STEMS, MIXTURE)}
    stems["drums"] = np.zeros((2, 900), np.float32)
    write_song(tmp_path / "bad", stems, SR)
    with pytest.raises(ValueError, match="drums.wav"):
        Song(tmp_path / "bad", SR)


def test_other_sample_rate_rejected_naming_the_file(tmp_path):
    stems = {s: np.zeros((2, 1000), np.float32) for s in (*STEMS, MIXTURE)}
    write_song(tmp_path / "song", stems, SR)
    sf.write(str(tmp_path / "song" / "bass.wav"), np.zeros((1000, 2), np.float32), 22050)
    with pytest.raises(ValueError, match="bass.wav"):
        Song(tmp_path / "song", SR)


def test_command_line_fit_and_normalize(demo, tmp_path):
    songs = tmp_path / "songs"
    shutil.copytree(demo / "multitrack" / "train" / "song_000", songs / "song_000")
    fxnorm_main(["fit", "--songs", str(songs), "--out", str(tmp_path / "f.npz")])
    assert (tmp_path / "f.npz").is_file()
    fxnorm_main(["normalize", "--features", str(tmp_path / "f.npz"), "--songs", str(demo / "dry"), "--out", str(tmp_path / "out"), "--inference"])
    normalized, _ = read_song(tmp_path / "out" / "dry_000")
    assert set(normalized) == set(STEMS)
    mtime = (tmp_path / "out" / "dry_000" / "vocals.wav").stat().st_mtime_ns
    fxnorm_main(["normalize", "--features", str(tmp_path / "f.npz"), "--songs", str(demo / "dry"), "--out", str(tmp_path / "out"), "--inference"])
    assert (tmp_path / "out" / "dry_000" / "vocals.wav").stat().st_mtime_ns == mtime  # resumed, not redone


def test_cache_refuses_stems_of_another_normalisation(demo, tmp_path):
    """Resuming into a cache filled with other features, reverb mode or seed is an error naming
    the folder and what changed, so a cache never mixes two normalisations."""
    songs, out = demo / "dry", tmp_path / "out"
    normalize_folder(FxNormalizer.musdb18_reference(), songs, out, inference=True, progress=False)
    assert json.loads((out / "fxnorm.json").read_text())["features"] == FxNormalizer.musdb18_reference().fingerprint()
    assert normalize_folder(FxNormalizer.musdb18_reference(), songs, out, inference=True, progress=False) == 0
    other = FxNormalizer.musdb18_reference()
    other.loudness_target["vocals"] -= 1.0
    for normalizer, inference, seed, changed in (
        (other, True, 0, "features"),
        (FxNormalizer.musdb18_reference(), False, 0, "inference"),
        (FxNormalizer.musdb18_reference(), True, 1, "seed"),
    ):
        with pytest.raises(ValueError, match=rf"{out}.*{changed} changed"):
            normalize_folder(normalizer, songs, out, inference=inference, seed=seed, progress=False)
    (out / "fxnorm.json").unlink()
    with pytest.raises(ValueError, match="no fxnorm.json"):
        normalize_folder(FxNormalizer.musdb18_reference(), songs, out, inference=True, progress=False)
