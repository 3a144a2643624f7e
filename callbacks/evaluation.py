"""Evaluation of loop generators against their training set: the paper's Tables 2-3 and Fig. 5.

A :class:`LoopSource` is a named generator: an :class:`~lightning_modules.prior.LSTMPrior` with
sampling settings, a CNN-VAE behind :class:`LatentSampler`, or any other phrase generator (Music
Transformer, MuseGAN) behind :class:`PhraseSampler`. All are sampled through
:func:`~lightning_modules.prior.generate_loops`, the one rejection loop of the project, so a
rejection threshold means the same for every generator: batches are drawn until ``n`` phrases
score below it or ``max_rounds`` batches have been drawn.

:class:`Evaluation` turns a source (and an optional threshold) into one row of metrics: LS (mean
loop score through C_MIDI and the detector), UP, ND, and P/R/D/C as mean and standard deviation
over random CNN embeddings with F1(P,R) and F1(D,C) of the means
(:func:`~callbacks.metrics.random_cnn_prdc`). The ``write_*`` functions lay rows out as the
paper's tables (Markdown and CSV) and the Fig. 5 figure.

Memory: phrases stay bit-packed (912 bytes each) except in chunks of ``batch_size`` and in the
subsets a metric draws; the training set is read from its cache only where drawn, so a row
costs the same whatever the size of the training set.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from callbacks.metrics import PRDC_KEYS, note_density, packed_rows, random_cnn_prdc, unique_pitch
from datamodules.pianoroll import PACKED_BYTES, PHRASE_STEPS, unpack_phrases
from framework.devices import module_device
from framework.seeding import sampling_generator
from lightning_modules.prior import GeneratedLoops, generate_loops
from lightning_modules.vqvae import threshold as binarise

TRAINING_SET = "Training set"
# Loop-score thresholds of the paper's Fig. 5, loosest first; None = no rejection.
PAPER_THRESHOLDS = (None, 1.0, 0.1, 0.01, 0.001)

ROW_FIELDS = (
    "model", "threshold", "requested", "accepted", "shortfall", "generated", "acceptance_rate",
    "ls", "up", "nd",
    *(name for key in PRDC_KEYS for name in (key, f"{key}_std")),
    "f1_pr", "f1_dc",
)
TABLE3_FIELDS = ("model", "f1_pr", "f1_dc")


class LatentSampler:
    """A CNN-VAE in the sampler protocol of :func:`generate_loops`: its "codes" are latents z ~ N(0, I).

    ``sample_codes`` draws the latents with the caller's generator (on the VAE's device) and
    ``decode`` turns them into binary phrases, so ``generate_loops`` can reject CNN-VAE samples
    exactly as it rejects the prior's.
    """

    def __init__(self, vae: nn.Module):
        self.vae = vae.eval().requires_grad_(False)
        self.hparams = SimpleNamespace(seq_len=vae.hparams.latent_dim)

    @torch.no_grad()
    def sample_codes(self, n: int, generator: torch.Generator, batch_size: int | None = None) -> Tensor:
        return torch.randn(n, self.hparams.seq_len, generator=generator, device=module_device(self.vae))

    @torch.no_grad()
    def decode(self, latents: Tensor, batch_size: int | None = None) -> Tensor:
        parts, device = latents.split(batch_size or max(len(latents), 1)), module_device(self.vae)
        return torch.cat([binarise(torch.sigmoid(self.vae.decode(part.to(device), prior_statistics=True))) for part in parts])


class PhraseSampler:
    """A generator with ``sample(n, generator) -> bool (n, 128, 57)`` in the sampler protocol of
    :func:`generate_loops`: its "codes" are the sampled phrases themselves and ``decode`` returns them."""

    def __init__(self, module: nn.Module):
        self.module = module.eval().requires_grad_(False)
        self.hparams = SimpleNamespace(seq_len=PHRASE_STEPS)

    def sample_codes(self, n: int, generator: torch.Generator, batch_size: int | None = None) -> Tensor:
        return self.module.sample(n, generator)

    def decode(self, phrases: Tensor, batch_size: int | None = None) -> Tensor:
        return phrases


@dataclass
class LoopSource:
    """A named generator: ``sampler`` follows :func:`generate_loops`'s protocol; ``settings`` are its
    sampling keyword arguments (mode, temperature, top_k, top_p for a prior; none for the others)."""

    name: str
    sampler: object
    settings: dict = field(default_factory=dict)


class Evaluation:
    """Rows of metrics for loop sources compared with a training set.

    Args:
        training: the training set, bit-packed ``(N, 912)`` uint8 (``datamodules.pianoroll``
            layout): a phrase cache's ``PackedShards`` (rows are read when drawn) or an array;
            the real side of P/R/D/C and the source of the training-set row.
        n: phrases per row: generated (kept) per source, drawn from ``training`` for its own row.
        seed: every source and threshold samples with ``sampling_generator(seed, 0, device)``, so
            the rejection runs of one source see the same stream of candidates.
        device: where sampling, scoring and the metrics run.
        detector: a loop detector (``score_phrases``); without one LS is NaN and no threshold works.
        batch_size, max_rounds: candidates per batch and most batches per rejection run.
        n_networks, max_samples, k: P/R/D/C over ``n_networks`` random CNN embeddings with up to
            ``max_samples`` phrases per side and the k-th nearest neighbour as radius.
    """

    def __init__(
        self,
        training: np.ndarray,
        n: int,
        seed: int = 0,
        device: torch.device | str = "cpu",
        detector: nn.Module | None = None,
        batch_size: int = 1000,
        max_rounds: int = 100,
        n_networks: int = 10,
        max_samples: int = 10_000,
        k: int = 5,
        progress: bool = True,
    ):
        if training.dtype != np.uint8 or training.ndim != 2 or training.shape[1] != PACKED_BYTES:
            raise ValueError(f"training must be packed phrases (N, {PACKED_BYTES}) uint8, got {training.dtype} {training.shape}")
        if len(training) <= k:
            raise ValueError(f"the training set has {len(training)} phrases; P/R/D/C with k={k} needs more than {k}")
        if n < 1 or max_samples <= k:
            raise ValueError(f"need n >= 1 and max_samples > k, got n={n}, max_samples={max_samples}, k={k}")
        self.training = training
        self.n, self.seed, self.device = int(n), int(seed), torch.device(device)
        self.detector = detector
        self.batch_size, self.max_rounds = int(batch_size), int(max_rounds)
        self.n_networks, self.max_samples, self.k = int(n_networks), int(max_samples), int(k)
        self.progress = progress
        self._rows: dict[tuple[str, float | None], dict] = {}

    # --------------------------------------------------------------------------------- sampling
    def sample(self, source: LoopSource, threshold: float | None = None) -> GeneratedLoops:
        """``n`` phrases of ``source`` (fewer when rejection at ``threshold`` runs out of rounds)."""
        if threshold is not None and self.detector is None:
            raise ValueError(f"{source.name}: a rejection threshold needs a loop detector")
        return generate_loops(
            source.sampler, self.n, sampling_generator(self.seed, 0, self.device), source.settings,
            self.batch_size, self.detector, threshold, self.max_rounds, progress=self.progress,
        )

    def training_packed(self) -> Tensor:
        """A seeded random subset of ``n`` training phrases (all of them when ``n`` is larger), bit-packed."""
        order = torch.randperm(len(self.training), generator=torch.Generator().manual_seed(self.seed))
        return packed_rows(self.training, order[: self.n], "cpu")

    def _score(self, packed: Tensor) -> Tensor | None:
        if self.detector is None:
            return None
        chunks = packed.split(self.batch_size)
        bar = tqdm(chunks, desc="scoring training phrases", unit="batch", disable=not self.progress)
        return torch.cat([self.detector.score_phrases(unpack_phrases(chunk.to(self.device))).cpu() for chunk in bar])

    # ------------------------------------------------------------------------------------ rows
    def training_row(self) -> dict:
        """LS, UP and ND of ``n`` training phrases; P/R/D/C of the training set against itself are not computed."""
        packed = self.training_packed()
        row = _empty_row(TRAINING_SET, None, self.n)
        row.update(accepted=len(packed), generated=len(packed), acceptance_rate=1.0, shortfall=self.n - len(packed))
        row.update(_style_metrics(packed, self._score(packed), self.batch_size))
        return row

    def row(self, source: LoopSource, threshold: float | None = None) -> dict:
        """All metrics of ``source`` sampled at ``threshold`` (cached: the same call returns the same row)."""
        key = (source.name, threshold)
        if key not in self._rows:
            loops = self.sample(source, threshold)
            row = _empty_row(source.name, threshold, self.n)
            row.update(
                accepted=len(loops.packed), shortfall=self.n - len(loops.packed),
                generated=loops.generated, acceptance_rate=loops.acceptance_rate,
            )
            row.update(_style_metrics(loops.packed, loops.scores, self.batch_size))
            row.update(self.similarity_metrics(loops.packed))
            self._rows[key] = row
        return self._rows[key]

    def similarity_metrics(self, packed: Tensor) -> dict:
        """P/R/D/C (mean and std over the random CNNs) and the two F1s of bit-packed phrases against the training set.

        Empty when the phrases are too few for the k-nearest-neighbour radii (the row keeps NaN).
        """
        if len(packed) <= self.k:
            return {}
        metrics = random_cnn_prdc(self.training, packed, self.n_networks, self.max_samples, self.k, device=self.device)
        return {name: value.item() for name, value in metrics.items()}

    def rejection_rows(self, sources: Sequence[LoopSource], thresholds: Sequence[float | None]) -> list[dict]:
        """One row per source and threshold (Fig. 5), with a progress bar over the sweep."""
        points = [(source, threshold) for source in sources for threshold in thresholds]
        bar = tqdm(points, desc="rejection sweep", unit="setting", disable=not self.progress)
        return [self.row(source, threshold) for source, threshold in bar]


def _empty_row(model: str, threshold: float | None, requested: int) -> dict:
    row = dict.fromkeys(ROW_FIELDS, math.nan)
    row.update(model=model, threshold=threshold, requested=requested)
    return row


def _style_metrics(packed: Tensor, scores: Tensor | None, batch_size: int) -> dict:
    """LS (NaN without scores), UP and ND averaged over bit-packed phrases, unpacked ``batch_size`` at a time
    (empty when there are none)."""
    if not len(packed):
        return {}
    up, nd = [], []
    for chunk in packed.split(batch_size):
        phrases = unpack_phrases(chunk)
        up.append(unique_pitch(phrases))
        nd.append(note_density(phrases))
    return {
        "ls": scores.float().mean().item() if scores is not None else math.nan,
        "up": torch.cat(up).mean().item(),
        "nd": torch.cat(nd).mean().item(),
    }


# ---------------------------------------------------------------------------------------- tables


def scientific(value: float) -> str:
    """``6.806e-3`` style, as the paper prints loop scores."""
    mantissa, exponent = f"{value:.3e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _cell(value: float, fmt: str = ".3f") -> str:
    return "-" if value is None or math.isnan(value) else format(value, fmt)


def _mean_std(row: dict, key: str) -> str:
    mean, std = row[key], row[f"{key}_std"]
    return "-" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}"


def threshold_label(threshold: float | None) -> str:
    return "none" if threshold is None else f"{threshold:g}"


def markdown_table(header: Sequence[str], body: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def table2_markdown(rows: Sequence[dict], caption: str) -> str:
    """The paper's Table 2: LS (scientific), UP, ND, and P/R/D/C as mean ± std."""
    body = [
        [row["model"], "-" if math.isnan(row["ls"]) else scientific(row["ls"]), _cell(row["up"]), _cell(row["nd"]),
         *(_mean_std(row, key) for key in PRDC_KEYS)]
        for row in rows
    ]
    return markdown_table(["Model", "LS", "UP", "ND", "P", "R", "D", "C"], body) + f"\n{caption}\n"


def table3_markdown(rows: Sequence[dict], caption: str) -> str:
    """The paper's Table 3: F1 of the mean P and R, and of the mean D and C."""
    body = [[row["model"], _cell(row["f1_pr"]), _cell(row["f1_dc"])] for row in rows]
    return markdown_table(["Model", "F1 (P & R)", "F1 (D & C)"], body) + f"\n{caption}\n"


def rejection_markdown(rows: Sequence[dict], thresholds: Sequence[float | None], caption: str) -> str:
    """The Fig. 5 sweep as a table; rows that kept fewer than requested say so in the Accepted column."""
    body = []
    for row in rows:
        accepted = f"{row['accepted']}"
        if row["shortfall"] > 0:
            accepted += f" of {row['requested']} (short by {row['shortfall']})"
        body.append([
            row["model"], str(thresholds.index(row["threshold"]) + 1), threshold_label(row["threshold"]), accepted,
            f"{row['acceptance_rate']:.2%}", *(_cell(row[key]) for key in PRDC_KEYS),
            _cell(row["up"]), _cell(row["nd"]), "-" if math.isnan(row["ls"]) else scientific(row["ls"]),
        ])
    header = ["Model", "#", "Threshold", "Accepted", "Acceptance", "P", "R", "D", "C", "UP", "ND", "LS"]
    return markdown_table(header, body) + f"\n{caption}\n"


def write_csv(rows: Sequence[dict], fields: Sequence[str], path: Path) -> None:
    """``rows`` restricted to ``fields``; floats at full precision, a missing threshold as ``none``."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(fields)
        for row in rows:
            writer.writerow([threshold_label(row[f]) if f == "threshold" else row[f] for f in fields])


def read_csv(path: str | Path) -> list[dict]:
    """Rows written by :func:`write_csv`, numbers parsed back (``nan`` included)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key, value in row.items():
            if key not in ("model", "threshold"):
                row[key] = float(value)
    return rows


# ---------------------------------------------------------------------------------------- figure

_PANELS = (("recall", "precision", "P & R"), ("coverage", "density", "D & C"), ("nd", "up", "UP & ND"))


def plot_rejection(rows: Sequence[dict], thresholds: Sequence[float | None], path: str | Path,
                   training: dict | None = None) -> Path:
    """Fig. 5: P vs R, D vs C and UP vs ND, one line per model through numbered threshold markers.

    Marker ``i`` is the i-th threshold of ``thresholds`` (stricter as ``i`` grows); ``training``
    (a row with UP and ND) adds the training set as a reference star to the third panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4))
    models = list(dict.fromkeys(row["model"] for row in rows))
    for colour, model in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * len(models), models):
        points = sorted((thresholds.index(r["threshold"]), r) for r in rows if r["model"] == model)
        for axis, (x_key, y_key, _) in zip(axes, _PANELS):
            xy = [(i, r[x_key], r[y_key]) for i, r in points if not (math.isnan(r[x_key]) or math.isnan(r[y_key]))]
            if not xy:
                continue
            axis.plot([x for _, x, _ in xy], [y for _, _, y in xy], "-o", color=colour, label=model, alpha=0.8)
            for i, x, y in xy:
                axis.annotate(str(i + 1), (x, y), textcoords="offset points", xytext=(4, 4), color=colour, fontsize=9)
    if training is not None and not math.isnan(training["up"]):
        axes[2].plot(training["nd"], training["up"], "k*", markersize=12, label=TRAINING_SET)
    for axis, (x_key, y_key, title) in zip(axes, _PANELS):
        axis.set(title=title, xlabel=x_key.upper() if x_key == "nd" else x_key.capitalize(),
                 ylabel=y_key.upper() if y_key == "up" else y_key.capitalize())
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    legend = ", ".join(f"{i + 1}: {threshold_label(t)}" for i, t in enumerate(thresholds))
    fig.suptitle(f"Rejection sampling: loop-score thresholds ({legend})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
