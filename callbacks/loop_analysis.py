"""How well the loop detector tells loops apart: score histograms and the paper's Fig. 3 check.

- :class:`TrainingScoreHistogram` plots the detector's training scores against its threshold when
  fitting ends.
- :class:`LoopAnalysis` runs in the detector's test stage on a labelled phrase set: the labelled
  loops form one group and ``n_random_groups`` groups are drawn at random from all phrases (as in
  the paper, they may contain loops). Per group it reports mean (std) score, and for each random
  group a two-sided Welch t-test against the loop group. The paper used a paired test, but the
  groups are drawn independently, so no pairing between their members exists; Welch's unpaired
  test (no equal-variance assumption) is the honest choice. It also reports the AUROC of the score
  between labelled loops and labelled non-loops, and compares the two C_MIDI similarities: the
  AUROC of the same detector fed with each variant, and a detector-free AUROC of each variant's
  mean bar-to-bar similarity (how much the representation alone separates the labels).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.loggers import WandbLogger  # noqa: E402
from scipy import stats  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from datamodules.correlation import c_midi  # noqa: E402
from datamodules.phrase_scoring import LabelledPhrases, load_labelled_phrases  # noqa: E402
from datamodules.pianoroll import unpack_phrases  # noqa: E402
from framework.io import atomic_path  # noqa: E402

SIMILARITIES = ("hamming", "iou")


def save_score_histogram(scores: np.ndarray, threshold: float, path: str | Path, title: str) -> Path:
    """Histogram of loop scores on a log axis with the threshold marked, written as a PNG."""
    scores = np.asarray(scores, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(7, 4))
    positive = scores[scores > 0]
    if len(positive):
        low, high = positive.min(), positive.max()
        if not math.isnan(threshold):
            low, high = min(low, threshold), max(high, threshold)
        bins = np.geomspace(low, high * (1 + 1e-9), 60) if high > low else 10
        ax.hist(positive, bins=bins, color="tab:blue", alpha=0.8, label=f"{len(scores)} phrases")
        ax.set_xscale("log")
    if not math.isnan(threshold):
        kept = float((scores < threshold).mean()) if len(scores) else 0.0
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:.3g} ({kept:.1%} below)")
    ax.set_xlabel("loop score (lower = more loop-like)")
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.legend(loc="upper right")
    return _save_figure(fig, path)


def _save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def log_image(trainer: pl.Trainer, key: str, path: Path) -> None:
    """Send a PNG to every W&B logger of the trainer (other loggers have no image type)."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)])


class TrainingScoreHistogram(pl.Callback):
    """When fitting ends, plot the detector's training scores with its threshold.

    Writes ``<default_root_dir>/<folder>/train_scores.png`` and logs it to W&B on rank zero.
    """

    def __init__(self, folder: str = "loop_detector"):
        self.folder = folder

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        scores = getattr(pl_module, "training_scores", None)
        if scores is None or not trainer.is_global_zero:
            return
        path = save_score_histogram(
            scores.numpy(), pl_module.threshold, Path(trainer.default_root_dir) / self.folder / "train_scores.png",
            "Loop scores of the training loops",
        )
        log_image(trainer, "train/score_histogram", path)


def auroc(is_loop: np.ndarray, loopiness: np.ndarray) -> float | None:
    """AUROC of ``loopiness`` (higher = more loop-like) against binary labels; None without both classes."""
    if len(np.unique(is_loop)) < 2:
        return None
    return float(roc_auc_score(is_loop, loopiness))


def draw_groups(
    n_phrases: int, loop_index: np.ndarray, n_random_groups: int, group_size: int, seed: int
) -> dict[str, np.ndarray]:
    """Phrase indices of the loop group (``loop_index``, subsampled to ``group_size`` when larger)
    and of ``n_random_groups`` groups drawn without replacement from all phrases, independently."""
    rng = np.random.default_rng(seed)
    if len(loop_index) > group_size:
        loop_index = np.sort(rng.choice(loop_index, size=group_size, replace=False))
    groups = {"loops": np.asarray(loop_index, dtype=np.int64)}
    for g in range(n_random_groups):
        groups[f"random_{g}"] = rng.choice(n_phrases, size=min(group_size, n_phrases), replace=False)
    return groups


def group_statistics(scores: np.ndarray, groups: dict[str, np.ndarray]) -> dict[str, Any]:
    """Mean and sample std of the score per group; Welch t-test of the ``loops`` group vs each other."""
    report: dict[str, Any] = {}
    for name, index in groups.items():
        values = scores[index]
        report[name] = {"n": int(len(values)), "mean": _float(values.mean()), "std": _float(values.std(ddof=1))}
        if name != "loops":
            test = stats.ttest_ind(scores[groups["loops"]], values, equal_var=False)
            report[name]["t_vs_loops"] = _float(test.statistic)
            report[name]["p_vs_loops"] = _float(test.pvalue)
    return report


def _float(value) -> float | None:
    """A JSON-safe float: NaN (e.g. the std of one value) becomes None."""
    value = float(value)
    return None if math.isnan(value) else value


def save_group_boxplot(scores: np.ndarray, groups: dict[str, np.ndarray], threshold: float, path: Path) -> Path:
    """Box plot of the score per group (log axis), the threshold as a line."""
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(groups)
    ax.boxplot([np.clip(scores[groups[n]], 1e-12, None) for n in names], showfliers=True)
    ax.set_xticks(range(1, len(names) + 1), names)
    ax.set_yscale("log")
    if not math.isnan(threshold):
        ax.axhline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:.3g}")
        ax.legend(loc="upper left")
    ax.set_ylabel("loop score")
    ax.set_title("Loop scores: labelled loops vs random phrases")
    return _save_figure(fig, path)


class LoopAnalysis(pl.Callback):
    """The Fig. 3 check on a labelled phrase set, at the end of the detector's test stage.

    Args:
        phrases: phrase cache folder of the labelled MIDI (built from ``midi`` when missing).
        midi: the MIDI folder the cache is made from; ``labels`` maps its relative paths to
            ``{"loop": [start bars], "non_loop": [start bars]}``.
        labels: the labels JSON file.
        demo: the demo data root; a missing ``midi`` under it is generated.
        n_random_groups, group_size, seed: the random groups compared with the loop group.
        batch_size: phrases scored per forward pass.
        folder: output folder under the trainer's ``default_root_dir`` (``report.json``,
            ``groups.png``, ``scores.png``).

    Every rank computes the same analysis from the whole labelled set and logs the same values
    (no collective communication); rank zero writes the files.
    """

    def __init__(
        self,
        phrases: str,
        midi: str,
        labels: str,
        demo: str | None = None,
        n_random_groups: int = 4,
        group_size: int = 100,
        seed: int = 0,
        batch_size: int = 4096,
        folder: str = "loop_analysis",
    ):
        self.phrases, self.midi, self.labels, self.demo = phrases, midi, labels, demo
        self.n_random_groups, self.group_size, self.seed = n_random_groups, group_size, seed
        self.batch_size, self.folder = batch_size, folder
        self.report: dict[str, Any] | None = None

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        data = load_labelled_phrases(self.phrases, self.midi, self.labels, self.demo)
        if len(data.label) == 0:
            raise ValueError(f"LoopAnalysis: the phrase cache {self.phrases} holds no phrases.")
        correlations = {sim: self._correlations(data, sim, pl_module.device) for sim in SIMILARITIES}
        scores = {sim: pl_module.loop_score(c).cpu().numpy() for sim, c in correlations.items()}
        own = pl_module.hparams.similarity
        self.report = self._report(data, scores, correlations, own, pl_module.threshold)
        metrics = {
            "test/auroc": self.report["auroc"],
            "test/loop_group_mean": self.report["groups"]["loops"]["mean"],
            "test/random_group_mean": float(np.mean([g["mean"] for n, g in self.report["groups"].items() if n != "loops"])),
            "test/max_p_value": max((g.get("p_vs_loops") or 0.0) for g in self.report["groups"].values()),
            **{f"test/auroc_{sim}": self.report["similarity_comparison"][sim]["detector_auroc"] for sim in SIMILARITIES},
        }
        for key, value in metrics.items():
            if value is not None:
                pl_module.log(key, float(value), sync_dist=False)
        if trainer.is_global_zero:
            self._write(trainer, data, scores[own], pl_module.threshold)

    def _correlations(self, data: LabelledPhrases, similarity: str, device: torch.device) -> torch.Tensor:
        packed = torch.from_numpy(np.ascontiguousarray(data.packed))
        return torch.cat([
            c_midi(unpack_phrases(chunk.to(device)), similarity=similarity)
            for chunk in torch.split(packed, self.batch_size)
        ])

    def _groups(self, data: LabelledPhrases) -> dict[str, np.ndarray]:
        return draw_groups(
            len(data.label), np.flatnonzero(data.label == 1), self.n_random_groups, self.group_size, self.seed
        )

    def _report(self, data, scores, correlations, own: str, threshold: float) -> dict[str, Any]:
        groups = self._groups(data)
        labelled = data.label >= 0
        is_loop = data.label[labelled] == 1
        comparison = {
            sim: {
                "detector_auroc": auroc(is_loop, -scores[sim][labelled]),
                "mean_similarity_auroc": auroc(is_loop, correlations[sim].mean(dim=1).cpu().numpy()[labelled]),
            }
            for sim in SIMILARITIES
        }
        return {
            "phrases": self.phrases,
            "n_phrases": int(len(data.label)),
            "n_labelled_loops": int(is_loop.sum()),
            "n_labelled_non_loops": int((~is_loop).sum()),
            "labels_not_in_cache": data.missing,
            "similarity": own,
            "threshold": _float(threshold),
            "auroc": comparison[own]["detector_auroc"],
            "loop_rate": {
                name: _float((scores[own][data.label == code] < threshold).mean()) if (data.label == code).any() else None
                for name, code in (("loops", 1), ("non_loops", 0))
            },
            "groups": group_statistics(scores[own], groups),
            "t_test": "two-sided Welch (unequal variances), loop group vs each random group",
            "similarity_comparison": comparison,
        }

    def _write(self, trainer: pl.Trainer, data: LabelledPhrases, scores: np.ndarray, threshold: float) -> None:
        out = Path(trainer.default_root_dir) / self.folder
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "report.json") as tmp:
            tmp.write_text(json.dumps(self.report, indent=2))
        groups = {**self._groups(data), "non_loops": np.flatnonzero(data.label == 0)}
        boxplot = save_group_boxplot(scores, {k: v for k, v in groups.items() if len(v)}, threshold, out / "groups.png")
        histogram = save_score_histogram(scores, threshold, out / "scores.png", "Loop scores of the labelled phrase set")
        log_image(trainer, "test/group_scores", boxplot)
        log_image(trainer, "test/score_histogram", histogram)
