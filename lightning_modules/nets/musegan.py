"""MuseGAN's networks, one generator and one critic per track, for phrases of 8 bars x 16 steps.

A track generator follows MuseGAN's hybrid model: four latent vectors of ``latent_dim`` each - one
shared by all tracks and one private, each in a time-independent and a time-dependent form. The
time-dependent vectors pass through temporal networks that unfold them into one vector per bar;
the bar generator maps the four vectors of each bar to that bar's cell probabilities. Each track's
generator owns all the networks it uses (the shared latents are shared as noise, not as weights),
so its parameters receive gradients only from its own critic.

The critics have no batch normalisation (the WGAN-GP penalty is per sample): strided convolutions
over time reduce a track to one feature vector per bar, a convolution across bars follows, and a
Linear layer gives the score.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from datamodules.pianoroll import BARS_PER_PHRASE, STEPS_PER_BAR

LEAKY_SLOPE = 0.2
LATENTS_PER_TRACK = 4  # shared, shared temporal, private, private temporal


def _up(in_channels: int, out_channels: int, kernel: int, stride: int, padding: int = 0) -> list[nn.Module]:
    """Transposed convolution over time (no bias: BatchNorm's shift replaces it) + BatchNorm + ReLU."""
    return [nn.ConvTranspose1d(in_channels, out_channels, kernel, stride, padding, bias=False),
            nn.BatchNorm1d(out_channels), nn.ReLU()]


class TemporalNetwork(nn.Sequential):
    """(B, latent_dim) -> (B, latent_dim, 8): one latent vector per bar, unfolded 1 -> 2 -> 4 -> 8 bars."""

    def __init__(self, latent_dim: int, width: int):
        super().__init__(
            nn.Unflatten(1, (latent_dim, 1)),
            *_up(latent_dim, width, kernel=2, stride=1),
            *_up(width, width, kernel=2, stride=2),
            *_up(width, latent_dim, kernel=2, stride=2),
        )


class BarGenerator(nn.Sequential):
    """(N, 4 latent_dim) latents of a bar -> (N, pitches, 16) cell logits, upsampled 4 -> 8 -> 16 steps."""

    def __init__(self, latent_dim: int, width: int, pitches: int):
        quarter = STEPS_PER_BAR // 4
        super().__init__(
            nn.Linear(LATENTS_PER_TRACK * latent_dim, width * quarter, bias=False),
            nn.Unflatten(1, (width, quarter)),
            nn.BatchNorm1d(width),
            nn.ReLU(),
            *_up(width, width // 2, kernel=4, stride=2, padding=1),
            *_up(width // 2, width // 4, kernel=4, stride=2, padding=1),
            nn.Conv1d(width // 4, pitches, kernel_size=1),
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
        batch, latent_dim = shared.shape
        per_bar = torch.cat([
            shared.unsqueeze(2).expand(-1, -1, BARS_PER_PHRASE), self.shared_temporal(shared_temporal),
            private.unsqueeze(2).expand(-1, -1, BARS_PER_PHRASE), self.private_temporal(private_temporal),
        ], dim=1)  # (B, 4 latent_dim, bars)
        logits = self.bar(per_bar.transpose(1, 2).reshape(batch * BARS_PER_PHRASE, -1))  # (B bars, pitches, steps)
        logits = logits.reshape(batch, BARS_PER_PHRASE, self.pitches, STEPS_PER_BAR).transpose(2, 3)
        return logits.reshape(batch, BARS_PER_PHRASE * STEPS_PER_BAR, self.pitches).sigmoid()


class TrackCritic(nn.Sequential):
    """(B, 128, pitches) cells of one track -> (B,) Wasserstein critic scores; no normalisation layers."""

    def __init__(self, pitches: int, width: int):
        def down(in_channels: int, out_channels: int) -> list[nn.Module]:
            return [nn.Conv1d(in_channels, out_channels, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(LEAKY_SLOPE)]

        super().__init__(
            *down(pitches, width),  # 8 features per bar
            *down(width, 2 * width),  # 4
            *down(2 * width, 2 * width),  # 2
            *down(2 * width, 4 * width),  # 1
            nn.Conv1d(4 * width, 4 * width, kernel_size=3, padding=1), nn.LeakyReLU(LEAKY_SLOPE),  # across bars
            nn.Flatten(),
            nn.Linear(4 * width * BARS_PER_PHRASE, 1, bias=False),  # an offset cancels in every WGAN loss
            nn.Flatten(0),
        )

    def forward(self, cells: Tensor) -> Tensor:
        return super().forward(cells.transpose(1, 2))
