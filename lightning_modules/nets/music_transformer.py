"""Decoder-only Music Transformer over multi-hot pianoroll steps.

Each step (57 binary cells) enters through a Linear embedding; pre-norm decoder blocks (relative
global attention, then a position-wise feed-forward network, each with a residual connection)
follow, and a Linear head gives one logit per cell of the *next* step. There is no absolute
position encoding: position enters only through the relative attention embeddings.
"""
from __future__ import annotations

from torch import Tensor, nn

from lightning_modules.nets.relative_attention import KeyValueCache, RelativeGlobalAttention


class DecoderBlock(nn.Module):
    """x + attention(norm(x)), then x + feed_forward(norm(x)); dropout on both residual branches."""

    def __init__(self, dim: int, heads: int, feed_forward: int, max_distance: int, dropout: float):
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = RelativeGlobalAttention(dim, heads, max_distance, dropout)
        self.feed_forward_norm = nn.LayerNorm(dim)
        self.feed_forward = nn.Sequential(nn.Linear(dim, feed_forward), nn.ReLU(), nn.Linear(feed_forward, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.dropout(self.attention(self.attention_norm(x)))
        return x + self.dropout(self.feed_forward(self.feed_forward_norm(x)))

    def step(self, x: Tensor, cache: KeyValueCache, layer: int) -> Tensor:
        x = x + self.dropout(self.attention.step(self.attention_norm(x), cache, layer))
        return x + self.dropout(self.feed_forward(self.feed_forward_norm(x)))


class MusicTransformerDecoder(nn.Module):
    """(B, L, columns) multi-hot steps -> (B, L, columns) logits of the step after each one (causal).

    Args:
        columns: cells per step.
        dim, layers, heads, feed_forward: width, depth, attention heads, feed-forward width.
        max_distance: longest sequence (and relative distance) the attention embeds.
        dropout: on attention weights and residual branches.
    """

    def __init__(self, columns: int = 57, dim: int = 128, layers: int = 4, heads: int = 2, feed_forward: int = 512,
                 max_distance: int = 128, dropout: float = 0.1):
        super().__init__()
        self.embedding = nn.Linear(columns, dim)
        self.blocks = nn.ModuleList(DecoderBlock(dim, heads, feed_forward, max_distance, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, columns)

    def forward(self, steps: Tensor) -> Tensor:
        x = self.embedding(steps)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def step(self, step: Tensor, cache: KeyValueCache) -> Tensor:
        """Logits (B, columns) of the step after ``step`` (B, columns), given the earlier steps in ``cache``
        (which this call extends by one position)."""
        x = self.embedding(step.unsqueeze(1))
        for layer, block in enumerate(self.blocks):
            x = block.step(x, cache, layer)
        return self.head(self.norm(x))[:, 0]
