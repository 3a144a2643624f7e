"""PhraseDataModule: reproducible disjoint splits, whole-batch fetching, device-side unpacking."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.pianoroll import load_phrases, pack_phrases, write_phrase_cache
from datamodules.phrases import PackedPhrases, PhraseDataModule
from tests.test_pianoroll import song


@pytest.fixture
def cache(tmp_path):
    phrases = np.random.default_rng(0).random((50, 128, 57)) < 0.1
    write_phrase_cache(tmp_path / "cache", pack_phrases(phrases), [f"{i}.mid" for i in range(50)], np.zeros(50, int))
    return tmp_path / "cache", phrases


def _ready(path, **kwargs):
    module = PhraseDataModule(cache=str(path), **kwargs)
    module.prepare_data()
    module.setup("fit")
    return module


def test_split_is_a_reproducible_disjoint_partition(cache):
    path, _ = cache
    a, b, c = _ready(path, seed=1), _ready(path, seed=1), _ready(path, seed=2)
    train, val = a.splits["train"], a.splits["val"]
    assert (len(train), len(val)) == (40, 10)
    assert sorted(torch.cat([train, val]).tolist()) == list(range(50))
    assert torch.equal(train, b.splits["train"]) and torch.equal(val, b.splits["val"])
    assert not torch.equal(val, c.splits["val"])


def test_batches_are_whole_float_phrases_in_split_order(cache):
    path, phrases = cache
    module = _ready(path, batch_size=16)
    batches = [module.on_after_batch_transfer(batch, 0) for batch in module.val_dataloader()]
    assert [tuple(b.shape) for b in batches] == [(10, 128, 57)]
    assert batches[0].dtype == torch.float32
    np.testing.assert_array_equal(batches[0].numpy(), phrases[module.splits["val"].numpy()])
    np.testing.assert_array_equal(module.val_phrases().numpy(), phrases[module.splits["val"].numpy()])
    train = torch.cat([module.on_after_batch_transfer(b, 0) for b in module.train_dataloader()])
    assert train.shape == (40, 128, 57)
    assert sorted(map(bytes, train.bool().numpy().reshape(40, -1))) == sorted(map(bytes, module.train_phrases().numpy().reshape(40, -1)))


def test_dataset_fetches_a_batch_in_one_call(cache):
    path, _ = cache
    packed = torch.from_numpy(pack_phrases(load_phrases(path)))
    dataset = PackedPhrases(packed, torch.tensor([5, 3, 9]))
    assert torch.equal(dataset.__getitems__([2, 0]), packed[[9, 5]])
    assert torch.equal(dataset[1], packed[3])


def test_too_few_phrases_for_the_split_fails_clearly(tmp_path):
    write_phrase_cache(tmp_path / "tiny", np.zeros((2, 912), np.uint8), ["a.mid", "a.mid"], [0, 1])
    with pytest.raises(ValueError, match="holds 2 phrases"):
        _ready(tmp_path / "tiny", val_fraction=0.1)


def test_prepare_data_ingests_a_missing_cache(tmp_path):
    (tmp_path / "midi").mkdir()
    for i in range(3):
        song(tmp_path / "midi" / f"{i}.mid", bars=9)
    module = _ready(tmp_path / "cache", midi=str(tmp_path / "midi"), val_fraction=0.34)
    assert len(module.packed) == 6 and len(module.splits["val"]) == 2
