"""1-D convolutional stacks over pianoroll phrases, shared by the VQ-VAE and the CNN-VAE.

A phrase enters channel-major: (batch, 57 pitch/drum columns, 128 steps). The encoder trunk
halves the time axis twice (128 -> 32 steps) at 128 channels; the upsampling decoder mirrors it
from 128 channels at 32 steps back to 57 logit channels at 128 steps. Each model adds its own
bottleneck between the two (a 16-channel code for the VQ-VAE, a flattened Gaussian latent for the
CNN-VAE).
"""
from __future__ import annotations

from torch import Tensor, nn

KERNEL = 3
PADDING = 1
LEAKY_SLOPE = 0.2


def conv_block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """Conv1d (kernel 3, padding 1, no bias: BatchNorm's shift replaces it) + BatchNorm1d + LeakyReLU(0.2)."""
    return nn.Sequential(
        nn.Conv1d(in_channels, out_channels, KERNEL, stride=stride, padding=PADDING, bias=False),
        nn.BatchNorm1d(out_channels),
        nn.LeakyReLU(LEAKY_SLOPE),
    )


class ResBlock(nn.Module):
    """x + BN(conv(LReLU(BN(conv(x))))): two length-preserving convolutions and an identity skip,
    with no activation after the sum."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            conv_block(channels, channels),
            nn.Conv1d(channels, channels, KERNEL, padding=PADDING, bias=False),
            nn.BatchNorm1d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class EncoderTrunk(nn.Sequential):
    """(B, in_channels, T) -> (B, channels, T / 4): block, then twice [stride-2 block, ResBlock]."""

    def __init__(self, in_channels: int = 57, channels: int = 128):
        super().__init__(
            conv_block(in_channels, channels),
            conv_block(channels, channels, stride=2),
            ResBlock(channels),
            conv_block(channels, channels, stride=2),
            ResBlock(channels),
        )
        self.channels = channels


class UpsamplingDecoder(nn.Sequential):
    """(B, channels, S) -> logits (B, out_channels, 4 S): twice [nearest x2 upsampling, block,
    ResBlock], then a plain (biased) Conv1d to the output columns."""

    def __init__(self, channels: int = 128, out_channels: int = 57):
        super().__init__(
            nn.Upsample(scale_factor=2, mode="nearest"),
            conv_block(channels, channels),
            ResBlock(channels),
            nn.Upsample(scale_factor=2, mode="nearest"),
            conv_block(channels, channels),
            ResBlock(channels),
            nn.Conv1d(channels, out_channels, KERNEL, padding=PADDING),
        )
