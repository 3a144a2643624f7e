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
from datamodules.multitrack import (MUSDB18_VALIDATION, EpochKeys, FixedSegments, MultitrackDataModule, PackedSong,
                                    RandomSegments, write_packed_song)
from framework.errors import InputError

SR = 44100


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("mt")
    write_multitrack_demo(root, seed=0, n_train=3, n_test=1, n_dry=1, seconds=(2.0, 2.5))
    return root


def make_datamodule(demo, tmp_path, seed=0, root=None, **kwargs):
    settings = dict(root=str(root or demo / "multitrack"), cache=str(tmp_path / "cache"), segment_seconds=0.5,
                    batch_size=2, val_songs=1, seed=seed, segments_per_epoch=4, demo_root=None, num_workers=0)
    return MultitrackDataModule(**{**settings, **kwargs})


def cached_songs(folder):
    return sorted(p.name for p in folder.iterdir() if (p / "index.json").is_file())


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


def test_batches_have_the_documented_shapes(prepared, demo):
    stems, mixture = next(iter(prepared.train_dataloader()))
    assert stems.shape == (2, 8, SR // 2) and mixture.shape == (2, 2, SR // 2)
    assert stems.dtype == mixture.dtype == torch.float32
    assert len(prepared.val_set) > 0
    assert (prepared.cache / "features.npz").is_file()
    assert len(cached_songs(prepared.cache / "train")) == 3 and len(cached_songs(prepared.cache / "test")) == 1
    prepared.setup("test")
    (song_stems, song_mixture), = list(prepared.test_dataloader())  # one whole song per batch
    raw, _ = read_song(demo / "multitrack" / "test" / "song_000", (MIXTURE,))
    assert song_stems.shape == (1, 8, raw[MIXTURE].shape[1])
    np.testing.assert_array_equal(song_mixture[0].numpy(), raw[MIXTURE])


def test_every_rank_gets_the_same_number_of_fresh_keys():
    for n in (4, 5, 7):
        ranks = [EpochKeys(n, num_replicas=2, rank=r) for r in (0, 1)]
        assert len(ranks[0]) == len(ranks[1]) == -(-n // 2)
        seen = []
        for epoch in (0, 1):
            for sampler in ranks:
                sampler.set_epoch(epoch)
                keys = list(sampler)
                assert len(keys) == len(sampler)
                seen += keys
        assert len(seen) == len(set(seen))


def test_prepare_data_resumes_without_rewriting(prepared):
    before = {p: p.stat().st_mtime_ns for p in (prepared.cache / "train").rglob("*.npy")}
    prepared.prepare_data()
    assert before == {p: p.stat().st_mtime_ns for p in (prepared.cache / "train").rglob("*.npy")}


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


def test_silent_segments_are_skipped_without_reading_audio(tmp_path):
    n = SR
    rng = np.random.default_rng(0)
    stems = {s: np.zeros((2, n), np.float32) for s in (*STEMS, MIXTURE)}
    for s in (*STEMS, MIXTURE):
        stems[s][:, n // 2 :] = 0.1 * rng.standard_normal((2, n - n // 2))
    write_packed_song(tmp_path / "half_silent", stems, SR)
    song = PackedSong(tmp_path / "half_silent", SR)
    fixed = FixedSegments([song], SR // 4)
    assert [start for _, start in fixed.index] == [2 * SR // 4, 3 * SR // 4]
    random = RandomSegments([song], SR // 4, seed=0)
    assert all(np.abs(random[k][1].numpy()).max() > 0.01 for k in range(10))
    stems_read, mixture_read = song.read(100, 300)
    np.testing.assert_array_equal(stems_read, np.concatenate([stems[s][:, 100:300] for s in STEMS]))
    np.testing.assert_array_equal(mixture_read, stems[MIXTURE][:, 100:300])


def _song(folder, length=1000, **overrides):
    write_song(folder, {s: overrides.get(s, np.zeros((2, length), np.float32)) for s in (*STEMS, MIXTURE)}, SR)


@pytest.mark.parametrize("defect, file", [
    ("missing", "mixture.wav"), ("empty", "bass.wav"), ("unreadable", "drums.wav"), ("shorter", "other.wav"),
    ("rate", "vocals.wav"),
])
def test_bad_input_fails_naming_song_and_file_before_any_cache_is_written(demo, tmp_path, defect, file):
    root = tmp_path / "root"
    shutil.copytree(demo / "multitrack", root)
    song = root / "train" / "song_001"
    path = song / file
    if defect == "missing":
        path.unlink()
    elif defect == "empty":
        sf.write(str(path), np.zeros((0, 2), np.float32), SR)
    elif defect == "unreadable":
        path.write_bytes(b"not a wav file")
    elif defect == "shorter":
        audio, _ = sf.read(str(path))
        sf.write(str(path), audio[:-10], SR)
    else:
        audio, _ = sf.read(str(path))
        sf.write(str(path), audio, 22050)
    dm = make_datamodule(demo, tmp_path, root=root)
    with pytest.raises(InputError, match=rf"song_001/{file}") as error:
        dm.prepare_data()
    assert "\n" not in str(error.value)
    assert not (tmp_path / "cache").exists()


def test_a_root_without_test_songs_fails_before_training_unless_only_fitting(demo, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(demo / "multitrack" / "train", root / "train")
    with pytest.raises(InputError, match="test.*stages=\\[fit\\]"):
        make_datamodule(demo, tmp_path, root=root).prepare_data()
    assert not (tmp_path / "cache").exists()
    make_datamodule(demo, tmp_path, root=root, stages=["fit"]).prepare_data()
    assert len(cached_songs(tmp_path / "cache" / "train")) == 3


def test_two_roots_never_share_a_cache_silently(demo, tmp_path, prepared):
    other = tmp_path / "other"
    shutil.copytree(demo / "multitrack", other)
    default = MultitrackDataModule(root=str(other), demo_root=None)
    assert default.cache == tmp_path / "other_fxnorm" and default.features.parent == default.cache
    shutil.copytree(prepared.cache, tmp_path / "cache")  # a cache filled from another root
    with pytest.raises(InputError, match=rf"source changed: '{demo / 'multitrack' / 'train'}' there, '{other / 'train'}' now"):
        make_datamodule(demo, tmp_path, root=other).prepare_data()


def test_features_are_fitted_on_training_songs_only(demo, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(demo / "multitrack", a)
    shutil.copytree(demo / "multitrack", b)
    shutil.rmtree(b / "train" / "song_002")  # another validation song: same name, other audio
    shutil.copytree(a / "train" / "song_000", b / "train" / "song_002")
    fingerprints = []
    for root in (a, b):
        dm = make_datamodule(demo, tmp_path / root.name, root=root, val_songs=["song_002"], stages=["fit"])
        dm.prepare_data()
        normalizer = FxNormalizer.load(dm.features)
        assert normalizer.fitted_on == ("song_000", "song_001")
        fingerprints.append(normalizer.fingerprint())
    assert fingerprints[0] == fingerprints[1]
    leaky = make_datamodule(demo, tmp_path / "a", root=a, val_songs=["song_001"], stages=["fit"])
    with pytest.raises(InputError, match="fitted on validation song.*song_001"):
        leaky.prepare_data()


def test_musdb18_official_validation_songs_are_used_when_present(tmp_path):
    names = [*MUSDB18_VALIDATION, "A Classic Education - NightOwl", "Zeno - Signs"]
    for name in names:
        (tmp_path / "train" / name).mkdir(parents=True)
        sf.write(str(tmp_path / "train" / name / "vocals.wav"), np.zeros((10, 2), np.float32), SR)
    train, validation = MultitrackDataModule(root=str(tmp_path), val_songs=0.5, demo_root=None).split()
    assert sorted(validation) == sorted(MUSDB18_VALIDATION) and train == names[-2:]


def test_inputs_do_not_depend_on_the_runs_seed(prepared, demo, tmp_path):
    """Reverb is drawn per song and stem from the normalisation seed: another run seed reuses the
    cache as it is, and one stem's draw does not depend on which other stems the song has."""
    before = {p: p.stat().st_mtime_ns for p in prepared.cache.rglob("audio.npy")}
    other = make_datamodule(demo, prepared.cache.parent, seed=1)
    other.prepare_data()
    assert before == {p: p.stat().st_mtime_ns for p in prepared.cache.rglob("audio.npy")}
    normalizer = FxNormalizer.load(prepared.features)
    stems, _ = read_song(demo / "multitrack" / "test" / "song_000")
    alone = normalizer.normalize_song({"other": stems["other"]}, SR, song="song_000")["other"]
    together = normalizer.normalize_song(stems, SR, song="song_000")["other"]
    np.testing.assert_array_equal(alone, together)


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


@pytest.mark.parametrize("defect", ["no songs folder", "no features file", "another normalisation"])
def test_command_line_errors_are_one_line_naming_the_file(demo, tmp_path, capsys, defect):
    songs, out, features = demo / "dry", tmp_path / "out", "musdb18"
    if defect == "no songs folder":
        songs = tmp_path / "missing"
    elif defect == "no features file":
        features = str(tmp_path / "missing.npz")
    else:
        fxnorm_main(["normalize", "--features", features, "--songs", str(songs), "--out", str(out), "--inference"])
        capsys.readouterr()
    assert fxnorm_main(["normalize", "--features", features, "--songs", str(songs), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    named = {"no songs folder": songs, "no features file": features, "another normalisation": out}[defect]
    assert len(error) == 1 and str(named) in error[0], error


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


def test_every_rank_gets_a_test_song_even_when_there_are_fewer_songs_than_ranks():
    from datamodules.multitrack import SongShards

    def shard(n, rank, replicas):
        sampler = SongShards(list(range(n)))
        sampler.num_replicas, sampler.rank = replicas, rank
        return list(sampler)

    assert [shard(5, r, 2) for r in (0, 1)] == [[0, 2, 4], [1, 3]]
    assert [shard(1, r, 2) for r in (0, 1)] == [[0], [0]]
