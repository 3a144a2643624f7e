"""PhraseDataModule: song-level reproducible splits, whole-batch reads, device-side unpacking."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import train
from datamodules.pianoroll import load_phrase_cache, pack_phrases, write_phrase_cache
from datamodules.phrases import PackedPhrases, PhraseDataModule
from datamodules.splits import song_split
from tests.test_pianoroll import song

SONGS, PER_SONG = 10, 5


@pytest.fixture
def cache(tmp_path):
    """50 random phrases: 5 from each of 10 songs, the songs interleaved in cache order."""
    phrases = np.random.default_rng(0).random((SONGS * PER_SONG, 128, 57)) < 0.1
    sources = [f"song{i % SONGS}.mid" for i in range(SONGS * PER_SONG)]
    write_phrase_cache(tmp_path / "cache", pack_phrases(phrases), sources, np.arange(len(sources)) // SONGS)
    return tmp_path / "cache", phrases


def _ready(path, **kwargs):
    module = PhraseDataModule(cache=str(path), **kwargs)
    module.prepare_data()
    module.setup("fit")
    return module


def _songs(module, split):
    return set(module.phrases.sources[module.splits[split].numpy()])


def test_split_deals_whole_songs_reproducibly(cache):
    path, _ = cache
    a, b, c = _ready(path, seed=1), _ready(path, seed=1), _ready(path, seed=2)
    train, val = a.splits["train"], a.splits["val"]
    assert (len(train), len(val)) == (40, 10)
    assert sorted(torch.cat([train, val]).tolist()) == list(range(50))
    assert len(_songs(a, "val")) == 2 and not _songs(a, "train") & _songs(a, "val")
    assert torch.equal(train, b.splits["train"]) and torch.equal(val, b.splits["val"])
    assert _songs(a, "val") != _songs(c, "val")


def test_test_split_is_a_third_set_of_songs(cache):
    path, _ = cache
    module = _ready(path, val_fraction=0.2, test_fraction=0.2, seed=3)
    songs = [_songs(module, split) for split in ("train", "val", "test")]
    assert [len(s) for s in songs] == [6, 2, 2]
    assert not (songs[0] & songs[1] or songs[0] & songs[2] or songs[1] & songs[2])


def test_split_ignores_rank_and_global_random_state(cache, monkeypatch):
    """Ranks differ only in their environment and random state; the split reads neither."""
    path, _ = cache
    reference = _ready(path, seed=4).splits
    for rank in (1, 3):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        torch.manual_seed(100 + rank)
        np.random.seed(100 + rank)
        splits = _ready(path, seed=4).splits
        assert all(torch.equal(splits[name], reference[name]) for name in reference)


def test_song_split_meets_each_share_within_one_song():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 40, size=300)
    source_index = rng.permutation(np.repeat(np.arange(300), sizes))
    splits = song_split(source_index, {"val": 0.2, "test": 0.1}, seed=7)
    assert sorted(np.concatenate(list(splits.values())).tolist()) == list(range(len(source_index)))
    owners = [set(source_index[index]) for index in splits.values()]
    assert not (owners[0] & owners[1] or owners[0] & owners[2] or owners[1] & owners[2])
    for name, fraction in (("val", 0.2), ("test", 0.1)):
        target = round(len(source_index) * fraction)
        assert target <= len(splits[name]) < target + sizes.max()
    again = song_split(source_index, {"val": 0.2, "test": 0.1}, seed=7)
    assert all(np.array_equal(again[name], splits[name]) for name in splits)


def test_batches_are_whole_float_phrases_in_split_order(cache):
    path, phrases = cache
    module = _ready(path, batch_size=16)
    batches = [module.on_after_batch_transfer(batch, 0) for batch in module.val_dataloader()]
    assert [tuple(b.shape) for b in batches] == [(10, 128, 57)]
    assert batches[0].dtype == torch.float32
    np.testing.assert_array_equal(batches[0].numpy(), phrases[module.splits["val"].numpy()])
    np.testing.assert_array_equal(module.val_phrases().numpy(), phrases[module.splits["val"].numpy()])
    assert torch.equal(module.val_packed(), torch.from_numpy(pack_phrases(phrases[module.splits["val"].numpy()])))
    train = torch.cat([module.on_after_batch_transfer(b, 0) for b in module.train_dataloader()])
    assert train.shape == (40, 128, 57)
    assert sorted(map(bytes, train.bool().numpy().reshape(40, -1))) == sorted(map(bytes, module.train_phrases().numpy().reshape(40, -1)))


def test_dataset_fetches_a_batch_in_one_read(cache):
    path, phrases = cache
    packed = load_phrase_cache(path).packed
    dataset = PackedPhrases(packed, torch.tensor([5, 3, 9]))
    assert torch.equal(dataset.__getitems__([2, 0]), torch.from_numpy(pack_phrases(phrases[[9, 5]])))
    assert torch.equal(dataset[1], torch.from_numpy(pack_phrases(phrases[[3]])[0]))


def test_too_few_songs_for_the_split_fails_clearly(tmp_path):
    write_phrase_cache(tmp_path / "tiny", np.zeros((3, 912), np.uint8), ["a.mid", "a.mid", "a.mid"], [0, 1, 2])
    with pytest.raises(ValueError, match="holds 3 phrases of 1 files: too few .* by song"):
        _ready(tmp_path / "tiny", val_fraction=0.3)


def test_prepare_data_ingests_a_missing_cache(tmp_path):
    (tmp_path / "midi").mkdir()
    for i in range(3):
        song(tmp_path / "midi" / f"{i}.mid", bars=9)
    module = _ready(tmp_path / "cache", midi=str(tmp_path / "midi"), val_fraction=0.34)
    assert len(module.phrases) == 6 and len(module.splits["val"]) == 2 and len(_songs(module, "val")) == 1


@pytest.mark.parametrize("problem", ["missing", "cut_short_shard", "bad_report", "report_without_shards", "one_song"])
def test_unusable_cache_is_one_line_from_train_py(tmp_path, capsys, problem):
    broken = tmp_path / "broken"
    write_phrase_cache(broken, np.zeros((3, 912), np.uint8), ["a.mid"] * 3, [0, 1, 2])
    shard = broken / "shard-000000.npz"
    if problem == "missing":
        broken = tmp_path / "nowhere"
    elif problem == "cut_short_shard":
        shard.write_bytes(shard.read_bytes()[:500])
    elif problem in ("bad_report", "report_without_shards"):
        (broken / "report.json").write_text("{" if problem == "bad_report" else "[]")
    argv = ["experiment=vqvae", f"datamodule.cache={broken}", "datamodule.midi=null", f"run_dir={tmp_path / 'run'}", "logger=none"]
    assert train.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and str(broken) in error and "Traceback" not in error
