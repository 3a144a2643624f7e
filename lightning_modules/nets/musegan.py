"""MuseGAN's networks, one generator and one critic per track, for phrases of 8 bars x 16 steps.

A track generator follows MuseGAN's hybrid model: four latent vectors of ``latent_dim`` each - one
shared by all tracks and one private, each in a time-independent and a time-dependent form. The
time-dependent vectors pass through temporal networks that unfold them into one vector per bar;
the bar generator maps the four vectors of each bar to that bar's cell probabilities. Each track's
generator owns all the networks it uses (the shared latents are shared as noise, not as weights),
so its parameters receive gradients only from its own critic.

The critic of a track has no batch normalisation (the WGAN-GP penalty is per sample): a bar
encoder, shared by the eight bars, maps each bar to a feature vector, and layers across the bars
give the score. Layers that act on a whole bar or on all bars are dense: in MuseGAN's convolutions
the kernels of these stages span the bar or the phrase, and dense layers compute the same family
of functions with matrix products, which CPUs and GPUs run far faster than short convolutions
(their double backward for the gradient penalty included).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from datamodules.pianoroll import BARS_PER_PHRASE, STEPS_PER_BAR

LEAKY_SLOPE = 0.2
LATENTS_PER_TRACK = 4  # shared, shared temporal, private, private temporal


def _dense(in_features: int, out_features: int) -> list[nn.Module]:
    """Linear (no bias: BatchNorm's shift replaces it) + BatchNorm + ReLU."""
    return [nn.Linear(in_features, out_features, bias=False), nn.BatchNorm1d(out_features), nn.ReLU()]


class TemporalNetwork(nn.Sequential):
    """(B, latent_dim) -> (B, latent_dim, 8): one latent vector per bar."""

    def __init__(self, latent_dim: int, width: int):
        super().__init__(
            *_dense(latent_dim, width),
            *_dense(width, latent_dim * BARS_PER_PHRASE),
            nn.Unflatten(1, (latent_dim, BARS_PER_PHRASE)),
        )


class BarGenerator(nn.Sequential):
    """(N, 4 latent_dim) latents of a bar -> (N, 16, pitches) cell logits of that bar."""

    def __init__(self, latent_dim: int, width: int, pitches: int):
        super().__init__(
            *_dense(LATENTS_PER_TRACK * latent_dim, width),
            *_dense(width, width),
            nn.Linear(width, STEPS_PER_BAR * pitches),
            nn.Unflatten(1, (STEPS_PER_BAR, pitches)),
        )


class TrackGenerator(nn.Module):
    """Four (B, latent_dim) latents -> (B, 128, pitches) cell probabilities of one track.

    ``forward(shared, shared_temporal, private, private_temporal)``.
    """

    def __init__(self, latent_dim: int, width: int, pitches: int):
        super().__init__()
        self.pitches = pitches
        self.shared_temporal = TemporalNetwork(latent_dim, width)
        self.private_temporal = TemporalNetwork(latent_dim, width)
        self.bar = BarGenerator(latent_dim, width, pitches)

    def forward(self, shared: Tensor, shared_temporal: Tensor, private: Tensor, private_temporal: Tensor) -> Tensor:
        batch = shared.shape[0]
        per_bar = torch.cat([
            shared.unsqueeze(2).expand(-1, -1, BARS_PER_PHRASE), self.shared_temporal(shared_temporal),
            private.unsqueeze(2).expand(-1, -1, BARS_PER_PHRASE), self.private_temporal(private_temporal),
        ], dim=1)  # (B, 4 latent_dim, bars)
        logits = self.bar(per_bar.transpose(1, 2).reshape(batch * BARS_PER_PHRASE, -1))  # (B bars, steps, pitches)
        return logits.reshape(batch, BARS_PER_PHRASE * STEPS_PER_BAR, self.pitches).sigmoid()


class TrackCritic(nn.Module):
    """(B, 128, pitches) cells of one track -> (B,) Wasserstein critic scores; no normalisation layers."""

    def __init__(self, pitches: int, width: int):
        super().__init__()
        self.bar_encoder = nn.Sequential(
            nn.Linear(STEPS_PER_BAR * pitches, width), nn.LeakyReLU(LEAKY_SLOPE),
            nn.Linear(width, width), nn.LeakyReLU(LEAKY_SLOPE),
        )
        self.across_bars = nn.Sequential(
            nn.Linear(BARS_PER_PHRASE * width, width), nn.LeakyReLU(LEAKY_SLOPE),
            nn.Linear(width, 1, bias=False),  # an offset cancels in every WGAN loss
        )

    def forward(self, cells: Tensor) -> Tensor:
        batch = cells.shape[0]
        bars = self.bar_encoder(cells.reshape(batch * BARS_PER_PHRASE, -1))
        return self.across_bars(bars.reshape(batch, -1)).squeeze(1)
