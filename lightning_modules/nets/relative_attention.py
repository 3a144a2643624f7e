"""Causal relative global attention (Shaw et al. 2018) with the memory-efficient skewing of Huang et al. 2018.

Each head learns one embedding per relative distance ``k - q`` in ``-(max_distance - 1) .. 0``
(only the past is visible). The relative logit of query ``q`` and key ``k`` is ``q . E[k - q]``.
Computed naively it needs an (L, L, d) tensor of gathered embeddings; the skewing trick instead
multiplies the queries with the L embeddings of distances ``-(L - 1) .. 0`` once, giving (L, L)
logits indexed by (query, distance), and shifts every row into (query, key) order by padding one
column, reshaping and dropping a row: O(L d) memory instead of O(L^2 d).

Sampling advances one position at a time with a key/value cache (:class:`KeyValueCache`); the new
query's relative logits are a plain product with the embeddings of distances ``-t .. 0``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def skew(relative_logits: Tensor) -> Tensor:
    """(..., L, L) logits indexed by (query, distance index) -> (..., L, L) indexed by (query, key).

    Distance index ``i`` stands for the relative distance ``i - (L - 1)``; the output holds
    ``relative_logits[..., q, k - q + L - 1]`` at ``(q, k)`` for ``k <= q``. Entries above the
    diagonal are left-over values that the causal mask must hide.
    """
    *batch, length, width = relative_logits.shape
    padded = F.pad(relative_logits, (1, 0))
    return padded.reshape(*batch, width + 1, length)[..., 1:, :]


@dataclass
class KeyValueCache:
    """Keys and values (B, heads, t, head_dim) of the positions generated so far, one entry per layer."""

    keys: list[Tensor | None] = field(default_factory=list)
    values: list[Tensor | None] = field(default_factory=list)

    @property
    def length(self) -> int:
        return 0 if not self.keys or self.keys[0] is None else self.keys[0].shape[2]


class RelativeGlobalAttention(nn.Module):
    """Multi-head causal self-attention with learned per-head relative position embeddings.

    Args:
        dim: model width (a multiple of ``heads``).
        heads: attention heads.
        max_distance: relative distances ``0 .. max_distance - 1`` into the past have an embedding;
            sequences may be at most this long.
        dropout: dropout on the attention weights.
    """

    def __init__(self, dim: int, heads: int, max_distance: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"model width {dim} is not a multiple of the number of heads {heads}")
        self.heads, self.head_dim, self.max_distance = heads, dim // heads, max_distance
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        # Row i embeds distance i - (max_distance - 1): the last row is distance 0.
        self.relative = nn.Parameter(torch.randn(heads, max_distance, self.head_dim) / math.sqrt(self.head_dim))
        self.dropout = nn.Dropout(dropout)

    def _split_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, relative_logits: Tensor, mask: Tensor | None) -> Tensor:
        logits = (q @ k.transpose(-1, -2) + relative_logits) / math.sqrt(self.head_dim)
        if mask is not None:
            logits = logits.masked_fill(mask, float("-inf"))
        weights = self.dropout(logits.softmax(dim=-1))
        batch, _, length, _ = q.shape
        return self.out((weights @ v).transpose(1, 2).reshape(batch, length, -1))

    def forward(self, x: Tensor) -> Tensor:
        """Causal attention over the whole sequence ``x`` (B, L, dim), L <= max_distance."""
        length = x.shape[1]
        if length > self.max_distance:
            raise ValueError(f"sequence of {length} steps exceeds the relative attention's max distance {self.max_distance}")
        q, k, v = self._split_heads(x)
        embeddings = self.relative[:, self.max_distance - length :]  # distances -(L-1) .. 0
        relative_logits = skew(q @ embeddings.unsqueeze(0).transpose(-1, -2))
        future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        return self._attend(q, k, v, relative_logits, future)

    def step(self, x: Tensor, cache: KeyValueCache, layer: int) -> Tensor:
        """Attention output (B, 1, dim) of one new position ``x`` (B, 1, dim) over the cached ones and itself."""
        q, k, v = self._split_heads(x)
        while len(cache.keys) <= layer:
            cache.keys.append(None)
            cache.values.append(None)
        if cache.keys[layer] is not None:
            k = torch.cat([cache.keys[layer], k], dim=2)
            v = torch.cat([cache.values[layer], v], dim=2)
        cache.keys[layer], cache.values[layer] = k, v
        length = k.shape[2]
        if length > self.max_distance:
            raise ValueError(f"position {length - 1} exceeds the relative attention's max distance {self.max_distance}")
        embeddings = self.relative[:, self.max_distance - length :]  # distances -(t) .. 0 for keys 0 .. t
        return self._attend(q, k, v, q @ embeddings.unsqueeze(0).transpose(-1, -2), None)
