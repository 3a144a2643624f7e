"""MuseGAN baseline: one generator and one critic per instrument (drums, bass), trained as WGAN-GP.

As in the loop paper's appendix - and unlike the official MuseGAN code, which has a single critic
for all tracks - every track has its own critic, which sees only that track, and its own
generator (see :mod:`lightning_modules.nets.musegan`); the tracks are coupled through the latents
they share. Each critic minimises ``D(fake) - D(real) + penalty_weight * (|grad D(x_hat)| - 1)^2``
with ``x_hat`` interpolated between a real and a fake phrase at a random point per sample; each
generator maximises its own critic's score of its track. Critics are updated on every batch, the
generators after every ``critic_steps``-th critic update (Adam, learning rate 1e-3, betas (0.5, 0.9)
for both, as in MuseGAN). Generators output cell probabilities; :meth:`MuseGAN.sample` turns them
into phrases by thresholding at 0.5 or by Bernoulli draws.
"""
from __future__ import annotations

from typing import Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from datamodules.pianoroll import N_COLUMNS, N_DRUM_CLASSES, PHRASE_STEPS
from framework.seeding import sampling_generator
from lightning_modules.nets.musegan import LATENTS_PER_TRACK, TrackCritic, TrackGenerator

# Columns of each track in a phrase.
TRACKS = {"drums": slice(0, N_DRUM_CLASSES), "bass": slice(N_DRUM_CLASSES, N_COLUMNS)}
SAMPLE_MODES = ("threshold", "bernoulli")


def gradient_penalty(critic: nn.Module, real: Tensor, fake: Tensor, epsilon: Tensor) -> Tensor:
    """Mean over samples of ``(|grad_x critic(x)| - 1)^2`` at ``x = epsilon real + (1 - epsilon) fake``.

    ``epsilon`` holds one interpolation weight per sample (broadcastable against ``real``); the norm
    runs over all cells of a sample. The graph is kept, so the penalty trains the critic.
    """
    mixed = (epsilon * real + (1 - epsilon) * fake).detach().requires_grad_(True)
    (gradient,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    return (gradient.flatten(1).norm(dim=1) - 1).square().mean()


def critic_loss(critic: nn.Module, real: Tensor, fake: Tensor, epsilon: Tensor, penalty_weight: float
                ) -> tuple[Tensor, Tensor, Tensor]:
    """WGAN-GP critic loss, the Wasserstein estimate ``mean D(real) - mean D(fake)`` and the penalty."""
    wasserstein = critic(real).mean() - critic(fake).mean()
    penalty = gradient_penalty(critic, real, fake, epsilon)
    return -wasserstein + penalty_weight * penalty, wasserstein.detach(), penalty.detach()


class MuseGAN(pl.LightningModule):
    """Two-track (drums, bass) WGAN-GP phrase generator; ``sample(n, generator)`` draws bool phrases (n, 128, 57).

    Args:
        lr, betas: Adam settings of the generators and of the critics.
        latent_dim: size of each of the four latent vectors per track (two of them shared by the tracks).
        generator_width, critic_width: channel widths of the track generators and critics.
        critic_steps: critic updates per generator update.
        penalty_weight: weight of the gradient penalty.
        sample_mode: default of :meth:`sample`: ``threshold`` (cells with probability >= 0.5) or
            ``bernoulli`` (each cell drawn with its probability).
        sample_batch_size: phrases generated together by :meth:`sample`.
        seed: seeds the training latents, offset by epoch and rank so that ranks draw different ones.
    """

    def __init__(
        self,
        lr: float = 1e-3,
        betas: Sequence[float] = (0.5, 0.9),
        latent_dim: int = 32,
        generator_width: int = 256,
        critic_width: int = 256,
        critic_steps: int = 5,
        penalty_weight: float = 10.0,
        sample_mode: str = "threshold",
        sample_batch_size: int = 1000,
        seed: int = 0,
    ):
        super().__init__()
        if sample_mode not in SAMPLE_MODES:
            raise ValueError(f"model.sample_mode={sample_mode!r} is not one of {SAMPLE_MODES}")
        if critic_steps < 1:
            raise ValueError(f"model.critic_steps={critic_steps} must be at least 1")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generators = nn.ModuleDict(
            {track: TrackGenerator(latent_dim, generator_width, columns.stop - columns.start)
             for track, columns in TRACKS.items()})
        self.critics = nn.ModuleDict(
            {track: TrackCritic(columns.stop - columns.start, critic_width) for track, columns in TRACKS.items()})
        self.register_buffer("critic_updates", torch.zeros((), dtype=torch.long))
        # The counter mirrored on the host, so that a training step never waits to read it back.
        self._host_critic_updates: int | None = None
        self._noise: torch.Generator | None = None

    # ---------------------------------------------------------------------------------- generation
    @property
    def _tensor_device(self) -> torch.device:
        return self.critic_updates.device

    def latents(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """(n, 2 + 2 tracks, latent_dim) standard normal latents: shared, shared temporal, then per track
        private and private temporal."""
        shape = (n, 2 + 2 * len(TRACKS), self.hparams.latent_dim)
        return torch.randn(shape, generator=generator, device=self._tensor_device)

    def forward(self, latents: Tensor) -> Tensor:
        """Cell probabilities (n, 128, 57) for latents (n, 2 + 2 tracks, latent_dim), taken in the weights' precision."""
        latents = latents.to(next(self.generators.parameters()).dtype)
        shared, shared_temporal = latents[:, 0], latents[:, 1]
        tracks = [
            generator(shared, shared_temporal, latents[:, 2 + 2 * i], latents[:, 3 + 2 * i])
            for i, generator in enumerate(self.generators.values())
        ]
        return torch.cat(tracks, dim=2)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, mode: str | None = None,
               batch_size: int | None = None) -> Tensor:
        """``n`` phrases, bool (n, 128, 57) on the module's device, drawn with ``generator`` (on that device).

        Use in eval mode (BatchNorm's running statistics). ``mode`` and ``batch_size`` default to the
        ``sample_*`` hyperparameters.
        """
        mode = mode or self.hparams.sample_mode
        if mode not in SAMPLE_MODES:
            raise ValueError(f"sample mode {mode!r} is not one of {SAMPLE_MODES}")
        batch_size = batch_size or self.hparams.sample_batch_size
        parts = [torch.zeros(0, PHRASE_STEPS, N_COLUMNS, dtype=torch.bool, device=self._tensor_device)]
        for start in range(0, n, batch_size):
            probabilities = self(self.latents(min(batch_size, n - start), generator))
            if mode == "threshold":
                parts.append(probabilities >= 0.5)
            else:
                parts.append(torch.rand(probabilities.shape, generator=generator, device=self._tensor_device) < probabilities)
        return torch.cat(parts)

    # ------------------------------------------------------------------------------------ training
    def configure_optimizers(self):
        hp = self.hparams
        return [torch.optim.Adam(self.generators.parameters(), lr=hp.lr, betas=tuple(hp.betas)),
                torch.optim.Adam(self.critics.parameters(), lr=hp.lr, betas=tuple(hp.betas))]

    def on_train_start(self) -> None:
        self._host_critic_updates = int(self.critic_updates)  # once per fit (a resumed run's count)

    def on_train_epoch_start(self) -> None:
        world = self.trainer.world_size
        self._noise = sampling_generator(self.hparams.seed + self.current_epoch * world, self.global_rank, self._tensor_device)

    def _critic_losses(self, real: Tensor, fake: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        """Per track: critic loss, Wasserstein estimate and penalty, keyed ``loss/<track>`` etc."""
        epsilon = torch.rand(len(real), 1, 1, generator=generator, device=self._tensor_device)
        values = {}
        for track, columns in TRACKS.items():
            loss, wasserstein, penalty = critic_loss(self.critics[track], real[..., columns], fake[..., columns],
                                                     epsilon, self.hparams.penalty_weight)
            values.update({f"critic_loss/{track}": loss, f"wasserstein/{track}": wasserstein,
                           f"penalty/{track}": penalty})
        return values

    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        generator_optimizer, critic_optimizer = self.optimizers()
        real = batch.to(self.dtype)
        with torch.no_grad():
            fake = self(self.latents(len(real), self._noise))
        values = self._critic_losses(real, fake, self._noise)
        critic_total = sum(values[f"critic_loss/{track}"] for track in TRACKS)
        # The generators' weights enter with weight 0: no gradient changes, but DistributedDataParallel
        # sees every parameter used in every backward pass.
        anchor = sum(parameter.sum() for parameter in self.generators.parameters())
        critic_optimizer.zero_grad()
        self.manual_backward(critic_total + 0.0 * anchor)
        critic_optimizer.step()
        self.critic_updates += 1
        self._host_critic_updates += 1
        if self._host_critic_updates % self.hparams.critic_steps == 0:
            fake = self(self.latents(len(real), self._noise))
            for track, columns in TRACKS.items():
                values[f"generator_loss/{track}"] = -self.critics[track](fake[..., columns]).mean()
            generator_optimizer.zero_grad()
            self.manual_backward(sum(values[f"generator_loss/{track}"] for track in TRACKS))
            generator_optimizer.step()
        self.log_dict({f"train/{name}": value.detach() for name, value in values.items()},
                      on_step=False, on_epoch=True, sync_dist=True, batch_size=len(real))

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def _evaluate(self, batch: Tensor, batch_idx: int, stage: str) -> None:
        """Each critic's Wasserstein estimate on held-out phrases against as many generated ones
        (latents seeded by batch and rank, so every epoch compares the same draws)."""
        generator = sampling_generator(self.hparams.seed + batch_idx * self.trainer.world_size, self.global_rank,
                                       self._tensor_device)
        real = batch.to(self.dtype)
        fake = self(self.latents(len(real), generator))
        for track, columns in TRACKS.items():
            critic = self.critics[track]
            wasserstein = critic(real[..., columns]).mean() - critic(fake[..., columns]).mean()
            self.log(f"{stage}/wasserstein/{track}", wasserstein, on_epoch=True, sync_dist=True, batch_size=len(real))
