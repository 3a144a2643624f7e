"""Deep One-Class SVDD loop detector trained on the 28 bar-to-bar correlations of audio loops.

One ``fit`` runs both phases of Deep SVDD (LOOPS.md section 3):

1. epochs ``[0, pretrain_epochs)``: encoder + decoder trained as an autoencoder (MSE);
2. at the start of epoch ``pretrain_epochs`` the centre ``c`` is set to the mean encoder output over
   the whole training set and fixed; epochs ``[pretrain_epochs, pretrain_epochs + svdd_epochs)``
   train the encoder to pull every training vector towards ``c``.

Each phase has its own AdamW optimiser and per-epoch cosine schedule, so the module uses manual
optimisation and steps only the active phase's pair. The loop score of a vector is the mean squared
distance of its latent point to ``c`` (lower = more loop-like); the decision threshold is
``exp(mean + threshold_sigmas * std)`` of the log training scores, refreshed after the training
batches of every SVDD epoch so the checkpoint written at that epoch carries the threshold of its
own weights.

Scoring runs in float32 on the device of the weights (read from the weights, so a detector moved
inside another module scores where it lives), whatever the autocast context. Validation and test
metrics are per-vector means accumulated over the epoch and reduced across ranks once at its end,
so unevenly sharded held-out sets are counted exactly.
"""
from __future__ import annotations

import math

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.trainer.states import TrainerFn
from torch import nn
from torch.optim import AdamW
from torch.optim.lr_scheduler import CosineAnnealingLR
from torchmetrics import MeanMetric

from datamodules.correlation import c_midi, c_midi_packed
from framework.devices import float32_math, module_device
from lightning_modules.nets.svdd import SVDDDecoder, SVDDEncoder

SIMILARITIES = ("hamming", "iou")
# Per-vector values averaged over a held-out set: reconstruction error, distance to the centre,
# loop score, and whether the score falls below the threshold.
HELD_OUT_METRICS = ("ae_loss", "svdd_loss", "score", "loop_rate")


class LoopDetector(pl.LightningModule):
    """Deep SVDD over C_WAV vectors; scores C_MIDI vectors of symbolic phrases.

    Args:
        pretrain_epochs: autoencoder epochs before the centre is fixed.
        svdd_epochs: epochs of SVDD training after it (``trainer.max_epochs`` is at most the sum).
        lr, min_lr, weight_decay: AdamW learning rate, cosine floor and decoupled weight decay,
            the same for both phases.
        center_eps: centre coordinates closer than this to 0 are moved to +-eps, so no latent
            coordinate can satisfy the objective by shrinking its weights to zero.
        threshold_sigmas: the threshold sits this many standard deviations above the mean log
            training score (1 in the paper).
        similarity: bar-pair similarity used by :meth:`score_phrases` for C_MIDI
            (``hamming``: the paper's per-phrase max-normalised XOR count; ``iou``: intersection
            over union of active cells, which keeps absolute scale).
        score_batch_size: vectors per forward pass when scoring whole sets (centre, threshold).
    """

    def __init__(
        self,
        pretrain_epochs: int = 1000,
        svdd_epochs: int = 1000,
        lr: float = 1e-3,
        min_lr: float = 5e-6,
        weight_decay: float = 0.01,
        center_eps: float = 0.1,
        threshold_sigmas: float = 1.0,
        similarity: str = "hamming",
        score_batch_size: int = 65536,
    ):
        super().__init__()
        if similarity not in SIMILARITIES:
            raise ValueError(f"model.similarity={similarity!r} is not one of {SIMILARITIES}.")
        if pretrain_epochs < 0 or svdd_epochs < 1:
            raise ValueError(
                f"model.pretrain_epochs={pretrain_epochs} must be >= 0 and model.svdd_epochs={svdd_epochs} >= 1."
            )
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.encoder = SVDDEncoder()
        self.decoder = SVDDDecoder()
        self.register_buffer("center", torch.zeros(self.encoder[-1].out_features))
        self.register_buffer("score_threshold", torch.tensor(float("nan")))
        self.training_scores: torch.Tensor | None = None
        self.held_out = nn.ModuleDict({
            stage: nn.ModuleDict({name: MeanMetric(nan_strategy="disable") for name in HELD_OUT_METRICS})
            for stage in ("val", "test")
        })
        self._held_out_metrics: tuple[str, ...] = ()

    # ----------------------------------------------------------------------------------- scoring
    @property
    def threshold(self) -> float:
        """Scores below this count as loops (NaN until the first SVDD epoch has trained)."""
        return float(self.score_threshold)

    @torch.no_grad()
    def loop_score(self, correlations: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Mean over latent dimensions of ``(f(x) - c)^2`` for a ``(N, 28)`` batch.

        The batch may live on any device; it is scored in float32 where the detector's weights
        are, and the ``(N,)`` scores are returned on the batch's device.
        """
        correlations = torch.as_tensor(correlations)
        with float32_math():
            latent = self.encoder(correlations.to(module_device(self), torch.float32))
            scores = ((latent - self.center) ** 2).mean(dim=1)
        return scores.to(correlations.device)

    @torch.no_grad()
    def score_phrases(self, phrases: torch.Tensor, similarity: str | None = None) -> torch.Tensor:
        """Loop scores ``(N,)`` of pianoroll phrases ``(N, 128, 57)`` (bool or 0/1) via their C_MIDI.

        ``similarity`` defaults to the one the detector was configured with.
        """
        return self.loop_score(c_midi(phrases, similarity=similarity or self.hparams.similarity))

    @torch.no_grad()
    def score_packed(self, packed: torch.Tensor, similarity: str | None = None) -> torch.Tensor:
        """Loop scores ``(N,)`` of bit-packed phrases uint8 ``(N, 912)``, straight from the packed bits."""
        return self.loop_score(c_midi_packed(packed, similarity=similarity or self.hparams.similarity))

    def score_all(self, correlations: torch.Tensor) -> torch.Tensor:
        """:meth:`loop_score` of a large ``(N, 28)`` set, in chunks of ``score_batch_size``."""
        chunks = torch.split(torch.as_tensor(correlations), self.hparams.score_batch_size)
        return torch.cat([self.loop_score(chunk) for chunk in chunks])

    # --------------------------------------------------------------------------------- training
    @property
    def in_pretraining(self) -> bool:
        return self.current_epoch < self.hparams.pretrain_epochs

    def configure_optimizers(self):
        def phase(params, epochs):
            optimizer = AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
            return optimizer, CosineAnnealingLR(optimizer, T_max=max(epochs, 1), eta_min=self.hparams.min_lr)

        ae_optimizer, ae_schedule = phase(
            list(self.encoder.parameters()) + list(self.decoder.parameters()), self.hparams.pretrain_epochs
        )
        svdd_optimizer, svdd_schedule = phase(self.encoder.parameters(), self.hparams.svdd_epochs)
        return [ae_optimizer, svdd_optimizer], [ae_schedule, svdd_schedule]

    def on_fit_start(self) -> None:
        total = self.hparams.pretrain_epochs + self.hparams.svdd_epochs
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs > total:
            raise ValueError(
                f"trainer.max_epochs={max_epochs} exceeds model.pretrain_epochs + model.svdd_epochs = {total}; "
                "set trainer.max_epochs to their sum."
            )
        if not callable(getattr(self.trainer.datamodule, "train_vectors", None)):
            raise TypeError(
                "LoopDetector needs a datamodule with train_vectors() (the whole training set) to fix the "
                "SVDD centre and the threshold, e.g. datamodules.audio_loops.AudioLoopDataModule."
            )

    def _train_vectors(self) -> torch.Tensor:
        return torch.as_tensor(self.trainer.datamodule.train_vectors(), dtype=torch.float32)

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == self.hparams.pretrain_epochs:
            self.fix_center(self._train_vectors())

    @torch.no_grad()
    def fix_center(self, vectors: torch.Tensor) -> None:
        """Set ``c`` to the mean encoder output over ``vectors``, nudging near-zero coordinates to +-eps.

        Every rank passes the whole training set, so every rank holds the same centre with no
        collective communication.
        """
        if len(vectors) == 0:
            raise ValueError("Cannot fix the SVDD centre: the training set is empty.")
        total = torch.zeros_like(self.center)
        for chunk in torch.split(vectors, self.hparams.score_batch_size):
            total += self.encoder(chunk.to(self.center.device)).sum(dim=0)
        center = total / len(vectors)
        eps = self.hparams.center_eps
        near_zero = center.abs() < eps
        center[near_zero & (center < 0)] = -eps
        center[near_zero & (center >= 0)] = eps
        self.center.copy_(center)

    def _losses(self, vectors: torch.Tensor, svdd: bool) -> dict[str, torch.Tensor]:
        """Reconstruction loss, plus the SVDD loss (mean squared distance to ``c``) when ``svdd``."""
        latent = self.encoder(vectors)
        losses = {"ae_loss": F.mse_loss(self.decoder(latent), vectors)}
        if svdd:
            losses["svdd_loss"] = ((latent - self.center) ** 2).sum(dim=1).mean()
        return losses

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        losses = self._losses(batch, svdd=not self.in_pretraining)
        if self.in_pretraining:
            optimizer, loss = self.optimizers()[0], losses["ae_loss"]
        else:
            # The reconstruction term enters with weight 0: it changes no gradient, but keeps the
            # decoder in the graph so DistributedDataParallel sees every parameter used.
            optimizer, loss = self.optimizers()[1], losses["svdd_loss"] + 0.0 * losses["ae_loss"]
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        for name, value in losses.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def on_train_epoch_end(self) -> None:
        phase = 0 if self.in_pretraining else 1
        self.lr_schedulers()[phase].step()
        if phase == 1:
            self.fit_threshold(self._train_vectors())
            self.log("train/threshold", self.score_threshold, sync_dist=False)

    @torch.no_grad()
    def fit_threshold(self, vectors: torch.Tensor) -> float:
        """Set the threshold to ``exp(mean + threshold_sigmas * std)`` of the log scores of ``vectors``.

        ``std`` is the population standard deviation (a single training vector gives std 0).
        Scores are clamped to the smallest positive float before the log so an exact hit on the
        centre cannot produce ``-inf``. The scores are kept in :attr:`training_scores` for plotting.
        """
        scores = self.score_all(vectors)
        log_scores = scores.clamp_min(torch.finfo(scores.dtype).tiny).log()
        threshold = torch.exp(log_scores.mean() + self.hparams.threshold_sigmas * log_scores.std(correction=0))
        self.score_threshold.copy_(threshold)
        self.training_scores = scores.cpu()
        return self.threshold

    # ------------------------------------------------------------------------ validation, test
    def _start_held_out(self, svdd: bool) -> None:
        """Choose the epoch's metrics once, from host-side state the same on every rank (one
        device read of the threshold per epoch rather than one per batch)."""
        names = ["ae_loss"]
        if svdd:
            names += ["svdd_loss", "score"] + ([] if math.isnan(self.threshold) else ["loop_rate"])
        self._held_out_metrics = tuple(names)

    def on_validation_epoch_start(self) -> None:
        # Validation (and the checkpoint written at its end) runs before on_train_epoch_end.
        fitting = self.trainer.state.fn == TrainerFn.FITTING
        if fitting and not self.trainer.sanity_checking and not self.in_pretraining:
            self.fit_threshold(self._train_vectors())
        self._start_held_out(svdd=not self.in_pretraining)

    def on_test_epoch_start(self) -> None:
        self._start_held_out(svdd=True)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._update_held_out("val", batch)

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._update_held_out("test", batch)

    def on_validation_epoch_end(self) -> None:
        self._log_held_out("val")

    def on_test_epoch_end(self) -> None:
        self._log_held_out("test")

    @torch.no_grad()
    def _update_held_out(self, stage: str, vectors: torch.Tensor) -> None:
        """Per-vector reconstruction error, and in the SVDD phase distance, score and loop flag,
        in float32 whatever the autocast context."""
        vectors = vectors.float()
        with float32_math():
            latent = self.encoder(vectors)
            values = {"ae_loss": (self.decoder(latent) - vectors).square().mean(dim=1)}
            if "svdd_loss" in self._held_out_metrics:
                squared = (latent - self.center).square()
                values["svdd_loss"], values["score"] = squared.sum(dim=1), squared.mean(dim=1)
        if "loop_rate" in self._held_out_metrics:
            values["loop_rate"] = (values["score"] < self.score_threshold).float()
        for name, value in values.items():
            self.held_out[stage][name].update(value)

    def _log_held_out(self, stage: str) -> None:
        """Log the epoch's means from every rank, even one whose shard of the held-out set was
        empty: Lightning computes each metric (one reduction across ranks) and resets it."""
        for name in self._held_out_metrics:
            self.log(f"{stage}/{name}", self.held_out[stage][name])
