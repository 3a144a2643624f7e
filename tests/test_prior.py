"""LSTM prior: batched generation equals one-at-a-time, decoding, training beats a unigram baseline."""
from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from lightning_modules.prior import ONEDNN_MIN_BATCH, LSTMPrior
from lightning_modules.vqvae import VQVAE, threshold
from tests.helpers import run_train

NUM_CODES = 16


def tiny_prior(**kwargs) -> LSTMPrior:
    torch.manual_seed(0)
    options = dict(num_codes=NUM_CODES, embed_dim=8, hidden=16, layers=2, first_index_distribution=torch.arange(1.0, NUM_CODES + 1))
    return LSTMPrior(**{**options, **kwargs})


def save_tiny_vqvae(path, num_codes: int = NUM_CODES) -> VQVAE:
    """A randomly initialised small VQ-VAE saved as a Lightning checkpoint at ``path``."""
    torch.manual_seed(1)
    vqvae = VQVAE(channels=8, num_codes=num_codes, code_dim=4).eval()
    checkpoint = {"state_dict": vqvae.state_dict(), "hyper_parameters": dict(vqvae.hparams), "pytorch-lightning_version": pl.__version__}
    torch.save(checkpoint, path)
    return vqvae


def markov_codes(n: int, seed: int, num_codes: int = NUM_CODES, stay: float = 0.9) -> torch.Tensor:
    """Sequences (n, 32) where index t+1 = (3 * index t + 1) mod K with probability ``stay``, else uniform."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.empty(n, 32, dtype=torch.long)
    codes[:, 0] = torch.randint(num_codes, (n,), generator=generator)
    for t in range(1, 32):
        follow = torch.rand(n, generator=generator) < stay
        codes[:, t] = torch.where(follow, (3 * codes[:, t - 1] + 1) % num_codes, torch.randint(num_codes, (n,), generator=generator))
    return codes


class MarkovCodes(pl.LightningDataModule):
    """Stand-in for the code DataModule: Markov-chain codes and the attributes the prior reads."""

    def __init__(self, vqvae_ckpt: str | None = None, batch_size: int = 64):
        super().__init__()
        self.train_codes, self.val_codes = markov_codes(512, seed=0), markov_codes(128, seed=1)
        self.first_index_distribution = torch.bincount(self.train_codes[:, 0], minlength=NUM_CODES).float()
        self.num_codes = NUM_CODES
        self.vqvae_ckpt = vqvae_ckpt
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.train_codes, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_codes, batch_size=self.batch_size)


def quiet_trainer(tmp_path, **kwargs) -> pl.Trainer:
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=str(tmp_path))
    return pl.Trainer(**{**options, **kwargs})


@pytest.mark.parametrize("mode", ["temperature", "top_k", "top_p"])
def test_batched_generation_equals_one_sequence_at_a_time(mode):
    n = ONEDNN_MIN_BATCH  # the batched path takes the other CPU LSTM kernel
    prior = tiny_prior(sample_mode=mode, sample_temperature=0.8, sample_top_k=5, sample_top_p=0.5)
    batched = prior.sample_codes(n, torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(7)
    one_by_one = torch.cat([prior.sample_codes(1, generator) for _ in range(n)])
    assert torch.equal(batched, one_by_one)
    assert torch.equal(batched, prior.sample_codes(n, torch.Generator().manual_seed(7), batch_size=5))
    assert not torch.equal(batched, prior.sample_codes(n, torch.Generator().manual_seed(8)))


def test_generated_steps_follow_the_model_and_the_first_index_distribution():
    prior = tiny_prior(first_index_distribution=torch.eye(NUM_CODES)[5])
    codes = prior.sample_codes(6, torch.Generator().manual_seed(0), temperature=0.0)
    assert (codes[:, 0] == 5).all()
    logits, _ = prior(codes[:, :-1])
    assert torch.equal(codes[:, 1:], logits.argmax(dim=-1))  # greedy: every index is the argmax given its prefix
    with pytest.raises(ValueError, match="first-index distribution"):
        LSTMPrior(num_codes=NUM_CODES, embed_dim=8, hidden=16, layers=1).sample_codes(1)


def test_sampling_defaults_come_from_hyperparameters():
    prior = tiny_prior(sample_mode="top_k", sample_top_k=1)
    greedy = prior.sample_codes(4, torch.Generator().manual_seed(2), temperature=0.0)
    assert torch.equal(prior.sample_codes(4, torch.Generator().manual_seed(2)), greedy)  # top-1 is greedy
    assert not torch.equal(prior.sample_codes(4, torch.Generator().manual_seed(2), mode="temperature"), greedy)


def test_sample_decodes_with_the_vqvae_loaded_lazily(tmp_path):
    vqvae = save_tiny_vqvae(tmp_path / "vqvae.ckpt")
    prior = tiny_prior(vqvae_ckpt=str(tmp_path / "vqvae.ckpt"))
    phrases = prior.sample(5, torch.Generator().manual_seed(3), batch_size=2)
    codes = prior.sample_codes(5, torch.Generator().manual_seed(3))
    assert phrases.dtype == torch.bool and phrases.shape == (5, 128, 57)
    assert torch.equal(phrases, threshold(vqvae.decode_indices(codes)))
    assert not any(key.startswith("_vqvae") or "codebook" in key for key in prior.state_dict())
    with pytest.raises(ValueError, match="vqvae_ckpt is not set"):
        tiny_prior().sample(1)


def test_validation_accuracy_counts_every_predicted_position(tmp_path):
    prior = tiny_prior()
    codes = markov_codes(10, seed=4)
    [metrics] = quiet_trainer(tmp_path).validate(prior, DataLoader(codes, batch_size=4), verbose=False)  # batches 4, 4, 2
    with torch.no_grad():
        logits, _ = prior(codes[:, :-1])
    expected_acc = (logits.argmax(-1) == codes[:, 1:]).float().mean()
    expected_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, NUM_CODES), codes[:, 1:].reshape(-1))
    assert metrics["val/acc"] == pytest.approx(expected_acc.item(), abs=1e-6)
    assert metrics["val/loss"] == pytest.approx(expected_loss.item(), rel=1e-5)


def test_training_beats_the_unigram_baseline_and_checkpoint_carries_what_sampling_needs(tmp_path):
    datamodule = MarkovCodes(vqvae_ckpt=str(tmp_path / "vqvae.ckpt"))
    save_tiny_vqvae(datamodule.vqvae_ckpt)
    prior = LSTMPrior(num_codes=NUM_CODES, embed_dim=16, hidden=48, layers=1, lr=1e-2)
    trainer = quiet_trainer(tmp_path, max_epochs=4, num_sanity_val_steps=0)
    trainer.fit(prior, datamodule=datamodule)

    train_targets = datamodule.train_codes[:, 1:].flatten()
    most_frequent = torch.bincount(train_targets, minlength=NUM_CODES).argmax()
    unigram_acc = (datamodule.val_codes[:, 1:] == most_frequent).float().mean().item()
    val_acc = trainer.callback_metrics["val/acc"].item()
    assert val_acc > unigram_acc + 0.5  # the chain is 90 % predictable from the previous index

    trainer.save_checkpoint(tmp_path / "prior.ckpt")
    restored = LSTMPrior.load_from_checkpoint(tmp_path / "prior.ckpt")
    expected = datamodule.first_index_distribution / datamodule.first_index_distribution.sum()
    assert torch.allclose(restored.first_index_distribution, expected)
    assert restored.hparams.vqvae_ckpt == datamodule.vqvae_ckpt
    assert restored.sample(3, torch.Generator().manual_seed(0)).shape == (3, 128, 57)


def test_codebook_size_mismatch_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="num_codes=32"):
        quiet_trainer(tmp_path, max_epochs=1).fit(LSTMPrior(num_codes=32, embed_dim=4, hidden=8, layers=1), datamodule=MarkovCodes())


@pytest.mark.slow
def test_validation_accuracy_is_summed_over_ranks(tmp_path):
    prior = tiny_prior()
    codes = markov_codes(12, seed=5)  # 6 sequences per rank, batches of 4 and 2: no padding duplicates
    trainer = quiet_trainer(tmp_path, devices=2, strategy="ddp_spawn")
    [metrics] = trainer.validate(prior, DataLoader(codes, batch_size=4), verbose=False)
    with torch.no_grad():
        logits, _ = prior(codes[:, :-1])
    assert metrics["val/acc"] == pytest.approx((logits.argmax(-1) == codes[:, 1:]).float().mean().item(), abs=1e-6)


@pytest.fixture(scope="module")
def code_cache(tmp_path_factory):
    """A code cache of 40 random phrases encoded by a tiny VQ-VAE with 16 codes."""
    from datamodules.codes import encode_phrase_cache
    from datamodules.pianoroll import pack_phrases, write_phrase_cache

    root = tmp_path_factory.mktemp("codes")
    vqvae = save_tiny_vqvae(root / "vqvae.ckpt")
    phrases = np.random.default_rng(0).random((40, 128, 57)) < 0.1
    write_phrase_cache(root / "phrases", pack_phrases(phrases), [f"song{i}.mid" for i in range(40)], np.zeros(40, dtype=int))
    return encode_phrase_cache(vqvae, root / "phrases", root / "codes", vqvae_ckpt=root / "vqvae.ckpt")


def test_prior_experiment_takes_codebook_size_and_vqvae_from_the_code_cache(code_cache, tmp_path):
    trainer, module, datamodule, _ = run_train([
        "experiment=prior", f"datamodule.codes={code_cache}", f"run_dir={tmp_path}", "logger=none",
        "trainer.accelerator=cpu", "trainer.max_epochs=1", "datamodule.batch_size=16", "datamodule.val_fraction=0.25",
        "model.embed_dim=8", "model.hidden=16", "model.layers=1", "trainer.enable_progress_bar=false",
    ])
    assert module.hparams.num_codes == NUM_CODES
    assert "val/acc" in trainer.callback_metrics
    restored = LSTMPrior.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert restored.hparams.vqvae_ckpt == datamodule.vqvae_ckpt
    assert torch.allclose(restored.first_index_distribution, datamodule.first_index_distribution.float())
    assert restored.sample(2, torch.Generator().manual_seed(0)).shape == (2, 128, 57)
