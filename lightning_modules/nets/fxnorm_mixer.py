"""The FxNorm mixer: a learnable filter bank whose channels are masked by a TCN + BLSTM latent mixer.

Layout (MIXING.md section 4), at the default size 2,752,817 parameters:

* front-end: ``X1 = Conv1d(8 -> 128, k 64, same, no bias)``; envelope ``Softplus(depthwise
  Conv1d(128, k 128, no bias)(|X1|))`` max-pooled by 64;
* latent mixer: ``GroupNorm(1)`` (affine) -> 1x1 ``128 -> 256`` -> 4 repeats x 6 TCN blocks (dilations
  1..32) -> sum of skips -> PReLU -> 1x1 ``64 -> 128`` -> Softplus -> 3-layer BLSTM (64 per direction,
  dropout 0.1) -> Softplus -> nearest upsampling x64 = mask;
* back-end: ``mask * X1`` -> squeeze-and-excitation ``128 -> 2048 -> 128`` -> transposed convolution
  with the front-end's weights (tied, no bias) -> 4 stems x 2 channels summed over stems -> tanh.

The layer details that land exactly on 2,752,817: 1x1 and TCN depthwise convolutions carry biases,
every PReLU has a single shared slope, every GroupNorm is affine, every TCN block (the last one
included) has both a skip and a residual output, the SE layers are biased ``Linear`` layers, the
LSTM has PyTorch's two bias vectors per gate, and the envelope and tied transposed convolutions have
no bias.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _pad_same(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Zero padding that keeps the length through a convolution, the extra sample on the right for
    even kernels (PyTorch's ``padding='same'`` convention, without its copy warning)."""
    left = (kernel_size - 1) // 2
    return F.pad(x, (left, kernel_size - 1 - left))


class TCNBlock(nn.Module):
    """Conv-TasNet style block: 1x1 expand, dilated depthwise conv, residual and skip 1x1 outputs."""

    def __init__(self, channels: int, hidden: int, skip: int, dilation: int, kernel_size: int = 3):
        super().__init__()
        self.expand = nn.Conv1d(channels, hidden, 1)
        self.act1 = nn.PReLU()
        self.norm1 = nn.GroupNorm(1, hidden)
        self.depthwise = nn.Conv1d(hidden, hidden, kernel_size, dilation=dilation,
                                   padding=dilation * (kernel_size - 1) // 2, groups=hidden)
        self.act2 = nn.PReLU()
        self.norm2 = nn.GroupNorm(1, hidden)
        self.residual = nn.Conv1d(hidden, channels, 1)
        self.skip = nn.Conv1d(hidden, skip, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm1(self.act1(self.expand(x)))
        h = self.norm2(self.act2(self.depthwise(h)))
        return x + self.residual(h), self.skip(h)


class SqueezeExcitation(nn.Module):
    """Channel gains from the time-averaged magnitude of each channel.

    The filter-bank channels are signed band-pass signals whose plain time average is close to zero,
    so the squeeze averages their absolute value instead.
    """

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.squeeze = nn.Linear(channels, hidden)
        self.excite = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gains = torch.sigmoid(self.excite(F.relu(self.squeeze(x.abs().mean(dim=-1)))))
        return x * gains.unsqueeze(-1)


class FxNormMixer(nn.Module):
    """Maps ``(B, n_stems * 2, T)`` normalised stems to a ``(B, 2, T)`` stereo mix in [-1, 1].

    Any ``T`` is accepted: the input is zero-padded to a multiple of ``pool`` and the output cropped
    back to ``T``. The BLSTM width is ``filters // 2`` per direction so that its output is a mask over
    the ``filters`` front-end channels.
    """

    def __init__(self, n_stems: int = 4, filters: int = 128, kernel_size: int = 64,
                 envelope_kernel: int = 128, pool: int = 64, bottleneck: int = 256, hidden: int = 128,
                 skip: int = 64, repeats: int = 4, blocks: int = 6, lstm_layers: int = 3,
                 dropout: float = 0.1, se_hidden: int = 2048):
        super().__init__()
        if filters % 2:
            raise ValueError(f"filters must be even (BLSTM of filters // 2 per direction), got {filters}")
        self.n_stems = n_stems
        self.pool = pool
        self.front_end = nn.Conv1d(2 * n_stems, filters, kernel_size, bias=False)
        self.envelope = nn.Conv1d(filters, filters, envelope_kernel, groups=filters, bias=False)
        self.input_norm = nn.GroupNorm(1, filters)
        self.input_proj = nn.Conv1d(filters, bottleneck, 1)
        self.tcn = nn.ModuleList(TCNBlock(bottleneck, hidden, skip, dilation=2 ** b)
                                 for _ in range(repeats) for b in range(blocks))
        self.skip_act = nn.PReLU()
        self.skip_proj = nn.Conv1d(skip, filters, 1)
        self.blstm = nn.LSTM(filters, filters // 2, num_layers=lstm_layers, batch_first=True,
                             bidirectional=True, dropout=dropout if lstm_layers > 1 else 0.0)
        self.excitation = SqueezeExcitation(filters, se_hidden)

    def analyse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Front-end: the filter-bank signals ``X1`` and their pooled envelope, ``T`` a multiple of pool."""
        x1 = self.front_end(_pad_same(x, self.front_end.kernel_size[0]))
        envelope = self.envelope(_pad_same(x1.abs(), self.envelope.kernel_size[0]))
        envelope = F.max_pool1d(F.softplus(envelope), self.pool)
        return x1, envelope

    def synthesise(self, filtered: torch.Tensor) -> torch.Tensor:
        """Transposed front-end convolution (tied weights): the exact adjoint of its 'same' conv."""
        kernel_size = self.front_end.kernel_size[0]
        full = F.conv_transpose1d(filtered, self.front_end.weight)
        start = (kernel_size - 1) // 2
        return full[..., start:start + filtered.shape[-1]]

    def mask(self, envelope: torch.Tensor) -> torch.Tensor:
        """Latent mixer: pooled envelope ``(B, filters, T / pool)`` -> mask ``(B, filters, T)``."""
        h = self.input_proj(self.input_norm(envelope))
        skips = 0
        for block in self.tcn:
            h, skip = block(h)
            skips = skips + skip
        h = F.softplus(self.skip_proj(self.skip_act(skips)))
        h, _ = self.blstm(h.transpose(1, 2))
        h = F.softplus(h).transpose(1, 2)
        return F.interpolate(h, scale_factor=self.pool, mode="nearest")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[-1]
        x = F.pad(x, (0, -length % self.pool))
        x1, envelope = self.analyse(x)
        stems = self.synthesise(self.excitation(x1 * self.mask(envelope)))
        stems = stems.unflatten(1, (self.n_stems, 2))
        return torch.tanh(stems.sum(dim=1))[..., :length]

    def autoencode(self, x: torch.Tensor) -> torch.Tensor:
        """Front-end pretraining path: reconstruct the ``(B, 8, T)`` input through the filter bank,
        with the upsampled pooled envelope standing in for the latent mixer's mask."""
        length = x.shape[-1]
        x = F.pad(x, (0, -length % self.pool))
        x1, envelope = self.analyse(x)
        mask = F.interpolate(envelope, scale_factor=self.pool, mode="nearest")
        return self.synthesise(x1 * mask)[..., :length]

    def front_end_state(self) -> dict[str, torch.Tensor]:
        """The two pretrained front-end convolution weights, keyed by parameter name."""
        return {"front_end.weight": self.front_end.weight, "envelope.weight": self.envelope.weight}
