"""Bias-free fully connected encoder/decoder of the Deep One-Class SVDD loop detector.

Biases are left out on purpose: with a bias the encoder could map every input onto the centre
(a constant output), the trivial "hypersphere collapse" solution of the SVDD objective.
"""
from __future__ import annotations

from torch import nn


def _mlp(widths: tuple[int, ...], negative_slope: float) -> nn.Sequential:
    """Bias-free Linear layers between consecutive ``widths`` with LeakyReLU between them (not after the last)."""
    layers: list[nn.Module] = []
    for index, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        if index > 0:
            layers.append(nn.LeakyReLU(negative_slope))
        layers.append(nn.Linear(n_in, n_out, bias=False))
    return nn.Sequential(*layers)


class SVDDEncoder(nn.Sequential):
    """f_w: 28 -> 14 -> 14 -> 7 (bar-correlation vector to latent point)."""

    def __init__(self, in_features: int = 28, hidden: int = 14, latent: int = 7, negative_slope: float = 0.1):
        super().__init__(*_mlp((in_features, hidden, hidden, latent), negative_slope))


class SVDDDecoder(nn.Sequential):
    """Mirror of :class:`SVDDEncoder` (7 -> 14 -> 14 -> 28), used only for autoencoder pretraining."""

    def __init__(self, out_features: int = 28, hidden: int = 14, latent: int = 7, negative_slope: float = 0.1):
        super().__init__(*_mlp((latent, hidden, hidden, out_features), negative_slope))
