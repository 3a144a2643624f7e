"""Drawing the next code index from a prior's logits: temperature, top-k and nucleus (top-p).

Sampling modes (``mode`` in :meth:`SamplingSettings.from_mode`), with the paper's settings:

- ``temperature``: sample from softmax(logits / T) over all indices (paper: T = 0.7);
- ``top_k``: keep the k most probable indices, renormalise, sample (paper: k = 30);
- ``top_p``: keep the smallest set of most probable indices whose cumulative probability, summed in
  descending order, reaches p, renormalise, sample (paper: p = 0.08).

The temperature divides the logits in every mode before filtering, so it also shapes the top-p
nucleus; T = 0 means greedy (argmax).

Random numbers enter only as one uniform per draw, turned into an index by inverting the cumulative
distribution. A caller that draws a block of uniforms shaped (sequences, positions) from a
``torch.Generator`` therefore gets the same indices for a sequence whether it is generated alone or
inside a batch: every sequence consumes exactly its own row of uniforms, whatever the other rows do
and whatever the temperature or filter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SAMPLING_MODES = ("temperature", "top_k", "top_p")


@dataclass(frozen=True)
class SamplingSettings:
    """Resolved sampling parameters: ``top_k=0`` and ``top_p=1.0`` switch the filters off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in [0, 1] (1 = off), got {self.top_p}")

    @classmethod
    def from_mode(cls, mode: str, temperature: float = 1.0, top_k: int = 30, top_p: float = 0.08) -> "SamplingSettings":
        """Settings for one of :data:`SAMPLING_MODES`; the parameter of a mode not chosen is ignored."""
        if mode not in SAMPLING_MODES:
            raise ValueError(f"unknown sampling mode {mode!r}; valid modes: {', '.join(SAMPLING_MODES)}")
        return cls(
            temperature=float(temperature),
            top_k=int(top_k) if mode == "top_k" else 0,
            top_p=float(top_p) if mode == "top_p" else 1.0,
        )


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set the logits outside the top-k and then outside the top-p nucleus to -inf (last dim).

    Top-k keeps exactly the k largest (ties broken by ``torch.topk``). Top-p keeps an entry when the
    probability of all entries ranked above it is still below p, i.e. the smallest prefix of the
    descending order whose cumulative probability reaches p; the most probable entry always stays.
    """
    num_classes = logits.shape[-1]
    if 0 < top_k < num_classes:
        kept = logits.topk(top_k, dim=-1).indices
        logits = torch.full_like(logits, float("-inf")).scatter(-1, kept, logits.gather(-1, kept))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        mass_above = torch.cat([torch.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], dim=-1)
        drop_sorted = mass_above >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def invert_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of ``probs`` (..., K; need not sum to 1) by one uniform in [0, 1).

    Returns the first index whose cumulative probability exceeds ``u * total``; indices of zero
    probability are never returned.
    """
    cdf = probs.cumsum(dim=-1)
    total = cdf[..., -1:]
    target = torch.minimum(uniforms.to(cdf.dtype).unsqueeze(-1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf.contiguous(), target.contiguous(), right=True).squeeze(-1)


def sample_from_logits(logits: torch.Tensor, uniforms: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """Indices (...,) drawn from ``logits`` (..., K) under ``settings``, one uniform (...,) per draw."""
    if settings.temperature == 0:
        return logits.argmax(dim=-1)
    filtered = filter_logits(logits / settings.temperature, settings.top_k, settings.top_p)
    return invert_cdf(filtered.softmax(dim=-1), uniforms)
