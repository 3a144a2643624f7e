"""CNNVAE: shared conv stacks, finite per-cell loss, KL warm-up, sampling from the prior."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_modules.cnn_vae import CNNVAE, kl_weight
from lightning_modules.nets.conv_stacks import EncoderTrunk, UpsamplingDecoder
from lightning_modules.vqvae import VQVAE
from tests.test_vqvae import loop_phrases, quiet_trainer


def test_conv_stacks_are_the_vqvaes():
    vae, vqvae = CNNVAE(), VQVAE()
    assert isinstance(vae.encoder, EncoderTrunk) and isinstance(vqvae.encoder[0], EncoderTrunk)
    assert isinstance(vae.decoder, UpsamplingDecoder) and isinstance(vqvae.decoder[1], UpsamplingDecoder)
    # same layer shapes: the VQ-VAE's trunk and upsampling path load into the VAE unchanged
    vae.encoder.load_state_dict(vqvae.encoder[0].state_dict())
    vae.decoder.load_state_dict(vqvae.decoder[1].state_dict())
    # flatten 128 x 32 = 4096 -> (mu, sigma) of 512 each; 512 -> 4096
    assert tuple(vae.to_posterior.weight.shape) == (1024, 4096)
    assert tuple(vae.from_latent.weight.shape) == (4096, 512)


def test_kl_weight_schedule():
    assert [kl_weight(e, 4) for e in (0, 1, 2, 3.5, 4, 10)] == [0.0, 0.25, 0.5, 0.875, 1.0, 1.0]
    assert kl_weight(0, 0) == 1.0  # no warm-up


def test_kl_weight_follows_the_training_progress():
    loops = loop_phrases(8).float()
    model = CNNVAE(channels=8, latent_dim=16, kl_warmup_epochs=2)
    seen = []
    model.training_step = lambda batch, batch_idx: seen.append(model.kl_weight_at(batch_idx)) or None
    quiet_trainer(max_epochs=3, limit_val_batches=0).fit(model, DataLoader(loops, batch_size=2))
    assert seen == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("phrases", [torch.zeros(3, 128, 57), loop_phrases(1).float()], ids=["all-zero", "batch-of-one"])
def test_losses_are_finite_and_per_cell(phrases):
    torch.manual_seed(0)
    model = CNNVAE(channels=16, latent_dim=32).train()
    bce, kl, logits = model._losses(phrases)
    (bce + kl).backward()
    assert logits.shape == (len(phrases), 128, 57)
    assert torch.isfinite(bce) and torch.isfinite(kl) and kl >= 0
    assert 0.3 < bce.item() < 1.5  # mean over cells (log 2 ~ 0.69 at initialisation), not a sum
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_kl_of_the_prior_is_zero():
    model = CNNVAE(channels=8, latent_dim=16).eval()
    with torch.no_grad():
        model.to_posterior.weight.zero_()
        model.to_posterior.bias.zero_()
        model.to_posterior.bias[16:] = torch.log(torch.expm1(torch.tensor(1.0 - 1e-5)))  # softplus -> 1 - MIN_SIGMA
    _, kl, _ = model._losses(loop_phrases(2).float())
    assert kl.item() == pytest.approx(0.0, abs=1e-7)


def test_sample_is_reproducible_bool_phrases():
    model = CNNVAE(channels=16, latent_dim=32).eval()
    first = model.sample(5, torch.Generator().manual_seed(3))
    again = model.sample(5, torch.Generator().manual_seed(3))
    other = model.sample(5, torch.Generator().manual_seed(4))
    assert first.shape == (5, 128, 57) and first.dtype == torch.bool
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_validation_logs_the_reconstruction_hamming_error():
    torch.manual_seed(0)
    loops = loop_phrases(6).float()
    model = CNNVAE(channels=8, latent_dim=16)
    metrics = quiet_trainer().validate(model, DataLoader(loops, batch_size=4), verbose=False)[0]
    direct = (model.eval().reconstruct(loops) != loops.bool()).float().mean().item()
    assert metrics["val/hamming"] == pytest.approx(direct, abs=1e-7)
    assert {"val/loss", "val/bce", "val/kl"} <= metrics.keys()
