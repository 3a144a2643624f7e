"""Metrics for generated loops: loop score, unique pitch, note density and precision/recall/density/coverage.

Phrases are ``(N, 128, 57)`` bool or float tensors: 128 steps (8 bars of 16 steps) by 57 columns
(9 drum classes, then 48 bass pitches). The functional forms compute one batch; the torchmetrics
classes accumulate over batches and ranks.

Every computation runs in float32 (autocast switched off), so the values do not depend on the
training precision, and on the device of its inputs.

Distributed use: every class accepts an optional per-sample ``index`` (int64, ``-1`` = no index).
States are gathered across ranks with ``dist_reduce_fx="cat"``; ``compute()`` then keeps one entry
per index value (the first after a stable sort by index), so the duplicates a ``DistributedSampler``
adds to pad an uneven set are counted once. Pass the dataset position of each sample as its index;
samples without an index are always counted. Sorting by index also makes the gathered order, and so
every seeded subsample drawn from it, the same for any number of ranks.
"""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from datamodules.correlation import c_midi
from datamodules.pianoroll import (
    BARS_PER_PHRASE, N_COLUMNS, PACKED_BYTES, PHRASE_STEPS, STEPS_PER_BAR, pack_phrases, unpack_phrases,
)
from framework.devices import float32_math
from lightning_modules.nets.conv_stacks import conv_block

EMBEDDING_DIM = 128
PRDC_KEYS = ("precision", "recall", "density", "coverage")
# Distances below this fraction of the largest feature norm count as exact duplicates (distance 0).
DUPLICATE_TOLERANCE = 1e-5
# Float32 distances per block (32 MiB): amortises per-operation overheads, linear memory.
_DISTANCE_BLOCK_ELEMENTS = 1 << 23
# Float32 neighbours kept per row beyond the k+1 nearest, so near ties at the radius stay in view.
_NEIGHBOUR_SLACK = 8
# Exact distances are computed this many pairs at a time.
_PAIR_CHUNK = 1 << 14
# Columns per group whose minimum screens a row for its nearest neighbours (_smallest_per_row).
_GROUP_WIDTH = 64


def _check_phrases(phrases: Tensor) -> None:
    if phrases.ndim != 3 or tuple(phrases.shape[1:]) != (PHRASE_STEPS, N_COLUMNS):
        raise ValueError(f"phrases must have shape (N, {PHRASE_STEPS}, {N_COLUMNS}), got {tuple(phrases.shape)}")


def _bars(phrases: Tensor) -> Tensor:
    """``(N, 128, 57)`` -> bool ``(N, 8 bars, 16 steps, 57 columns)``."""
    _check_phrases(phrases)
    return phrases.bool().reshape(len(phrases), BARS_PER_PHRASE, STEPS_PER_BAR, N_COLUMNS)


def unique_pitch(phrases: Tensor) -> Tensor:
    """UP per phrase: distinct columns (drum classes and bass pitches) active in a bar, mean over bars."""
    return _bars(phrases).any(dim=2).sum(dim=2).float().mean(dim=1)


def note_density(phrases: Tensor) -> Tensor:
    """ND per phrase: steps of a bar at which any column is active, mean over bars."""
    return _bars(phrases).any(dim=3).sum(dim=2).float().mean(dim=1)


def f1_score(a: Tensor, b: Tensor) -> Tensor:
    """Harmonic mean of two rates, 0 where both are 0 (Table 3's F1(P,R) and F1(D,C))."""
    total = a + b
    return torch.where(total > 0, 2 * a * b / total.clamp_min(torch.finfo(total.dtype).tiny), torch.zeros_like(total))


# --------------------------------------------------------------------------------------------- PRDC
#
# Every squared distance is first computed in float32 by one matmul over augmented points (see
# _PointSet). A float32 value ``e`` lies within a proven tolerance of the exact squared distance
# ``d^2`` (_error_scale), so a comparison ``d^2 < b`` is already decided unless ``e`` is that close
# to ``b``; only such near ties, usually the one neighbour that defines a radius, are recomputed
# exactly in float64, pair by pair. Float64 never enters a matrix product (slow on most GPUs).
# Each of the three distance blocks is computed once, apart from the few rows whose nearest
# neighbours cannot be told apart in float32 (many duplicates or near ties), which are computed
# again whole, still in float32.


@dataclass(frozen=True)
class _PointSet:
    """One side of PRDC, centred, in the forms the two precisions need.

    ``exact``: float64 points, the source of exact squared distances. ``left`` and ``right``: the
    float32 points ``x`` as ``[x, |x|^2, 1]`` and ``[-2x, 1, |x|^2]``, so that ``left_i . right_j``
    is ``|x_i - x_j|^2`` with the norms already added by the matmul. ``squared_norms``: float64
    ``|x|^2`` of the float32 points, which scale the float32 error.
    """

    exact: Tensor
    left: Tensor
    right: Tensor
    squared_norms: Tensor

    @classmethod
    def centred(cls, points: Tensor, centre: Tensor) -> _PointSet:
        exact = points.to(device=centre.device, dtype=torch.float64) - centre
        approximate = exact.to(torch.float32)
        squared_norms = approximate.double().square().sum(dim=1)
        norms32, ones = squared_norms.to(torch.float32).unsqueeze(1), torch.ones_like(approximate[:, :1])
        left = torch.cat([approximate, norms32, ones], dim=1)
        right = torch.cat([-2 * approximate, ones, norms32], dim=1)
        return cls(exact, left, right, squared_norms)

    def __len__(self) -> int:
        return len(self.exact)


def _error_scale(dim: int) -> float:
    """``c`` with ``|e - d^2| <= c (|x|^2 + |y|^2)`` for the float32 squared distance ``e``.

    With ``u = 2^-24``: rounding the centred points to float32 moves ``d^2`` by at most
    ``4u (|x|^2 + |y|^2)``; the ``dim + 2`` term float32 dot product errs, in any summation order,
    by at most ``gamma_(dim+2) = (dim + 2) u / (1 - (dim + 2) u)`` times the sum of its absolute
    terms, itself at most ``2 (|x|^2 + |y|^2)``; rounding the norms and a float64 threshold to
    float32 adds ``4u``. The sum is ``(2 (dim + 2) + 8) u`` to first order; it is doubled to cover
    the higher-order terms with room to spare.
    """
    return 2 * (2 * (dim + 2) + 8) * 2.0**-24


def _row_chunks(n_rows: int, n_cols: int, chunk_size: int | None) -> Iterator[slice]:
    size = chunk_size or max(1, _DISTANCE_BLOCK_ELEMENTS // max(n_cols, 1))
    for start in range(0, n_rows, size):
        yield slice(start, min(start + size, n_rows))


def _approximate_blocks(x: _PointSet, y: _PointSet, chunk_size: int | None) -> Iterator[tuple[slice, Tensor]]:
    """Row chunks of float32 squared distances from ``x`` to ``y``, written into one reused buffer."""
    chunks = list(_row_chunks(len(x), len(y), chunk_size))
    buffer = torch.empty(chunks[0].stop, len(y), dtype=torch.float32, device=x.left.device)
    for rows in chunks:
        block = buffer[: rows.stop - rows.start]
        yield rows, torch.mm(x.left[rows], y.right.T, out=block)


def _pair_squared_distances(x: Tensor, y: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """``|x_i - y_j|^2`` in float64 for index pairs, a bounded number of pairs at a time."""
    out = torch.empty(len(i), dtype=torch.float64, device=x.device)
    for start in range(0, len(i), _PAIR_CHUNK):
        part = slice(start, start + _PAIR_CHUNK)
        out[part] = (x[i[part]] - y[j[part]]).square_().sum(dim=1)
    return out


def _kth_neighbour(squared: Tensor, k: int, floor: float, distinct: bool) -> Tensor:
    """Per row of exact squared distances (the point itself included), the squared radius.

    ``distinct=False`` is the reference: the (k+1)-th smallest, so exact duplicates count as
    neighbours. ``distinct=True`` skips duplicates (squared distance at most ``floor``) and takes
    the k-th nearest *different* point, or the farthest one if fewer than k exist.
    """
    if not distinct:
        return squared.topk(k + 1, dim=1, largest=False).values[:, -1]
    farthest = squared.amax(dim=1)
    kth = squared.masked_fill(squared <= floor, float("inf")).topk(k, dim=1, largest=False).values[:, -1]
    return torch.minimum(kth, farthest)


def _smallest_per_row(block: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """``block.topk(count, dim=1, largest=False)`` (any strides), found mostly by cheap group minima.

    The ``count`` groups of ``_GROUP_WIDTH`` columns with the smallest minima hold ``count``
    values no larger than the ``count``-th smallest minimum, and every column of another group
    is at least that large; so the row's ``count`` smallest values are among those groups' columns
    and the columns past the last whole group, and one small topk over them finds them.
    """
    rows, columns = block.shape
    groups = columns // _GROUP_WIDTH
    if groups <= count:
        return block.topk(count, dim=1, largest=False)
    row_stride, column_stride = block.stride()
    grouped = block.as_strided(
        (rows, groups, _GROUP_WIDTH), (row_stride, _GROUP_WIDTH * column_stride, column_stride), block.storage_offset()
    )
    minima = grouped.amin(dim=2)
    chosen = minima.topk(count, dim=1, largest=False).indices.unsqueeze(2) * _GROUP_WIDTH
    offsets = torch.arange(_GROUP_WIDTH, device=block.device)
    candidates = (chosen + offsets).reshape(rows, count * _GROUP_WIDTH)
    remainder = torch.arange(groups * _GROUP_WIDTH, columns, device=block.device).expand(rows, -1)
    candidates = torch.cat([candidates, remainder], dim=1)
    smallest = block.gather(1, candidates).topk(count, dim=1, largest=False)
    return smallest.values, candidates.gather(1, smallest.indices)


def _squared_radii(points: _PointSet, k: int, floor: float, distinct: bool, chunk_size: int | None) -> Tensor:
    """Squared distance of every point to its k-th nearest neighbour in its own set (:func:`_kth_neighbour`).

    Each row keeps its ``k + 1 + _NEIGHBOUR_SLACK`` nearest points by float32 distance and is
    settled from them (:func:`_settle_radii`). The rows this list cannot settle are computed again
    against every point, in float32, and settled from the whole sorted row; a row with fewer than
    k distinct neighbours in the set gets exact distances to every point.
    """
    n = len(points)
    kept = min(n, k + 1 + _NEIGHBOUR_SLACK)
    nearest = [_smallest_per_row(block, kept) for _, block in _approximate_blocks(points, points, chunk_size)]
    values = torch.cat([block_values for block_values, _ in nearest])
    neighbours = torch.cat([block_neighbours for _, block_neighbours in nearest])
    rows = torch.arange(n, device=values.device)
    radii, settled = _settle_radii(points, rows, values, neighbours, k, floor, distinct)
    for unsettled in rows[~settled].split(_DISTANCE_BLOCK_ELEMENTS // n + 1):
        values, neighbours = torch.mm(points.left[unsettled], points.right.T).sort(dim=1)
        radii[unsettled], settled = _settle_radii(points, unsettled, values, neighbours, k, floor, distinct)
        for row in unsettled[~settled]:  # fewer than k distinct neighbours: the farthest point decides
            squared = _pair_squared_distances(points.exact, points.exact, row.expand(n), rows)
            radii[row] = _kth_neighbour(squared.unsqueeze(0), k, floor, distinct)[0]
    return radii


def _settle_radii(points: _PointSet, rows: Tensor, values: Tensor, neighbours: Tensor, k: int, floor: float,
                  distinct: bool) -> tuple[Tensor, Tensor]:
    """Exact squared radii of ``rows`` from their nearest points by float32 distance, and which rows
    the list settles.

    ``values`` (float32, ascending per row, the point itself included) and ``neighbours`` (their
    indices) hold each row's ``kept`` nearest points; the float32 estimate of the rank statistic
    comes from them. Points more than twice the tolerance below the estimate are certainly nearer
    than the radius (and, unless possibly duplicates, keep their float32 value, which lies below
    it too); points as far above are certainly farther (+inf); only the rest get exact distances,
    usually the one neighbour that defines the radius. The order statistic of the settled list is
    then exact, provided the list reaches past the estimate: a row whose list does not (near ties,
    many duplicates) is not settled, unless the list is the whole row and still holds k distinct
    neighbours. Without ``distinct``, a row whose list holds only upper bounds and already puts
    the radius at or below ``floor`` is settled too: the true radius is no larger and contains
    nothing either.
    """
    n, kept = len(points), values.shape[1]
    values = values.double()
    tolerance = _error_scale(points.exact.shape[1]) * (points.squared_norms[rows] + points.squared_norms.max())
    tolerance = tolerance.unsqueeze(1)
    possible_duplicate = values <= floor + tolerance
    if distinct:  # the k-th distinct neighbour comes after every possible duplicate
        rank = possible_duplicate.sum(dim=1, keepdim=True) + (k - 1)
    else:
        rank = torch.full_like(neighbours[:, :1], k)
    estimate = values.gather(1, rank.clamp(max=kept - 1))
    below = values < estimate - 2 * tolerance
    if distinct:
        below &= ~possible_duplicate
    above = values > estimate + 2 * tolerance
    settled_values = values.masked_fill(above, float("inf"))
    unsure_row, unsure_col = (~(below | above)).nonzero(as_tuple=True)
    settled_values[unsure_row, unsure_col] = _pair_squared_distances(
        points.exact, points.exact, rows[unsure_row], neighbours[unsure_row, unsure_col]
    )
    radii = _kth_neighbour(settled_values, k, floor, distinct)
    settled = (rank < kept - 1) & (above[:, -1:] | (kept == n))
    if not distinct:
        settled |= (radii <= floor).unsqueeze(1) & ~below.any(dim=1, keepdim=True)
    return radii, settled.squeeze(1)


def _within(squared: Tensor, tolerance: Tensor, bound: Tensor) -> tuple[Tensor, Tensor]:
    """``(inside, unsure)``: float32 squared distances certainly below ``bound``, and too close to tell."""
    inside = squared < bound - tolerance
    return inside, (squared < bound + tolerance) & ~inside


def _ball_memberships(
    real: _PointSet, fake: _PointSet, real_bound: Tensor, fake_bound: Tensor, chunk_size: int | None
) -> tuple[Tensor, Tensor, Tensor]:
    """From one pass over the real-fake distances: per fake, the number of real balls holding it;
    per real, whether some fake lies in its ball (coverage) and whether it lies in some fake's
    ball (recall).

    Float32 limits that add the largest tolerance to each bound pick the few candidate pairs;
    each candidate is then decided with its own tolerance, or exactly if that is not enough.
    """
    scale = _error_scale(real.exact.shape[1])
    real_limit = (real_bound + scale * (real.squared_norms + fake.squared_norms.max())).to(torch.float32)
    fake_limit = (fake_bound + scale * (fake.squared_norms + real.squared_norms.max())).to(torch.float32)
    balls_per_fake = torch.zeros(len(fake), dtype=torch.int64, device=real_bound.device)
    covered = torch.zeros(len(real), dtype=torch.bool, device=real_bound.device)
    recalled = torch.zeros_like(covered)
    for rows, approximate in _approximate_blocks(real, fake, chunk_size):
        candidates = approximate < real_limit[rows].unsqueeze(1)
        candidates |= approximate < fake_limit
        block_i, j = candidates.nonzero(as_tuple=True)
        squared = approximate[block_i, j].double()
        i = block_i + rows.start
        tolerance = scale * (real.squared_norms[i] + fake.squared_norms[j])
        in_real_ball, unsure_real = _within(squared, tolerance, real_bound[i])
        in_fake_ball, unsure_fake = _within(squared, tolerance, fake_bound[j])
        unsure = (unsure_real | unsure_fake).nonzero().squeeze(1)
        exact = _pair_squared_distances(real.exact, fake.exact, i[unsure], j[unsure])
        in_real_ball[unsure] = exact < real_bound[i[unsure]]
        in_fake_ball[unsure] = exact < fake_bound[j[unsure]]
        balls_per_fake += torch.bincount(j[in_real_ball], minlength=len(fake))
        covered[i[in_real_ball]] = True
        recalled[i[in_fake_ball]] = True
    return balls_per_fake, covered, recalled


def _strict_bound(squared_radii: Tensor, floor: float) -> Tensor:
    """Bounds ``b`` with ``d^2 < b`` exactly when the reference finds ``d < r`` in float32.

    The reference rounds squared distances to float32 and takes a float32 square root; both are
    monotone, so ``sqrt32(round32(d^2)) < r32`` holds exactly for ``round32(d^2) < v`` with ``v`` the
    smallest float32 whose root reaches ``r32``, i.e. for ``d^2`` below the midpoint between ``v``
    and its float32 predecessor. Radii at or below the duplicate ``floor`` contain nothing (-inf).
    """
    radius = squared_radii.to(torch.float32).sqrt()
    candidate = radius.double().square().to(torch.float32)
    below, above = torch.full_like(candidate, -float("inf")), torch.full_like(candidate, float("inf"))
    for _ in range(2):
        previous = torch.nextafter(candidate, below)
        candidate = torch.where(previous.sqrt() >= radius, previous, candidate)
        candidate = torch.where(candidate.sqrt() < radius, torch.nextafter(candidate, above), candidate)
    bound = (candidate.double() + torch.nextafter(candidate, below).double()) / 2
    return bound.masked_fill(squared_radii <= floor, -float("inf"))


def prdc(
    real: Tensor,
    fake: Tensor,
    k: int = 5,
    *,
    distinct_neighbours: bool = False,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """Improved precision/recall (Kynkaanniemi et al.) and density/coverage (Naeem et al.).

    Same definitions and results as the ``prdc`` package: Euclidean distance, radius of a point =
    distance to its k-th nearest neighbour in its own set excluding itself, membership by strict
    ``<``. Each of the three distance blocks (real-real, fake-fake, real-fake) is computed once,
    in float32; radii and ball memberships that float32 cannot decide are settled with exact
    float64 distances against bounds that reproduce the reference's float32 rounding
    (:func:`_strict_bound`), so even near ties agree. Runs on the inputs' device in blocks of
    ``chunk_size`` rows (default: about 8M distances a block), so memory grows linearly with the
    set sizes.

    Exact duplicates: a point whose k nearest neighbours are all copies of itself gets radius 0
    and, with strict ``<``, contains nothing, not even its copies; in symbolic music (many
    identical phrases) this deflates precision, density and coverage. Distances below
    ``DUPLICATE_TOLERANCE`` times the largest (centred) feature norm count as exact duplicates, so
    rounding noise cannot decide these cases. ``distinct_neighbours=True`` measures radii to the
    k-th nearest *distinct* point instead, so copies fall inside a ball of positive radius; it is
    off by default to match the reference.
    """
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake must be (N, D) with equal D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"PRDC with k={k} needs more than {k} real and fake samples, got {len(real)} and {len(fake)}")
    for name, features in (("real", real), ("fake", fake)):
        if not torch.isfinite(features).all():
            raise ValueError(f"{name} features contain NaN or infinite values")
    centre = real.mean(dim=0, dtype=torch.float64)
    real, fake = _PointSet.centred(real, centre), _PointSet.centred(fake, centre)
    floor = DUPLICATE_TOLERANCE**2 * max(real.squared_norms.max().item(), fake.squared_norms.max().item())

    with float32_math():  # the error bound assumes true float32 products
        real_bound = _strict_bound(_squared_radii(real, k, floor, distinct_neighbours, chunk_size), floor)
        fake_bound = _strict_bound(_squared_radii(fake, k, floor, distinct_neighbours, chunk_size), floor)
        balls_per_fake, covered, recalled = _ball_memberships(real, fake, real_bound, fake_bound, chunk_size)

    return {
        "precision": (balls_per_fake > 0).float().mean(),
        "recall": recalled.float().mean(),
        "density": balls_per_fake.sum().float() / (k * len(fake)),
        "coverage": covered.float().mean(),
    }


# ---------------------------------------------------------------------------------- embedding CNN


class PhraseEmbedding(nn.Module):
    """The evaluation's untrained CNN: phrases ``(N, 128, 57)`` -> features ``(N, 128)``.

    Two of the VQ-VAE's blocks (Conv1d kernel 3, padding 1, no bias + BatchNorm1d + LeakyReLU(0.2))
    over time with the 57 columns as channels: 57->8 with stride 2 (128 steps -> 64) and 8->8 with
    stride 4 (64 -> 16), which flattens to exactly 8 x 16 = 128; then Linear 128->128.
    """

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(conv_block(N_COLUMNS, 8, stride=2), conv_block(8, 8, stride=4), nn.Flatten())
        self.head = nn.Linear(8 * 16, EMBEDDING_DIM)

    def forward(self, phrases: Tensor) -> Tensor:
        _check_phrases(phrases)
        with float32_math():
            return self.head(self.blocks(phrases.float().transpose(1, 2)))


def random_cnn_embedding(seed: int) -> PhraseEmbedding:
    """A randomly initialised, untrained :class:`PhraseEmbedding` in eval mode, on the CPU.

    Built on the meta device and initialised from a generator seeded with ``seed`` (PyTorch's
    default uniform ranges: +-1/sqrt(fan_in)), so the global RNG is neither used nor advanced and
    the same seed gives the same network everywhere.
    """
    generator = torch.Generator().manual_seed(int(seed))
    with torch.device("meta"):
        net = PhraseEmbedding()
    net.to_empty(device="cpu")
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (nn.Conv1d, nn.Linear)):
                bound = module.weight[0].numel() ** -0.5
                module.weight.uniform_(-bound, bound, generator=generator)
                if module.bias is not None:
                    module.bias.uniform_(-bound, bound, generator=generator)
            elif isinstance(module, nn.BatchNorm1d):
                module.reset_parameters()
    return net.eval().requires_grad_(False)


def embed(net: nn.Module, phrases: Tensor, batch_size: int = 4096) -> Tensor:
    """Features of ``phrases`` through ``net``, in batches, without gradients."""
    with torch.no_grad():
        parts = [net(phrases[start : start + batch_size]) for start in range(0, len(phrases), batch_size)]
    return torch.cat(parts) if parts else torch.empty(0, EMBEDDING_DIM, device=phrases.device)


# ------------------------------------------------------------------------------- state utilities


def _as_index(index: Tensor | None, n: int, device: torch.device) -> Tensor:
    if index is None:
        return torch.full((n,), -1, dtype=torch.int64, device=device)
    index = torch.as_tensor(index, dtype=torch.int64, device=device).reshape(-1)
    if len(index) != n:
        raise ValueError(f"index has {len(index)} entries for {n} samples")
    return index


def _unique_by_index(index: Tensor) -> Tensor:
    """Positions to keep: sorted by index, one per index value >= 0, every entry with index -1."""
    order = torch.sort(index, stable=True).indices
    ordered = index[order]
    keep = torch.ones_like(ordered, dtype=torch.bool)
    keep[1:] = ordered[1:] != ordered[:-1]
    return order[keep | (ordered < 0)]


# -------------------------------------------------------------------------------------- metrics


class _PerPhraseMean(Metric):
    """Mean over phrases of a per-phrase score, each index counted once."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    @abstractmethod
    def score(self, phrases: Tensor) -> Tensor:
        """Per-phrase values ``(N,)``."""

    def update(self, phrases: Tensor, index: Tensor | None = None) -> None:
        with float32_math():
            scores = self.score(phrases).float()
        self.scores.append(scores)
        self.index.append(_as_index(index, len(scores), scores.device))

    def compute(self) -> Tensor:
        scores = dim_zero_cat(self.scores)
        return scores[_unique_by_index(dim_zero_cat(self.index))].mean()


class UniquePitch(_PerPhraseMean):
    """UP: mean over phrases of :func:`unique_pitch`."""

    def score(self, phrases: Tensor) -> Tensor:
        return unique_pitch(phrases)


class NoteDensity(_PerPhraseMean):
    """ND: mean over phrases of :func:`note_density`."""

    def score(self, phrases: Tensor) -> Tensor:
        return note_density(phrases)


class LoopScore(_PerPhraseMean):
    """LS: mean loop score of phrases (C_MIDI through ``detector.loop_score``; lower = more loop-like).

    ``similarity`` picks the C_MIDI variant; None uses the one the detector was trained with
    (``detector.hparams.similarity``) or, for a detector without one, the paper's ``"hamming"``.
    """

    def __init__(self, detector: nn.Module, similarity: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.detector = detector.eval().requires_grad_(False)
        self.similarity = similarity or getattr(getattr(detector, "hparams", None), "similarity", None) or "hamming"

    def score(self, phrases: Tensor) -> Tensor:
        _check_phrases(phrases)
        with torch.no_grad():
            correlation = c_midi(phrases.bool(), similarity=self.similarity)
            return self.detector.loop_score(correlation.float())


class _RealFakeSets(Metric):
    """Accumulates a real and a fake set of samples, each with optional indices."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for side in ("real", "fake"):
            self.add_state(side, default=[], dist_reduce_fx="cat")
            self.add_state(f"{side}_index", default=[], dist_reduce_fx="cat")

    @abstractmethod
    def encode(self, samples: Tensor) -> Tensor:
        """How one side's samples are stored."""

    def update(
        self,
        real: Tensor | None = None,
        fake: Tensor | None = None,
        real_index: Tensor | None = None,
        fake_index: Tensor | None = None,
    ) -> None:
        """Add real and/or fake samples; indices as described in the module docstring."""
        for side, samples, index in (("real", real, real_index), ("fake", fake, fake_index)):
            if samples is not None:
                stored = self.encode(samples)
                getattr(self, side).append(stored)
                getattr(self, f"{side}_index").append(_as_index(index, len(stored), stored.device))

    def _collected(self, side: str) -> Tensor:
        samples = getattr(self, side)
        if isinstance(samples, list) and not samples:
            raise ValueError(f"{type(self).__name__} received no {side} samples")
        samples = dim_zero_cat(samples)
        return samples[_unique_by_index(dim_zero_cat(getattr(self, f"{side}_index")))]


class PRDC(_RealFakeSets):
    """Precision, recall, density and coverage (:func:`prdc`) between real and fake feature sets."""

    def __init__(self, k: int = 5, distinct_neighbours: bool = False, chunk_size: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.k, self.distinct_neighbours, self.chunk_size = k, distinct_neighbours, chunk_size

    def encode(self, samples: Tensor) -> Tensor:
        if samples.ndim != 2:
            raise ValueError(f"features must be (N, D), got {tuple(samples.shape)}")
        return samples.float()

    def compute(self) -> dict[str, Tensor]:
        return prdc(
            self._collected("real"),
            self._collected("fake"),
            self.k,
            distinct_neighbours=self.distinct_neighbours,
            chunk_size=self.chunk_size,
        )


class GenerativeMetrics(_RealFakeSets):
    """P/R/D/C of phrases on embeddings of ``n_networks`` random CNNs, as in the paper's Table 3.

    ``compute()`` is :func:`random_cnn_prdc` of the gathered real and fake phrases: per P/R/D/C
    the mean over repeats and ``<name>_std``, plus ``f1_pr`` and ``f1_dc``. Phrases are given as
    bool ``(N, 128, 57)`` or already bit-packed ``(N, 912)`` uint8 and stored bit-packed (8x less
    to gather across ranks); each repeat unpacks only the phrases it draws.
    """

    def __init__(
        self,
        n_networks: int = 10,
        max_samples: int = 10_000,
        k: int = 5,
        distinct_neighbours: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if n_networks < 1 or max_samples <= k:
            raise ValueError(f"need n_networks >= 1 and max_samples > k, got {n_networks}, {max_samples}, k={k}")
        self.n_networks, self.max_samples, self.k = n_networks, max_samples, k
        self.distinct_neighbours = distinct_neighbours

    def encode(self, samples: Tensor) -> Tensor:
        if samples.dtype == torch.uint8 and tuple(samples.shape[1:]) == (PACKED_BYTES,):
            return samples
        _check_phrases(samples)
        return pack_phrases(samples)

    def compute(self) -> dict[str, Tensor]:
        return random_cnn_prdc(
            self._collected("real"), self._collected("fake"), self.n_networks, self.max_samples, self.k,
            distinct_neighbours=self.distinct_neighbours,
        )


def packed_rows(rows, index: Tensor | None, device: torch.device | str) -> Tensor:
    """Rows ``index`` (all rows for None) of bit-packed phrases, as a uint8 tensor on ``device``.

    ``rows``: a uint8 ``(N, 912)`` tensor, or anything NumPy-indexable by row: an array, or a
    phrase cache's ``PackedShards``, which then reads only those rows from disk.
    """
    if isinstance(rows, Tensor):
        return (rows if index is None else rows[index.to(rows.device)]).to(device)
    return torch.from_numpy(np.asarray(rows[slice(None) if index is None else index.numpy()])).to(device)


def random_cnn_prdc(
    real, fake, n_networks: int = 10, max_samples: int = 10_000, k: int = 5, *,
    distinct_neighbours: bool = False, device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """P/R/D/C of bit-packed real and fake phrases on the embeddings of ``n_networks`` random CNNs.

    Repeat ``s`` (``s = 0 .. n_networks-1``) embeds with ``random_cnn_embedding(s)`` up to
    ``max_samples`` real and ``max_samples`` fake phrases, a subsample drawn with a generator
    seeded with ``s`` (real first); only the drawn rows are read (see :func:`packed_rows`) and
    unpacked, so memory follows ``max_samples``, not the set sizes. Returns, per P/R/D/C, the
    mean over repeats and ``<name>_std`` (population standard deviation, ddof=0), plus ``f1_pr``
    = F1(mean P, mean R) and ``f1_dc`` = F1(mean D, mean C). ``device``: where the phrases are
    embedded and compared (default: the real tensor's device, else the CPU).
    """
    if device is None:
        device = real.device if isinstance(real, Tensor) else torch.device("cpu")
    repeats = []
    for seed in range(n_networks):
        net = random_cnn_embedding(seed).to(device)
        generator = torch.Generator().manual_seed(seed)
        features = [
            embed(net, unpack_phrases(packed_rows(rows, _subsample_index(len(rows), max_samples, generator), device)))
            for rows in (real, fake)
        ]
        scores = prdc(*features, k, distinct_neighbours=distinct_neighbours)
        repeats.append(torch.stack([scores[key] for key in PRDC_KEYS]))
    repeats = torch.stack(repeats)
    mean, std = repeats.mean(dim=0), repeats.std(dim=0, correction=0)
    result = {}
    for i, key in enumerate(PRDC_KEYS):
        result[key], result[f"{key}_std"] = mean[i], std[i]
    result["f1_pr"] = f1_score(mean[0], mean[1])
    result["f1_dc"] = f1_score(mean[2], mean[3])
    return result


def _subsample_index(n: int, max_samples: int, generator: torch.Generator) -> Tensor | None:
    """``max_samples`` of ``n`` positions drawn without replacement, or None (all) when ``n <= max_samples``."""
    return None if n <= max_samples else torch.randperm(n, generator=generator)[:max_samples]
