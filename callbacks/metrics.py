"""Metrics for generated loops: loop score, unique pitch, note density and precision/recall/density/coverage.

Phrases are ``(N, 128, 57)`` bool or float tensors: 128 steps (8 bars of 16 steps) by 57 columns
(9 drum classes, then 48 bass pitches). The functional forms compute one batch; the torchmetrics
classes accumulate over batches and ranks.

Distributed use: every class accepts an optional per-sample ``index`` (int64, ``-1`` = no index).
States are gathered across ranks with ``dist_reduce_fx="cat"``; ``compute()`` then keeps one entry
per index value (the first after a stable sort by index), so the duplicates a ``DistributedSampler``
adds to pad an uneven set are counted once. Pass the dataset position of each sample as its index;
samples without an index are always counted. Sorting by index also makes the gathered order, and so
every seeded subsample drawn from it, the same for any number of ranks.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from datamodules.correlation import c_midi
from datamodules.pianoroll import BARS_PER_PHRASE, N_COLUMNS, PHRASE_STEPS, STEPS_PER_BAR, unpack_phrases
from lightning_modules.nets.conv_stacks import conv_block

EMBEDDING_DIM = 128
PRDC_KEYS = ("precision", "recall", "density", "coverage")
# Distances below this fraction of the largest feature norm count as exact duplicates (distance 0).
DUPLICATE_TOLERANCE = 1e-5
_DISTANCE_BLOCK_ELEMENTS = 1 << 22


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


def _row_chunks(n_rows: int, n_cols: int, chunk_size: int | None) -> Iterator[slice]:
    size = chunk_size or max(1, _DISTANCE_BLOCK_ELEMENTS // max(n_cols, 1))
    for start in range(0, n_rows, size):
        yield slice(start, min(start + size, n_rows))


def _partial_squared_distances(x: Tensor, y: Tensor, chunk_size: int | None) -> Iterator[tuple[slice, Tensor]]:
    """Row chunks of ``|y_j|^2 - 2 x_i.y_j`` (float64): squared distances less the row constant ``|x_i|^2``.

    Comparisons against per-row thresholds fold ``|x_i|^2`` into the threshold, which saves a pass
    over every block; only one block of ``chunk_size`` rows exists at a time.
    """
    y_sq = y.square().sum(dim=1).unsqueeze(0)
    for rows in _row_chunks(len(x), len(y), chunk_size):
        yield rows, torch.addmm(y_sq, x[rows], y.T, alpha=-2.0)


def _squared_radii(x: Tensor, k: int, floor: float, distinct: bool, chunk_size: int | None) -> Tensor:
    """Squared distance of every row of ``x`` to its k-th nearest neighbour in ``x``, self excluded.

    ``distinct=False`` is the reference: the (k+1)-th smallest distance including the point itself,
    so exact duplicates count as neighbours. ``distinct=True`` skips duplicates (squared distance
    at most ``floor``) and takes the k-th nearest *different* point, or the farthest one if fewer
    than k exist.
    """
    x_sq = x.square().sum(dim=1)
    radii = torch.empty_like(x_sq)
    for rows, partial in _partial_squared_distances(x, x, chunk_size):
        row_sq = x_sq[rows]
        if distinct:
            farthest = partial.amax(dim=1)
            partial.masked_fill_(partial <= (floor - row_sq).unsqueeze(1), float("inf"))
            kth = torch.minimum(partial.topk(k, dim=1, largest=False).values[:, -1], farthest)
        else:
            kth = partial.topk(k + 1, dim=1, largest=False).values[:, -1]
        radii[rows] = (kth + row_sq).clamp_min(0)
    return radii


def _strict_bound(squared_radii: Tensor, floor: float) -> Tensor:
    """Bounds ``b`` with ``d^2 < b`` exactly when the reference finds ``d < r`` in float32.

    The reference rounds squared distances to float32 and takes a float32 square root; both are
    monotone, so ``sqrt32(round32(d^2)) < r32`` holds exactly for ``round32(d^2) < v`` with ``v`` the
    smallest float32 whose root reaches ``r32``, i.e. for ``d^2`` below the midpoint between ``v``
    and its float32 predecessor. Radii at or below the duplicate ``floor`` contain nothing (-inf).
    """
    radius = squared_radii.to(torch.float32).sqrt()
    candidate = radius.double().square().to(torch.float32)
    below, above = torch.tensor(-float("inf")), torch.tensor(float("inf"))
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
    ``<``. Squared distances are computed in float64 and compared against bounds that reproduce the
    reference's float32 rounding (:func:`_strict_bound`), so even near ties agree. Runs on the
    inputs' device in blocks of ``chunk_size`` rows (default: about 4M distances a block), so memory
    grows linearly with the set sizes.

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
    centre = real.mean(dim=0, dtype=torch.float64)
    real = real.to(torch.float64) - centre
    fake = fake.to(device=real.device, dtype=torch.float64) - centre
    real_sq = real.square().sum(dim=1)
    floor = DUPLICATE_TOLERANCE**2 * max(real_sq.max().item(), fake.square().sum(dim=1).max().item())

    real_bound = _strict_bound(_squared_radii(real, k, floor, distinct_neighbours, chunk_size), floor)
    fake_bound = _strict_bound(_squared_radii(fake, k, floor, distinct_neighbours, chunk_size), floor)

    balls_per_fake = torch.zeros(len(fake), dtype=torch.int64, device=real.device)
    recalled = torch.zeros((), dtype=torch.int64, device=real.device)
    covered = torch.zeros((), dtype=torch.int64, device=real.device)
    ones = torch.ones(1, len(real), dtype=torch.float32, device=real.device)
    for rows, partial in _partial_squared_distances(real, fake, chunk_size):
        inside_real_ball = partial < (real_bound[rows] - real_sq[rows]).unsqueeze(1)
        # Column counts as a float32 vector-matrix product: exact (counts < 2^24), and much faster
        # than summing booleans over rows.
        balls_per_fake += (ones[:, rows] @ inside_real_ball.to(torch.float32)).squeeze(0).to(torch.int64)
        covered += inside_real_ball.any(dim=1).sum()
        inside_fake_ball = partial.sub_(fake_bound) < -real_sq[rows].unsqueeze(1)
        recalled += inside_fake_ball.any(dim=1).sum()

    return {
        "precision": (balls_per_fake > 0).float().mean(),
        "recall": recalled.float() / len(real),
        "density": balls_per_fake.sum().float() / (k * len(fake)),
        "coverage": covered.float() / len(real),
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


def _pack(phrases: Tensor) -> Tensor:
    """Bool phrases -> ``(N, 912)`` uint8 in ``datamodules.pianoroll``'s layout, on their device."""
    bits = phrases.bool().reshape(len(phrases), -1, 8).to(torch.uint8)
    weights = 2 ** torch.arange(7, -1, -1, dtype=torch.uint8, device=bits.device)
    return (bits * weights).sum(dim=2, dtype=torch.uint8)


# -------------------------------------------------------------------------------------- metrics


class _PerPhraseMean(Metric):
    """Mean over phrases of a per-phrase score, each index counted once."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    def score(self, phrases: Tensor) -> Tensor:
        """Per-phrase values ``(N,)``."""
        raise NotImplementedError

    def update(self, phrases: Tensor, index: Tensor | None = None) -> None:
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

    def encode(self, samples: Tensor) -> Tensor:
        """How one side's samples are stored."""
        raise NotImplementedError

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

    Repeat ``s`` (``s = 0 .. n_networks-1``) embeds with ``random_cnn_embedding(s)`` up to
    ``max_samples`` real and ``max_samples`` fake phrases, a subsample drawn with a generator seeded
    with ``s``. ``compute()`` returns, per P/R/D/C, the mean over repeats and ``<name>_std`` (the
    population standard deviation, ddof=0), plus ``f1_pr`` = F1(mean P, mean R) and ``f1_dc`` =
    F1(mean D, mean C). Phrases are stored bit-packed (8x less to gather across ranks).
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
        _check_phrases(samples)
        return _pack(samples)

    def _subsample(self, phrases: Tensor, generator: torch.Generator) -> Tensor:
        if len(phrases) <= self.max_samples:
            return phrases
        return phrases[torch.randperm(len(phrases), generator=generator)[: self.max_samples].to(phrases.device)]

    def compute(self) -> dict[str, Tensor]:
        real, fake = unpack_phrases(self._collected("real")), unpack_phrases(self._collected("fake"))
        repeats = []
        for seed in range(self.n_networks):
            net = random_cnn_embedding(seed).to(real.device)
            generator = torch.Generator().manual_seed(seed)
            scores = prdc(
                embed(net, self._subsample(real, generator)),
                embed(net, self._subsample(fake, generator)),
                self.k,
                distinct_neighbours=self.distinct_neighbours,
            )
            repeats.append(torch.stack([scores[key] for key in PRDC_KEYS]))
        repeats = torch.stack(repeats)
        mean, std = repeats.mean(dim=0), repeats.std(dim=0, correction=0)
        result = {}
        for i, key in enumerate(PRDC_KEYS):
            result[key], result[f"{key}_std"] = mean[i], std[i]
        result["f1_pr"] = f1_score(mean[0], mean[1])
        result["f1_dc"] = f1_score(mean[2], mean[3])
        return result
