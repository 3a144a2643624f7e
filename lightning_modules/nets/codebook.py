"""Vector-quantisation codebook updated by exponential moving averages, with dead-entry restarts.

The entries are k-means centroids kept by EMA rather than learned by gradient: each training step
assigns every encoder vector to its nearest entry (L2), accumulates per-entry counts and vector
sums, blends them into EMA statistics and sets entry = EMA sum / Laplace-smoothed EMA count. There
is no codebook loss; the encoder only receives the commitment term and, through the
straight-through estimator, the decoder's gradient.

Restarts (as in Jukebox): an entry whose EMA count falls below ``restart_threshold`` is replaced by
an encoder vector drawn at random from the current batch. Its statistics are reset consistently:
EMA count = threshold and EMA sum = threshold x vector, so the entry equals the drawn vector (up to
the Laplace smoothing) and counts as "just in use"; if it still attracts nothing, its count decays
below the threshold on the next step and it is drawn again.

Data-parallel training: every rank sees a different batch, so the per-step counts and sums are
summed across ranks before the EMA update, and restart vectors are drawn from the union of the
ranks' batches (rank order) with a generator seeded by (seed, step counter), identical on all
ranks. Every rank therefore holds the same codebook after every step, equal to what one process
would compute on the concatenated batches (up to the summation order of floating-point sums).

A training step never waits for the device: the counts are accumulated with ``index_add_`` (no
``bincount``, which reads the largest index back to the host), every entry gets a restart
candidate and the dead ones take theirs through a mask (no ``nonzero``), and the random draws are
made on the host and staged to the device asynchronously.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from framework.devices import float32_math, to_device_async


class Quantized(NamedTuple):
    """Result of one codebook pass over encoder outputs ``z`` of shape (B, D, S)."""

    z_q: Tensor  # (B, D, S): the assigned entries, with the straight-through gradient to z
    indices: Tensor  # (B, S) long: index of the nearest entry per step
    commitment: Tensor  # scalar: mean over elements of (z - sg[entry])^2
    perplexity: Tensor  # scalar: exp(entropy of the batch's entry-usage distribution)
    used: Tensor  # scalar long: entries assigned at least once in the batch
    restarts: Tensor  # scalar long: entries restarted by this step (0 outside training)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def usage_perplexity(counts: Tensor) -> Tensor:
    """exp(entropy) of the distribution ``counts / counts.sum()``: K for uniform use of K entries, 1 for one entry."""
    probs = counts / counts.sum().clamp_min(1)
    return torch.exp(-torch.special.xlogy(probs, probs).sum())


class EMACodebook(nn.Module):
    """K entries of dimension D; ``forward`` quantises (B, D, S) encoder outputs.

    All state lives in buffers (saved in checkpoints): ``embedding`` (K, D), ``ema_count`` (K,),
    ``ema_sum`` (K, D) and ``steps`` (training updates so far, seeds the restart draws). The EMA
    statistics start at zero, so the first training step restarts every entry that did not attract
    ``restart_threshold / (1 - decay)`` vectors: a data-dependent initialisation.
    """

    def __init__(
        self,
        num_codes: int = 512,
        dim: int = 16,
        decay: float = 0.99,
        eps: float = 1e-5,
        restart_threshold: float = 1.0,
        seed: int = 0,
    ):
        super().__init__()
        if num_codes < 1 or dim < 1:
            raise ValueError(f"EMACodebook: num_codes ({num_codes}) and dim ({dim}) must be positive.")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMACodebook: decay must lie in [0, 1), got {decay}.")
        if eps <= 0 or restart_threshold <= 0:
            raise ValueError(f"EMACodebook: eps ({eps}) and restart_threshold ({restart_threshold}) must be > 0.")
        self.num_codes = num_codes
        self.dim = dim
        self.decay = decay
        self.eps = eps
        self.restart_threshold = restart_threshold
        self.seed = seed
        self._host_steps: int | None = None  # ``steps`` mirrored on the host, read from it once
        self.register_buffer("embedding", torch.randn(num_codes, dim))
        self.register_buffer("ema_count", torch.zeros(num_codes))
        self.register_buffer("ema_sum", torch.zeros(num_codes, dim))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def assign(self, z: Tensor) -> Tensor:
        """Indices (B, S) of the nearest entries to the vectors of ``z`` (B, D, S); no update."""
        batch, _, steps = z.shape
        return self._nearest(self._flatten(z)).view(batch, steps)

    def lookup(self, indices: Tensor) -> Tensor:
        """Entries for ``indices`` (B, S), channel-major: (B, D, S)."""
        return F.embedding(indices, self.embedding).transpose(1, 2)

    def forward(self, z: Tensor) -> Quantized:
        """Quantise ``z`` (B, D, S) against the current entries; in training mode, then update the
        codebook from this batch (summed over ranks under data parallelism)."""
        if z.dim() != 3 or z.shape[1] != self.dim:
            raise ValueError(f"EMACodebook expects (batch, {self.dim}, steps), got {tuple(z.shape)}.")
        flat = self._flatten(z.detach())
        indices = self._nearest(flat)
        entries = self.embedding[indices]  # the entries the vectors were assigned to, before any update
        counts = torch.zeros(self.num_codes, device=flat.device).index_add_(0, indices, torch.ones_like(indices, dtype=torch.float32))
        restarts = torch.zeros((), dtype=torch.long, device=z.device)
        if self.training:
            sums = torch.zeros_like(self.ema_sum).index_add_(0, indices, flat)
            counts, sums = self._sum_over_ranks(counts, sums)
            restarts = self._update(flat, counts, sums)

        batch, dim, steps = z.shape
        e = entries.view(batch, steps, dim).transpose(1, 2).to(z.dtype)
        return Quantized(
            z_q=z + (e - z).detach(),
            indices=indices.view(batch, steps),
            commitment=F.mse_loss(z, e.detach()),
            perplexity=usage_perplexity(counts),
            used=(counts > 0).sum(),
            restarts=restarts,
        )

    def _flatten(self, z: Tensor) -> Tensor:
        return z.transpose(1, 2).reshape(-1, self.dim).float()

    def _nearest(self, flat: Tensor) -> Tensor:
        with float32_math():
            distances = (
                flat.pow(2).sum(1, keepdim=True)
                - 2 * flat @ self.embedding.t()
                + self.embedding.pow(2).sum(1)
            )
        return distances.argmin(1)

    def _sum_over_ranks(self, counts: Tensor, sums: Tensor) -> tuple[Tensor, Tensor]:
        if not _distributed():
            return counts, sums
        stats = torch.cat([counts[:, None], sums], dim=1)
        dist.all_reduce(stats)
        return stats[:, 0], stats[:, 1:]

    @torch.no_grad()
    def _update(self, flat: Tensor, counts: Tensor, sums: Tensor) -> Tensor:
        """EMA update from this step's (rank-summed) statistics, restarts, new entries; returns the
        number of restarted entries (a device tensor)."""
        step = self._steps_done()
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        dead = self.ema_count < self.restart_threshold  # the same on every rank: the counts were summed over ranks
        candidates = self._restart_candidates(flat, step)
        self.ema_count.masked_fill_(dead, self.restart_threshold)
        self.ema_sum.copy_(torch.where(dead[:, None], self.restart_threshold * candidates, self.ema_sum))
        total = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (total + self.num_codes * self.eps) * total
        self.embedding.copy_(self.ema_sum / smoothed[:, None])
        self.steps += 1
        self._host_steps = step + 1
        return dead.sum()

    def _steps_done(self) -> int:
        """Training updates so far; the ``steps`` buffer is read once (at the first step, or after
        a checkpoint is loaded), never per step."""
        if self._host_steps is None:
            self._host_steps = int(self.steps)
        return self._host_steps

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._host_steps = None

    def _restart_candidates(self, flat: Tensor, step: int) -> Tensor:
        """One restart vector per entry, (K, D), drawn from the union of all ranks' ``flat`` (rank
        order) and identical on every rank.

        Entry k takes the vector at position ``draw_k mod total`` of the union, where ``draw`` are
        K random integers from a CPU generator seeded by (seed, step) and ``total`` the union's
        size; each rank contributes the chosen vectors it holds and the contributions are summed
        over ranks (exact: the others add zeros). Sizes, offsets and positions stay on the device.
        """
        generator = torch.Generator().manual_seed((self.seed << 32) + step)
        draws = torch.randint(2**62, (self.num_codes,), generator=generator)
        draws = to_device_async(draws, flat.device)
        size = torch.full((), flat.shape[0], device=flat.device)
        offset, total = torch.zeros_like(size), size
        if _distributed():
            sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
            dist.all_gather(sizes, size)
            sizes = torch.stack(sizes)
            offset, total = sizes[: dist.get_rank()].sum(), sizes.sum()
        local = draws % total - offset
        mine = (local >= 0) & (local < flat.shape[0])
        vectors = torch.where(mine[:, None], flat[local.clamp(0, max(flat.shape[0] - 1, 0))], 0.0)
        if _distributed():
            dist.all_reduce(vectors)
        return vectors
