"""Wave-U-Net mixing baseline with real decimation.

Each encoder level is a ``Conv1d(k 5, same) -> GroupNorm -> ReLU`` block whose output is kept as a
skip connection and then decimated by 2 (every second sample dropped). After the five levels
(24/48/96/192/384 channels) a bottleneck block runs at 1/32 of the input rate; each decoder level
upsamples by 2 (linear interpolation), concatenates the matching skip and applies a block with that
level's width. A 1x1 convolution over the last decoder output concatenated with the input gives the
stereo mix, squashed by tanh.

Receptive field of the convolution path at the default size: 445 input samples (10 ms at 44.1 kHz),
measured by gradient support with the normalisation disabled (``receptive_field``); GroupNorm adds
global per-segment statistics on top. The authors' release ran every level at stride 1, which left
about 69 samples.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


class ConvBlock(nn.Sequential):
    """``Conv1d(same) -> GroupNorm -> ReLU``; groups = gcd(channels, norm_groups)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm_groups: int):
        super().__init__(
            nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(math.gcd(out_channels, norm_groups), out_channels),
            nn.ReLU(),
        )


class WaveUNet(nn.Module):
    """Maps ``(B, in_channels, T)`` stems to a ``(B, out_channels, T)`` mix in [-1, 1]; any ``T``
    (zero-padded to a multiple of ``2 ** levels`` and cropped back)."""

    def __init__(self, in_channels: int = 8, out_channels: int = 2,
                 channels: tuple[int, ...] | list[int] = (24, 48, 96, 192, 384), kernel_size: int = 5,
                 norm_groups: int = 8):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd for symmetric 'same' padding, got {kernel_size}")
        channels = list(channels)
        self.factor = 2 ** len(channels)
        widths_in = [in_channels] + channels[:-1]
        self.encoder = nn.ModuleList(ConvBlock(c_in, c_out, kernel_size, norm_groups)
                                     for c_in, c_out in zip(widths_in, channels))
        self.bottleneck = ConvBlock(channels[-1], channels[-1], kernel_size, norm_groups)
        below = channels[1:] + [channels[-1]]
        self.decoder = nn.ModuleList(ConvBlock(c_below + c, c, kernel_size, norm_groups)
                                     for c, c_below in zip(channels, below))
        self.output = nn.Conv1d(channels[0] + in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[-1]
        x = F.pad(x, (0, -length % self.factor))
        skips = []
        h = x
        for block in self.encoder:
            h = block(h)
            skips.append(h)
            h = h[..., ::2]
        h = self.bottleneck(h)
        for block, skip in zip(reversed(self.decoder), reversed(skips)):
            h = F.interpolate(h, size=skip.shape[-1], mode="linear", align_corners=False)
            h = block(torch.cat([h, skip], dim=1))
        return torch.tanh(self.output(torch.cat([h, x], dim=1)))[..., :length]


def receptive_field(model: WaveUNet, length: int = 4096) -> int:
    """Receptive field in samples of ``model``'s convolution path: the widest span of input samples
    that reaches one output sample, over all positions relative to the decimation grid. GroupNorm and
    ReLU are replaced by identities on a copy so that neither global statistics nor dead units blur
    the measurement; one batch item probes one output position."""
    probe = copy.deepcopy(model).eval()
    for module in probe.modules():
        if isinstance(module, ConvBlock):
            module[1] = nn.Identity()
            module[2] = nn.Identity()
    positions = torch.arange(length // 2, length // 2 + probe.factor)
    x = torch.randn(len(positions), probe.encoder[0][0].in_channels, length, requires_grad=True)
    y = probe(x)
    y[torch.arange(len(positions)), :, positions].sum().backward()
    touched = x.grad.abs().sum(dim=1) > 0
    index = torch.arange(length).expand_as(touched)
    first = torch.where(touched, index, length).amin(dim=1)
    last = torch.where(touched, index, -1).amax(dim=1)
    return int((last - first + 1).max())
