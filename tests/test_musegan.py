"""MuseGAN: the WGAN-GP penalty, one critic per generator, the 5:1 update schedule, sampling, DDP."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_modules.musegan import TRACKS, MuseGAN, critic_loss, gradient_penalty
from tests.helpers import run_train_subprocess, save_checkpoint
from tests.test_vqvae import loop_phrases, quiet_trainer


def small_gan(**kwargs) -> MuseGAN:
    torch.manual_seed(0)
    return MuseGAN(**{"latent_dim": 8, "generator_width": 16, "critic_width": 8, **kwargs})


class TinyCritic(nn.Module):
    """A nonlinear critic small enough to differentiate sample by sample."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(6 * 3, 5), nn.Tanh(), nn.Linear(5, 1), nn.Flatten(0))

    def forward(self, x):
        return self.net(x)


def test_gradient_penalty_equals_a_per_sample_autograd_computation():
    torch.manual_seed(0)
    critic = TinyCritic().double()
    reference_critic = copy.deepcopy(critic)
    real, fake = torch.rand(4, 6, 3, dtype=torch.float64), torch.rand(4, 6, 3, dtype=torch.float64)
    epsilon = torch.rand(4, 1, 1, dtype=torch.float64)
    penalty = gradient_penalty(critic, real, fake, epsilon)

    terms = []
    for i in range(4):
        point = (epsilon[i] * real[i] + (1 - epsilon[i]) * fake[i]).unsqueeze(0).requires_grad_(True)
        (gradient,) = torch.autograd.grad(reference_critic(point).sum(), point, create_graph=True)
        terms.append((gradient.norm() - 1) ** 2)
    expected = torch.stack(terms).mean()
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-12)

    # the penalty trains the critic: its gradient in the weights (a double backward) matches too
    penalty.backward()
    expected.backward()
    for ours, reference in zip(critic.parameters(), reference_critic.parameters()):
        torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-10, atol=1e-12)
    assert critic.net[1].weight.grad.abs().sum() > 0


def test_critic_loss_combines_the_wasserstein_estimate_and_the_weighted_penalty():
    torch.manual_seed(1)
    critic = TinyCritic()
    real, fake, epsilon = torch.rand(8, 6, 3), torch.rand(8, 6, 3), torch.rand(8, 1, 1)
    loss, wasserstein, penalty = critic_loss(critic, real, fake, epsilon, penalty_weight=10.0)
    assert wasserstein.item() == pytest.approx((critic(real).mean() - critic(fake).mean()).item(), rel=1e-6)
    assert penalty.item() == pytest.approx(gradient_penalty(critic, real, fake, epsilon).item(), rel=1e-6)
    assert loss.item() == pytest.approx(-wasserstein.item() + 10.0 * penalty.item(), rel=1e-6)


def test_one_critic_per_instrument_sees_only_its_columns():
    model = small_gan()
    assert list(model.generators) == list(model.critics) == ["drums", "bass"]
    assert model.critics["drums"].bar_encoder[0].in_features == 16 * 9
    assert model.critics["bass"].bar_encoder[0].in_features == 16 * 48
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.critics.modules())
    generator_params = {id(p) for p in model.generators.parameters()}
    assert not generator_params & {id(p) for p in model.critics.parameters()}
    drums, bass = (set(map(id, model.generators[t].parameters())) for t in TRACKS)
    assert not drums & bass  # no weights shared between the instruments' generators


def test_each_generator_gets_gradient_only_from_its_own_critic():
    model = small_gan().train()
    latents = model.latents(6, torch.Generator().manual_seed(0))
    fake = model(latents)
    scores = {track: model.critics[track](fake[..., columns]).mean() for track, columns in TRACKS.items()}
    for critic_track, score in scores.items():
        for generator_track, generator in model.generators.items():
            gradients = torch.autograd.grad(score, list(generator.parameters()), retain_graph=True, allow_unused=True)
            touched = any(g is not None and g.abs().sum() > 0 for g in gradients)
            assert touched == (critic_track == generator_track), (critic_track, generator_track)


def test_critics_update_every_batch_and_generators_every_fifth():
    model = small_gan()
    loops = loop_phrases(40).float()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    quiet_trainer(max_epochs=1, limit_train_batches=12, limit_val_batches=0).fit(model, DataLoader(loops, batch_size=3))
    generator_optimizer, critic_optimizer = model.trainer.optimizers
    steps = lambda optimizer: {int(state["step"]) for state in optimizer.state.values()}
    assert steps(critic_optimizer) == {12} and steps(generator_optimizer) == {2}
    assert int(model.critic_updates) == 12
    assert all(not torch.equal(before[name], p) for name, p in model.named_parameters())


def test_samples_threshold_or_draw_the_generated_probabilities(monkeypatch):
    model = small_gan().eval()
    probability = torch.full((128, 57), 0.3)
    probability[:, :9] = 0.7
    monkeypatch.setattr(model, "forward", lambda latents: probability.expand(len(latents), -1, -1))
    drawn = model.sample(300, torch.Generator().manual_seed(0), mode="bernoulli", batch_size=128)
    assert drawn.shape == (300, 128, 57) and drawn.dtype == torch.bool
    for columns, p in ((slice(0, 9), 0.7), (slice(9, 57), 0.3)):
        cells = drawn[..., columns]
        assert abs(cells.float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / cells.numel())
    thresholded = model.sample(5, torch.Generator().manual_seed(0), mode="threshold")
    assert thresholded[..., :9].all() and not thresholded[..., 9:].any()


def test_sampling_is_reproducible_and_the_checkpoint_samples_alone(tmp_path):
    model = small_gan().eval()
    first = model.sample(7, torch.Generator().manual_seed(3), batch_size=3)
    assert first.shape == (7, 128, 57) and first.dtype == torch.bool
    assert torch.equal(first, model.sample(7, torch.Generator().manual_seed(3), batch_size=3))
    loaded = MuseGAN.load_from_checkpoint(save_checkpoint(model, tmp_path / "musegan.ckpt"), map_location="cpu")
    assert torch.equal(loaded.eval().sample(7, torch.Generator().manual_seed(3), batch_size=3), first)
    with pytest.raises(ValueError, match="not one of"):
        model.sample(2, mode="argmax")


def test_trains_and_samples_in_double_and_bfloat16():
    """trainer.precision=64-true trains the networks in double; a bfloat16 copy samples (as under
    bf16-true) the phrases of its float32 self up to cells its rounding moves across 0.5."""
    model = small_gan()
    quiet_trainer(max_epochs=1, limit_train_batches=5, limit_val_batches=0, precision="64-true").fit(
        model, DataLoader(loop_phrases(15).float(), batch_size=3))
    assert int(model.critic_updates) == 5
    assert all(p.dtype == torch.float64 and torch.isfinite(p).all() for p in model.parameters())
    model = model.float().eval()
    reference = model.sample(6, torch.Generator().manual_seed(1))
    for dtype, agreement in ((torch.float64, 0.999), (torch.bfloat16, 0.9)):
        other = copy.deepcopy(model).to(dtype).sample(6, torch.Generator().manual_seed(1))
        assert other.dtype == torch.bool and (other == reference).float().mean().item() > agreement


@pytest.mark.slow
def test_two_process_ddp_training_keeps_the_ranks_in_step(demo_root, tmp_path):
    run_train_subprocess([
        "experiment=musegan", f"paths.demo={demo_root}", f"run_dir={tmp_path}", "logger=csv",
        "trainer.max_epochs=1", "trainer.limit_train_batches=10", "trainer.limit_val_batches=2",
        "datamodule.batch_size=16", "model.latent_dim=8", "model.generator_width=16", "model.critic_width=8",
        "callbacks.generation.n_samples=32", "callbacks.generation.n_networks=2", "callbacks.generation.every_n_epochs=1",
        "+callbacks.agreement._target_=tests.helpers.ParametersAgreeAcrossRanks",
    ])
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert int(checkpoint["state_dict"]["critic_updates"]) == 10
    assert (tmp_path / "ranks_agree.txt").read_text().split() == ["2", "ranks", "agree"]
