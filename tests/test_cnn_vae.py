"""CNNVAE: shared conv stacks, finite per-cell loss, KL warm-up, sampling from the prior."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_modules.cnn_vae import CALIBRATION_SEED, CNNVAE, kl_weight
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


def calibration_latents(model: CNNVAE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(CALIBRATION_SEED)
    return torch.randn(model.hparams.prior_calibration_samples, model.hparams.latent_dim, generator=generator)


def test_prior_samples_are_normalised_with_statistics_of_decoded_prior_latents():
    torch.manual_seed(0)
    model = CNNVAE(channels=8, latent_dim=16, prior_calibration_samples=64)
    quiet_trainer(max_epochs=2).fit(model, DataLoader(loop_phrases(8).float(), batch_size=4))
    model.eval()
    z = calibration_latents(model)
    with torch.no_grad():
        calibrated = model.decode(z, prior_statistics=True)
        posterior_statistics = model.decode(z)
        batch_statistics = model.train().decode(z)
    model.eval()
    # eval-mode decoding with the prior statistics reproduces the batch-statistics pass they were measured in
    torch.testing.assert_close(calibrated, batch_statistics, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(calibrated, posterior_statistics, atol=1e-2)
    # the training running statistics are left untouched by the calibration
    assert not torch.equal(model.decoder[1][1].running_mean, model.prior_statistics()["1.1.running_mean"])
    expected = torch.sigmoid(model.decode(torch.randn(3, 16, generator=torch.Generator().manual_seed(5)),
                                          prior_statistics=True)) >= 0.5
    assert torch.equal(model.sample(3, torch.Generator().manual_seed(5)), expected)



def test_prior_statistics_are_measured_through_synchronised_batchnorm_without_waiting_for_ranks():
    """With trainer.sync_batchnorm=true the decoder holds SyncBatchNorm layers; calibrating them must
    give the same statistics and must not start a collective (a rank samples on its own)."""
    torch.manual_seed(2)
    model = CNNVAE(channels=8, latent_dim=16, prior_calibration_samples=32).eval()
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.decoder.modules())
    expected, measured = model.prior_statistics(), synced.prior_statistics()
    assert expected.keys() == measured.keys() and len(expected) > 0
    for name in expected:
        torch.testing.assert_close(measured[name], expected[name])
    z = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(synced.decode(z, prior_statistics=True), model.decode(z, prior_statistics=True))

def test_prior_statistics_follow_the_weights():
    torch.manual_seed(1)
    model = CNNVAE(channels=8, latent_dim=16, prior_calibration_samples=32).eval()
    before = model.prior_statistics()
    assert model.prior_statistics() is before  # cached while the weights stand still
    with torch.no_grad():
        model.from_latent.weight.mul_(2.0)
    after = model.prior_statistics()
    assert after is not before and not torch.equal(after["1.1.running_var"], before["1.1.running_var"])


@pytest.mark.parametrize("dtype, agreement", [(torch.float64, 0.999), (torch.bfloat16, 0.9)])
def test_prior_samples_in_another_precision_match_float32(dtype, agreement):
    """A model run in double or bfloat16 (trainer.precision=64-true / bf16-true) samples the phrases
    of its float32 self, up to cells its rounding moves across the threshold."""
    torch.manual_seed(2)
    model = CNNVAE(channels=8, latent_dim=16, prior_calibration_samples=64).eval()
    reference = model.sample(4, torch.Generator().manual_seed(6))
    other = copy.deepcopy(model).to(dtype).sample(4, torch.Generator().manual_seed(6))
    assert other.dtype == torch.bool and other.shape == reference.shape
    assert (other == reference).float().mean().item() > agreement
