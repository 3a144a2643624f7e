"""Music Transformer baseline: a decoder-only transformer over the 128 multi-hot steps of a phrase.

Training is teacher forcing: ``forward(x)`` on phrases (B, 128, 57) gives at every position the
logits of the next step, and the loss is the mean BCE-with-logits of positions 0..126 against
steps 1..127. Sampling starts from a first step drawn from the training phrases' first steps (kept
with the checkpoint, so the model samples on its own) and draws every later cell from a Bernoulli
with the predicted probability (``sigmoid(logit / temperature)``), all sequences of a batch
advancing together through a key/value cache.
"""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.nn import functional as F
from torchmetrics import MeanMetric

from lightning_modules.nets.music_transformer import MusicTransformerDecoder
from lightning_modules.nets.relative_attention import KeyValueCache
from lightning_modules.vqvae import PHRASE_COLUMNS, PHRASE_STEPS, adamw_with_cosine


class MusicTransformer(pl.LightningModule):
    """Autoregressive phrase model; ``sample(n, generator)`` draws bool phrases (n, 128, 57).

    Args:
        lr, min_lr, weight_decay: AdamW, cosine-annealed from ``lr`` to ``min_lr`` over the run.
        hidden, layers, heads, feed_forward: transformer width, depth, heads, feed-forward width.
        max_distance: relative distances embedded per head (at least the 128 steps of a phrase).
        dropout: on attention weights and residual branches.
        sample_temperature: default temperature of :meth:`sample` (1 = the predicted probabilities;
            0 = no randomness: a cell is on where its probability is at least 0.5).
        sample_batch_size: sequences generated together by :meth:`sample`.
    """

    def __init__(
        self,
        lr: float = 1e-3,
        min_lr: float = 5e-6,
        weight_decay: float = 0.01,
        hidden: int = 128,
        layers: int = 4,
        heads: int = 2,
        feed_forward: int = 512,
        max_distance: int = 128,
        dropout: float = 0.1,
        sample_temperature: float = 1.0,
        sample_batch_size: int = 1000,
    ):
        super().__init__()
        if max_distance < PHRASE_STEPS:
            raise ValueError(f"model.max_distance={max_distance} must cover the {PHRASE_STEPS} steps of a phrase")
        if sample_temperature < 0:
            raise ValueError(f"model.sample_temperature={sample_temperature} must be >= 0")
        self.save_hyperparameters()
        self.net = MusicTransformerDecoder(PHRASE_COLUMNS, hidden, layers, heads, feed_forward, max_distance, dropout)
        # Distinct first steps of the training phrases (0/1 bytes) and how often each occurs; resized on load.
        self.register_buffer("first_steps", torch.zeros(0, PHRASE_COLUMNS, dtype=torch.uint8))
        self.register_buffer("first_step_counts", torch.zeros(0))
        # No NaN scan per update: it reads the value back to the host at every validation step.
        self.val_loss = MeanMetric(nan_strategy="disable")
        self.test_loss = MeanMetric(nan_strategy="disable")

    # ----------------------------------------------------------------------------------- network
    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, 128, 57) of the step after each step of phrases ``x`` (B, 128, 57); causal."""
        if x.dim() != 3 or x.shape[1:] != (PHRASE_STEPS, PHRASE_COLUMNS):
            raise ValueError(f"MusicTransformer expects phrases (N, {PHRASE_STEPS}, {PHRASE_COLUMNS}), got {tuple(x.shape)}")
        return self.net(x.to(self.dtype))

    def _next_step_loss(self, x: Tensor, reduction: str = "mean") -> Tensor:
        logits = self(x)[:, :-1]
        return F.binary_cross_entropy_with_logits(logits, x[:, 1:].to(logits.dtype), reduction=reduction)

    # ---------------------------------------------------------------------------------- training
    def setup(self, stage: str) -> None:
        """Take the first steps of the training phrases from the DataModule (``train_first_steps()``)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if len(self.first_steps) == 0 and callable(getattr(datamodule, "train_first_steps", None)):
            self.set_first_steps(datamodule.train_first_steps())

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss = self._next_step_loss(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch.shape[0])
        return loss

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_loss)

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_loss)

    def _evaluate(self, batch: Tensor, stage: str, loss: MeanMetric) -> None:
        """Mean next-step BCE per cell, summed and counted across ranks."""
        loss.update(self._next_step_loss(batch, reduction="none"))
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True)

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        return adamw_with_cosine(self, hp.lr, hp.min_lr, hp.weight_decay)

    # ------------------------------------------------------------------------------ first steps
    @torch.no_grad()
    def set_first_steps(self, steps: Tensor) -> None:
        """Keep the distinct rows of ``steps`` (N, 57) and their counts as the first-step distribution."""
        steps = torch.as_tensor(steps).bool()
        if steps.dim() != 2 or steps.shape[1] != PHRASE_COLUMNS or len(steps) == 0:
            raise ValueError(f"first steps must be a non-empty (N, {PHRASE_COLUMNS}) tensor, got {tuple(steps.shape)}")
        distinct, counts = torch.unique(steps, dim=0, return_counts=True)
        self.first_steps = distinct.to(self.first_steps.device, torch.uint8)
        self.first_step_counts = counts.to(self.first_step_counts.device, torch.float32)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resize the first-step buffers to the checkpoint's before its state dict is loaded."""
        state = checkpoint["state_dict"]
        self.first_steps = torch.zeros_like(state["first_steps"], device=self.first_steps.device)
        self.first_step_counts = torch.zeros_like(state["first_step_counts"], device=self.first_step_counts.device)

    # ---------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(
        self, n: int, generator: torch.Generator | None = None, temperature: float | None = None,
        batch_size: int | None = None,
    ) -> Tensor:
        """``n`` phrases, bool (n, 128, 57) on the module's device, drawn with ``generator`` (on that device).

        Use in eval mode (dropout off). ``temperature`` and ``batch_size`` default to the
        ``sample_*`` hyperparameters.
        """
        if len(self.first_steps) == 0:
            raise ValueError("MusicTransformer has no first steps to start from: train it with a DataModule that "
                             "offers train_first_steps(), or call set_first_steps()")
        temperature = self.hparams.sample_temperature if temperature is None else float(temperature)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        batch_size = batch_size or self.hparams.sample_batch_size
        # The buffers' device, not self.device: a module moved as part of a parent keeps a stale self.device.
        device = self.first_steps.device
        parts = [torch.zeros(0, PHRASE_STEPS, PHRASE_COLUMNS, dtype=torch.bool, device=device)]
        if n:
            first = torch.multinomial(self.first_step_counts, n, replacement=True, generator=generator)
            parts += [self._generate(self.first_steps[chunk], generator, temperature) for chunk in first.split(batch_size)]
        return torch.cat(parts)

    def _generate(self, first: Tensor, generator: torch.Generator | None, temperature: float) -> Tensor:
        """Phrases continuing the first steps ``first`` (B, 57), one cached step per position."""
        device = first.device
        phrases = torch.zeros(len(first), PHRASE_STEPS, PHRASE_COLUMNS, dtype=torch.bool, device=device)
        phrases[:, 0] = first.bool()
        cache = KeyValueCache()
        for position in range(1, PHRASE_STEPS):
            logits = self.net.step(phrases[:, position - 1].to(self.dtype), cache)
            if temperature == 0:
                phrases[:, position] = logits >= 0
            else:
                uniforms = torch.rand(logits.shape, generator=generator, device=device)
                phrases[:, position] = uniforms < torch.sigmoid(logits / temperature)
        return phrases
