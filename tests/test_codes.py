"""Code cache: encode -> load round trip, first-index distribution, CLI, CodeDataModule."""
from __future__ import annotations

import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from datamodules.codes import CODES_FILE, CodeDataModule, encode_phrase_cache, load_codes, main
from datamodules.pianoroll import pack_phrases, write_phrase_cache
from lightning_modules.vqvae import VQVAE
from tests.test_vqvae import loop_phrases

N_PHRASES = 10


@pytest.fixture(scope="module")
def phrases() -> torch.Tensor:
    return loop_phrases(N_PHRASES, seed=1)


@pytest.fixture(scope="module")
def phrase_cache(tmp_path_factory, phrases):
    path = tmp_path_factory.mktemp("phrases") / "cache"
    write_phrase_cache(path, pack_phrases(phrases.numpy()), [f"song{i % 3}.mid" for i in range(N_PHRASES)],
                       np.arange(N_PHRASES))
    return path


@pytest.fixture(scope="module")
def vqvae() -> VQVAE:
    torch.manual_seed(0)
    model = VQVAE(channels=16, num_codes=8)
    model.train()
    model(loop_phrases(16, seed=2).float())  # one codebook update: entries placed among encoder outputs
    return model.eval()


@pytest.fixture(scope="module")
def vqvae_ckpt(tmp_path_factory, vqvae):
    path = tmp_path_factory.mktemp("ckpt") / "vqvae.ckpt"
    torch.save({"state_dict": vqvae.state_dict(), "hyper_parameters": dict(vqvae.hparams),
                "pytorch-lightning_version": pl.__version__}, path)
    return path


@pytest.fixture(scope="module")
def code_cache(tmp_path_factory, vqvae, phrase_cache, vqvae_ckpt):
    out = tmp_path_factory.mktemp("codes") / "codes"
    encode_phrase_cache(vqvae, phrase_cache, out, batch_size=3, vqvae_ckpt=vqvae_ckpt)
    return out


def test_round_trip_equals_encode(code_cache, vqvae, phrases, vqvae_ckpt):
    codes, first = load_codes(code_cache)
    expected = vqvae.encode(phrases)
    assert codes.dtype == torch.long and torch.equal(codes, expected)
    assert np.load(code_cache / CODES_FILE).dtype == np.int16
    assert first.shape == (8,) and first.sum().item() == pytest.approx(1.0)
    assert torch.equal(first, torch.bincount(expected[:, 0], minlength=8).double() / N_PHRASES)
    meta = json.loads((code_cache / "meta.json").read_text())
    assert meta["num_phrases"] == N_PHRASES and meta["num_codes"] == 8 and meta["code_steps"] == 32
    assert meta["vqvae_ckpt"] == str(vqvae_ckpt.resolve())


def test_command_line_encodes_from_a_checkpoint(tmp_path, code_cache, phrase_cache, vqvae_ckpt):
    out = tmp_path / "cli"
    assert main(["encode", "--ckpt", str(vqvae_ckpt), "--phrases", str(phrase_cache), "--out", str(out),
                 "--batch-size", "4"]) == 0
    assert torch.equal(load_codes(out)[0], load_codes(code_cache)[0])


def test_missing_or_corrupt_cache_is_named(tmp_path, code_cache):
    with pytest.raises(FileNotFoundError, match="python -m datamodules.codes encode"):
        load_codes(tmp_path / "absent")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("meta.json", "first_index_distribution.npy"):
        (broken / name).write_bytes((code_cache / name).read_bytes())
    np.save(broken / CODES_FILE, np.full((N_PHRASES, 32), 8, dtype=np.int16))
    with pytest.raises(ValueError, match=CODES_FILE):
        load_codes(broken)


def test_code_datamodule_splits_by_song_and_batches(code_cache, vqvae_ckpt):
    module = CodeDataModule(str(code_cache), batch_size=4, val_fraction=0.2, seed=5)
    assert module.num_codes == 8 and module.vqvae_ckpt == str(vqvae_ckpt.resolve())
    module.prepare_data()
    module.setup("fit")
    codes, _ = load_codes(code_cache)
    train = torch.cat(list(module.train_dataloader()))
    val = torch.cat(list(module.val_dataloader()))
    assert train.dtype == torch.long and train.shape[1] == 32 and len(train) + len(val) == N_PHRASES
    rows = lambda t: sorted(map(tuple, t.tolist()))
    assert rows(torch.cat([train, val])) == rows(codes)  # a partition: nothing lost, nothing repeated
    assert next(iter(module.train_dataloader())).shape == (4, 32)
    expected = torch.bincount(module.train_codes[:, 0], minlength=8).double() / len(module.train_codes)
    assert torch.equal(module.first_index_distribution, expected)  # the prior's z_0: training split only

    song = np.arange(N_PHRASES) % 3  # the phrase cache's sources: song{i % 3}.mid
    with np.load(code_cache / "sources.npz") as sources:
        assert sources["files"][sources["file_index"]].tolist() == [f"song{s}.mid" for s in song]
    assert torch.equal(val, codes[module.splits["val"]]) and torch.equal(module.train_codes, codes[module.splits["train"]])
    assert len(val) in (3, 4) and not set(song[module.splits["val"]]) & set(song[module.splits["train"]])  # whole songs

    again = CodeDataModule(str(code_cache), val_fraction=0.2, seed=5)
    again.setup("fit")
    assert torch.equal(again.val_codes, module.val_codes)  # the split is reproducible


def test_code_cache_without_sources_cannot_be_split(tmp_path, code_cache):
    old = tmp_path / "old"
    old.mkdir()
    for name in ("meta.json", "first_index_distribution.npy", CODES_FILE):
        (old / name).write_bytes((code_cache / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="cannot be split by song"):
        CodeDataModule(str(old)).setup("fit")
