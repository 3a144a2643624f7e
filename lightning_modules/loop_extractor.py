"""Loop extraction: score every phrase of a phrase cache with a trained detector, keep the loops.

Run as ``python train.py experiment=extract_loops detector=CKPT phrases=DIR out=DIR``. Each rank
reads and scores only its shard of batches, one batch in memory at a time, on its device (C_MIDI
straight from the packed bits, one call per batch); at the end the (phrase index, score) pairs of
all ranks are gathered and de-duplicated by index, so the result does not depend on the number of
devices. Memory grows by 12 bytes a phrase (indices and scores), not by the 912 of its bits. Rank
zero then writes into ``out``:

- the phrase cache of the phrases scoring below the detector's threshold (the loops), copied from
  the input's shard files in chunks; its ``report.json`` also holds the extraction report: counts,
  kept fraction, threshold, score quantiles;
- ``scores.npy``: the float32 score of every input phrase, in input order;
- ``scores.png``: the score histogram with the threshold marked.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from callbacks.loop_analysis import log_image, save_score_histogram
from framework.io import atomic_path
from lightning_modules.loop_detector import LoopDetector

QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)


class LoopExtractor(pl.LightningModule):
    """Predict-only module wrapping a trained :class:`LoopDetector`.

    Args:
        detector: path of the detector checkpoint (required).
        out: output folder (the loop phrase cache plus scores, report and histogram).
        similarity: C_MIDI similarity; ``null`` uses the one the detector was trained with.
    """

    def __init__(self, detector: str | None, out: str, similarity: str | None = None):
        super().__init__()
        if detector is None:
            raise ValueError("detector=null: give the loop detector checkpoint, e.g. detector=runs/loop_detector/<run>/checkpoints/last.ckpt")
        if not Path(detector).is_file():
            raise FileNotFoundError(f"detector={detector}: no such checkpoint file.")
        self.detector = LoopDetector.load_from_checkpoint(detector, map_location="cpu")
        self.detector.eval().requires_grad_(False)
        if np.isnan(self.detector.threshold):
            raise ValueError(f"detector={detector} has no threshold: its training never reached the SVDD phase.")
        self.out = Path(out)
        self.similarity = similarity or self.detector.hparams.similarity
        self._indices: list[torch.Tensor] = []
        self._scores: list[torch.Tensor] = []
        self.scores: np.ndarray | None = None

    def on_predict_epoch_start(self) -> None:
        self._indices, self._scores = [], []

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        indices, packed = batch
        self._indices.append(indices)
        self._scores.append(self.detector.score_packed(packed, similarity=self.similarity))

    def on_predict_epoch_end(self) -> None:
        n_phrases = len(self.trainer.datamodule.phrases.packed)
        self.scores = self._gather_scores(n_phrases)
        if self.trainer.is_global_zero:
            self._write_outputs(self.scores)
        self.trainer.strategy.barrier("loop_extraction_written")

    def _gather_scores(self, n_phrases: int) -> np.ndarray:
        """Scores of all ranks' phrases in cache order; padding duplicates collapse onto their index.

        Ranks may hold different numbers of phrases, so each pads to the largest count (index -1)
        before the all-gather.
        """
        indices = torch.cat(self._indices).to(self.device)
        scores = torch.cat(self._scores).to(self.device, torch.float32)
        largest = int(self.all_gather(torch.tensor(len(indices), device=self.device)).max())
        padding = largest - len(indices)
        indices = torch.cat([indices, indices.new_full((padding,), -1)])
        scores = torch.cat([scores, scores.new_zeros(padding)])
        indices = self.all_gather(indices).reshape(-1)
        scores = self.all_gather(scores).reshape(-1)
        real = indices >= 0
        ordered = torch.full((n_phrases,), float("nan"), device=self.device)
        ordered[indices[real]] = scores[real]
        if torch.isnan(ordered).any():
            raise RuntimeError(f"{int(torch.isnan(ordered).sum())} of {n_phrases} phrases were never scored.")
        return ordered.cpu().numpy()

    def _write_outputs(self, scores: np.ndarray) -> None:
        threshold = self.detector.threshold
        report = extraction_report(scores, threshold, self.similarity)
        self.trainer.datamodule.phrases.subset(np.flatnonzero(scores < threshold)).save(self.out, report)
        with atomic_path(self.out / "scores.npy") as tmp, open(tmp, "wb") as file:
            np.save(file, scores.astype(np.float32))
        histogram = save_score_histogram(scores, threshold, self.out / "scores.png", "Loop scores of all phrases")
        for logger in self.trainer.loggers:
            logger.log_metrics({"predict/n_loops": report["n_loops"], "predict/kept_fraction": report["kept_fraction"]})
        log_image(self.trainer, "predict/score_histogram", histogram)


def extraction_report(scores: np.ndarray, threshold: float, similarity: str) -> dict[str, Any]:
    """Counts, kept fraction and score quantiles (zeros and nulls for an empty input)."""
    kept = int((scores < threshold).sum())
    return {
        "n_phrases": int(len(scores)),
        "n_loops": kept,
        "kept_fraction": kept / len(scores) if len(scores) else 0.0,
        "threshold": float(threshold),
        "similarity": similarity,
        "score_quantiles": {
            str(q): (float(np.quantile(scores, q)) if len(scores) else None) for q in QUANTILES
        },
    }
