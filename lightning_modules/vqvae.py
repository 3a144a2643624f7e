"""VQ-VAE over 8-bar bass+drum phrases: (B, 128 steps, 57 columns) -> 32 code indices -> phrase.

Encoder (57 -> 128 channels, 128 -> 32 steps, then a 16-channel projection), an EMA codebook of
512 entries of dimension 16 with restarts, and the mirrored decoder producing one logit per cell.
Loss = mean BCE-with-logits over cells + beta x commitment (mean over elements), so the scale does
not depend on the batch size. The model selected for generation is the one with the lowest
validation Hamming error per cell (``val/hamming``).
"""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.classification import BinaryHammingDistance

from lightning_modules.nets.codebook import EMACodebook, Quantized
from lightning_modules.nets.conv_stacks import EncoderTrunk, UpsamplingDecoder, conv_block

PHRASE_STEPS = 128
PHRASE_COLUMNS = 57


def adamw_with_cosine(module: pl.LightningModule, lr: float, min_lr: float, weight_decay: float) -> dict:
    """AdamW, learning rate annealed by a cosine from ``lr`` to ``min_lr`` over the trainer's max_epochs."""
    epochs = module.trainer.max_epochs
    if epochs is None or epochs < 1:
        raise ValueError(f"trainer.max_epochs must be a positive number for the cosine schedule, got {epochs}.")
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=min_lr)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}


def threshold(probabilities: Tensor) -> Tensor:
    """Binary phrase from cell probabilities: 1 where p >= 0.5."""
    return probabilities >= 0.5


def hamming_error() -> BinaryHammingDistance:
    """Fraction of cells where a thresholded reconstruction differs from its phrase.

    Built without torchmetrics' input validation: it would scan every cell of every batch (about
    15 million at the paper's batch size) and wait for the answer on the host at each step. The
    inputs are 0/1 by construction.
    """
    return BinaryHammingDistance(validate_args=False)


class VQVAE(pl.LightningModule):
    """Phrase autoencoder with a discrete bottleneck of ``code_steps`` = 32 indices into ``num_codes`` entries.

    Batches are float (or bool) tensors (B, 128, 57), time-major. Public inference API (use in
    eval mode): ``encode``, ``decode_indices``, ``reconstruct``.
    """

    def __init__(
        self,
        lr: float = 1e-3,
        min_lr: float = 5e-6,
        weight_decay: float = 0.01,
        beta: float = 0.25,
        channels: int = 128,
        num_codes: int = 512,
        code_dim: int = 16,
        decay: float = 0.99,
        eps: float = 1e-5,
        restart_threshold: float = 1.0,
        restart_seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.encoder = nn.Sequential(
            EncoderTrunk(PHRASE_COLUMNS, channels),
            nn.Conv1d(channels, code_dim, kernel_size=3, padding=1),
        )
        self.codebook = EMACodebook(num_codes, code_dim, decay, eps, restart_threshold, seed=restart_seed)
        self.decoder = nn.Sequential(conv_block(code_dim, channels), UpsamplingDecoder(channels, PHRASE_COLUMNS))
        self.val_hamming = hamming_error()
        self.test_hamming = hamming_error()
        # codebook restarts in the current training epoch, summed on the device
        self.register_buffer("epoch_restarts", torch.zeros((), dtype=torch.long), persistent=False)

    @property
    def num_codes(self) -> int:
        return self.codebook.num_codes

    def forward(self, x: Tensor) -> tuple[Tensor, Quantized]:
        """Logits (B, 128, 57) for phrases ``x`` (B, 128, 57), and the codebook pass (updates the
        codebook in training mode)."""
        quantized = self.codebook(self._encode_continuous(x))
        return self._decode(quantized.z_q), quantized

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Code indices (N, 32) for phrases ``x`` (N, 128, 57)."""
        return self.codebook.assign(self._encode_continuous(x))

    @torch.no_grad()
    def decode_indices(self, indices: Tensor) -> Tensor:
        """Cell probabilities (N, 128, 57) for code indices (N, 32)."""
        if indices.dim() != 2:
            raise ValueError(f"decode_indices expects (N, steps) indices, got shape {tuple(indices.shape)}.")
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.num_codes):
            raise ValueError(f"decode_indices: indices must lie in [0, {self.num_codes}).")
        return torch.sigmoid(self._decode(self.codebook.lookup(indices.long())))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Thresholded reconstruction, bool (N, 128, 57)."""
        return threshold(torch.sigmoid(self(x)[0]))

    def _encode_continuous(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[1:] != (PHRASE_STEPS, PHRASE_COLUMNS):
            raise ValueError(f"VQVAE expects phrases (N, {PHRASE_STEPS}, {PHRASE_COLUMNS}), got {tuple(x.shape)}.")
        return self.encoder(x.to(self.dtype).transpose(1, 2))

    def _decode(self, z: Tensor) -> Tensor:
        return self.decoder(z).transpose(1, 2)

    def _loss(self, x: Tensor) -> tuple[Tensor, Tensor, Quantized]:
        logits, quantized = self(x)
        target = x.to(logits.dtype)
        loss = F.binary_cross_entropy_with_logits(logits, target) + self.hparams.beta * quantized.commitment
        return loss, logits, quantized

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss, _, quantized = self._loss(batch)
        size = batch.shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, sync_dist=True, batch_size=size)
        self.log("train/commitment", quantized.commitment, on_step=True, on_epoch=True, sync_dist=True, batch_size=size)
        # Codebook statistics are summed over ranks already, so they are the same on every rank
        # and need no reduction of their own.
        self.log("train/codebook/perplexity", quantized.perplexity, on_step=True, on_epoch=True, batch_size=size)
        self.log("train/codebook/used", quantized.used.float(), on_step=True, on_epoch=True, batch_size=size)
        self.epoch_restarts += quantized.restarts
        return loss

    def on_train_epoch_start(self) -> None:
        self.epoch_restarts.zero_()

    def on_train_epoch_end(self) -> None:
        self.log("train/codebook/restarts", self.epoch_restarts.float(), sync_dist=True)  # a total, equal on all ranks

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_hamming)

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_hamming)

    def _evaluate(self, batch: Tensor, stage: str, hamming: BinaryHammingDistance) -> None:
        loss, logits, quantized = self._loss(batch)
        hamming.update(threshold(torch.sigmoid(logits)).long(), batch.long())
        size = batch.shape[0]
        self.log(f"{stage}/loss", loss, on_epoch=True, sync_dist=True, batch_size=size)
        self.log(f"{stage}/hamming", hamming, on_epoch=True, batch_size=size)
        self.log(f"{stage}/codebook/perplexity", quantized.perplexity, on_epoch=True, sync_dist=True, batch_size=size)

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        return adamw_with_cosine(self, hp.lr, hp.min_lr, hp.weight_decay)
