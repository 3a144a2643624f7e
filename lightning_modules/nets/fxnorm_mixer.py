"""The FxNorm mixer: a learnable filter bank whose channels are masked by a TCN + BLSTM latent mixer.

Layout (MIXING.md section 4), at the default size 2,719,793 parameters:

* front-end: ``X1 = Conv1d(8 -> 128, k 64, same, no bias)``; envelope ``Softplus(depthwise
  Conv1d(128, k 128, no bias)(|X1|))`` max-pooled by 64;
* latent mixer: ``GroupNorm(1)`` (affine) -> 1x1 ``128 -> 256`` -> 4 repeats x 6 TCN blocks (dilations
  1..32) -> sum of skips -> PReLU -> 1x1 ``64 -> 128`` -> Softplus -> 3-layer BLSTM (64 per direction,
  dropout 0.1) -> Softplus -> nearest upsampling x64 = mask;
* back-end: ``mask * X1`` -> squeeze-and-excitation ``128 -> 2048 -> 128`` -> transposed convolution
  with the front-end's weights (tied, no bias) -> 4 stems x 2 channels summed over stems -> tanh.

The paper's count, 2,752,817, is this network plus the last TCN block's residual 1x1 convolution
(256 x 128 weights + 256 biases = 33,024): the residual output of the last block feeds no later
block and the mixer reads only the skips, so that convolution never influences the output and gets
no gradient (distributed training refuses such parameters). It is left out. The layer details that
land exactly on the paper's count with it: 1x1 and TCN depthwise convolutions carry biases, every
PReLU has a single shared slope, every GroupNorm is affine, the SE layers are biased ``Linear``
layers, the LSTM has PyTorch's two bias vectors per gate, and the envelope and tied transposed
convolutions have no bias.

:class:`FilterBank` is the front-end and back-end alone: the network of the optional pretraining
(an autoencoder of the stems), whose two weights initialise the mixer's.
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
    """Conv-TasNet style block: 1x1 expand, dilated depthwise conv, skip and (unless ``last``) residual
    1x1 outputs; the last block of a stack returns no residual since nothing reads it."""

    def __init__(self, channels: int, hidden: int, skip: int, dilation: int, kernel_size: int = 3,
                 last: bool = False):
        super().__init__()
        self.expand = nn.Conv1d(channels, hidden, 1)
        self.act1 = nn.PReLU()
        self.norm1 = nn.GroupNorm(1, hidden)
        self.depthwise = nn.Conv1d(hidden, hidden, kernel_size, dilation=dilation,
                                   padding=dilation * (kernel_size - 1) // 2, groups=hidden)
        self.act2 = nn.PReLU()
        self.norm2 = nn.GroupNorm(1, hidden)
        self.residual = None if last else nn.Conv1d(hidden, channels, 1)
        self.skip = nn.Conv1d(hidden, skip, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        h = self.norm1(self.act1(self.expand(x)))
        h = self.norm2(self.act2(self.depthwise(h)))
        return (None if self.residual is None else x + self.residual(h)), self.skip(h)


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


class FilterBank(nn.Module):
    """Front-end and tied back-end: ``(B, n_stems * 2, T)`` stems <-> ``filters`` band signals.

    On its own it is the pretraining network: :meth:`forward` reconstructs the input through the
    filter bank, the upsampled pooled envelope standing in for the latent mixer's mask. Any ``T``:
    the input is zero-padded to a multiple of ``pool`` and the output cropped back.
    """

    def __init__(self, n_stems: int = 4, filters: int = 128, kernel_size: int = 64,
                 envelope_kernel: int = 128, pool: int = 64):
        super().__init__()
        self.n_stems = n_stems
        self.pool = pool
        self.front_end = nn.Conv1d(2 * n_stems, filters, kernel_size, bias=False)
        self.envelope = nn.Conv1d(filters, filters, envelope_kernel, groups=filters, bias=False)

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[-1]
        x = F.pad(x, (0, -length % self.pool))
        x1, envelope = self.analyse(x)
        mask = F.interpolate(envelope, scale_factor=self.pool, mode="nearest")
        return self.synthesise(x1 * mask)[..., :length]

    def front_end_state(self) -> dict[str, torch.Tensor]:
        """The two pretrained front-end convolution weights, keyed by parameter name."""
        return {"front_end.weight": self.front_end.weight, "envelope.weight": self.envelope.weight}


class FxNormMixer(FilterBank):
    """Maps ``(B, n_stems * 2, T)`` normalised stems to a ``(B, 2, T)`` stereo mix in [-1, 1].

    Any ``T`` is accepted (padded to a multiple of ``pool`` and cropped back). The BLSTM width is
    ``filters // 2`` per direction so that its output is a mask over the ``filters`` front-end
    channels. The filter-bank parameters have the same names as in :class:`FilterBank`.
    """

    def __init__(self, n_stems: int = 4, filters: int = 128, kernel_size: int = 64,
                 envelope_kernel: int = 128, pool: int = 64, bottleneck: int = 256, hidden: int = 128,
                 skip: int = 64, repeats: int = 4, blocks: int = 6, lstm_layers: int = 3,
                 dropout: float = 0.1, se_hidden: int = 2048):
        super().__init__(n_stems, filters, kernel_size, envelope_kernel, pool)
        if filters % 2:
            raise ValueError(f"filters must be even (BLSTM of filters // 2 per direction), got {filters}")
        self.input_norm = nn.GroupNorm(1, filters)
        self.input_proj = nn.Conv1d(filters, bottleneck, 1)
        count = repeats * blocks
        self.tcn = nn.ModuleList(TCNBlock(bottleneck, hidden, skip, dilation=2 ** (i % blocks), last=i == count - 1)
                                 for i in range(count))
        self.skip_act = nn.PReLU()
        self.skip_proj = nn.Conv1d(skip, filters, 1)
        self.blstm = nn.LSTM(filters, filters // 2, num_layers=lstm_layers, batch_first=True,
                             bidirectional=True, dropout=dropout if lstm_layers > 1 else 0.0)
        self.excitation = SqueezeExcitation(filters, se_hidden)

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
