"""CNN-VAE baseline: the VQ-VAE's convolutional stacks around a continuous Gaussian latent.

Encoder trunk (B, 57, 128) -> (B, 128, 32), flattened to 4096 -> Linear to the mean and (softplus)
standard deviation of a 512-dimensional diagonal Gaussian; decoder Linear 512 -> 128 x 32 -> the
VQ-VAE's upsampling path -> logits. Both loss terms are per cell: mean BCE over the 128 x 57 cells
+ beta x KL / (128 x 57), so beta = 1 is the ELBO divided by the number of cells; beta rises
linearly from 0 to 1 over ``kl_warmup_epochs`` (fractional epochs, updated every step).

The decoder's BatchNorm layers learn their running statistics from posterior samples z ~ q(z|x).
Latents drawn from the prior N(0, I) reach the decoder with other statistics (the aggregate
posterior never matches the prior exactly), and normalised with the posterior's statistics they
decode to thin phrases: fewer and fainter cells, most of them below the 0.5 threshold. Decoding
prior samples (:meth:`CNNVAE.sample`, ``decode(z, prior_statistics=True)``) therefore normalises
with statistics measured on decoded prior latents: ``prior_calibration_samples`` latents from a
fixed seed, decoded with batch statistics, re-measured whenever the weights have changed.
"""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F
from torchmetrics.classification import BinaryHammingDistance

from framework.devices import module_device
from lightning_modules.nets.conv_stacks import EncoderTrunk, UpsamplingDecoder
from lightning_modules.vqvae import PHRASE_COLUMNS, PHRASE_STEPS, adamw_with_cosine, hamming_error, threshold

# Smallest standard deviation: keeps log(sigma) in the KL finite when softplus underflows.
MIN_SIGMA = 1e-5
# Seed of the prior latents that calibrate the decoder's BatchNorm statistics for sampling.
CALIBRATION_SEED = 0


def kl_weight(epochs_done: float, warmup_epochs: float) -> float:
    """beta after ``epochs_done`` (fractional) epochs: linear from 0 to 1 over ``warmup_epochs``, then 1."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, max(0.0, epochs_done / warmup_epochs))


class CNNVAE(pl.LightningModule):
    """Phrase VAE with a 512-dimensional Gaussian latent; ``sample(n, generator)`` draws phrases from the prior."""

    def __init__(
        self,
        lr: float = 1e-3,
        min_lr: float = 5e-6,
        weight_decay: float = 0.01,
        channels: int = 128,
        latent_dim: int = 512,
        kl_warmup_epochs: float = 50.0,
        prior_calibration_samples: int = 1024,
    ):
        super().__init__()
        if prior_calibration_samples < 2:
            raise ValueError(f"model.prior_calibration_samples={prior_calibration_samples} must be at least 2")
        self.save_hyperparameters()
        self.code_steps = PHRASE_STEPS // 4
        flat = channels * self.code_steps
        self.encoder = EncoderTrunk(PHRASE_COLUMNS, channels)
        self.to_posterior = nn.Linear(flat, 2 * latent_dim)
        self.from_latent = nn.Linear(latent_dim, flat)
        self.decoder = UpsamplingDecoder(channels, PHRASE_COLUMNS)
        self.val_hamming = hamming_error()
        self.test_hamming = hamming_error()
        self._prior_statistics: tuple[tuple, dict[str, Tensor]] | None = None

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation (B, latent_dim) of q(z | x) for phrases (B, 128, 57)."""
        if x.dim() != 3 or x.shape[1:] != (PHRASE_STEPS, PHRASE_COLUMNS):
            raise ValueError(f"CNNVAE expects phrases (N, {PHRASE_STEPS}, {PHRASE_COLUMNS}), got {tuple(x.shape)}.")
        features = self.encoder(x.to(self.dtype).transpose(1, 2)).flatten(1)
        mu, sigma = self.to_posterior(features).chunk(2, dim=1)
        return mu, F.softplus(sigma) + MIN_SIGMA

    def decode(self, z: Tensor, prior_statistics: bool = False) -> Tensor:
        """Logits (B, 128, 57) for latents (B, latent_dim), taken in the weights' precision.

        In eval mode, ``prior_statistics=True`` normalises with the BatchNorm statistics of decoded
        prior samples (for latents drawn from N(0, I)); otherwise with the running statistics
        learnt in training (for latents from the posterior).
        """
        z = z.to(self.from_latent.weight.dtype)
        features = self.from_latent(z).view(z.shape[0], self.hparams.channels, self.code_steps)
        if prior_statistics and not self.training:
            return functional_call(self.decoder, self.prior_statistics(), (features,)).transpose(1, 2)
        return self.decoder(features).transpose(1, 2)

    def prior_statistics(self) -> dict[str, Tensor]:
        """The decoder's BatchNorm running means and variances measured on decoded prior latents.

        ``prior_calibration_samples`` latents from a fixed seed are decoded in one batch with
        batch statistics (each layer normalised by the statistics of its own input); the input
        statistics of every BatchNorm layer are kept, keyed as the decoder's buffers. Cached until a
        parameter changes (an optimiser step, a load) or the model moves.
        """
        parameters = list(self.parameters())
        key = (parameters[0].device, parameters[0].dtype, *(p._version for p in parameters))
        if self._prior_statistics is None or self._prior_statistics[0] != key:
            self._prior_statistics = key, self._measure_prior_statistics()
        return self._prior_statistics[1]

    @torch.no_grad()
    def _measure_prior_statistics(self) -> dict[str, Tensor]:
        weight = self.from_latent.weight
        # Drawn on the CPU in float32, so every device and precision calibrates with the same latents.
        generator = torch.Generator().manual_seed(CALIBRATION_SEED)
        z = torch.randn(self.hparams.prior_calibration_samples, self.hparams.latent_dim, generator=generator)
        z = z.to(weight.device, weight.dtype)
        features = self.from_latent(z).view(len(z), self.hparams.channels, self.code_steps)
        measured: dict[str, Tensor] = {}

        def normalise_by_batch(name: str):
            def hook(module: nn.Module, inputs: tuple[Tensor], output: Tensor) -> Tensor:
                x = inputs[0]
                measured[f"{name}.running_mean"] = x.mean(dim=(0, 2))
                # biased, as BatchNorm normalises a batch: eval mode then reproduces the calibration pass
                measured[f"{name}.running_var"] = x.var(dim=(0, 2), correction=0)
                return F.batch_norm(x, None, None, module.weight, module.bias, True, 0.0, module.eps)
            return hook

        # Eval mode, each layer's output replaced by its input normalised with batch statistics: no
        # running statistics change, and a SyncBatchNorm (trainer.sync_batchnorm=true) never waits
        # for the other ranks, which need not be sampling at the same time.
        norms = [(name, m) for name, m in self.decoder.named_modules() if isinstance(m, (nn.BatchNorm1d, nn.SyncBatchNorm))]
        handles = [module.register_forward_hook(normalise_by_batch(name)) for name, module in norms]
        was_training = self.decoder.training
        try:
            self.decoder.eval()(features)
        finally:
            self.decoder.train(was_training)
            for handle in handles:
                handle.remove()
        return measured

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Logits from a reparameterised posterior sample, and the posterior's mean and std."""
        mu, sigma = self.posterior(x)
        z = mu + sigma * torch.randn_like(mu)
        return self.decode(z), mu, sigma

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` phrases, bool (n, 128, 57), decoded from z ~ N(0, I) drawn with ``generator``
        (which must live on the module's device)."""
        z = torch.randn(n, self.hparams.latent_dim, generator=generator, device=module_device(self))
        return threshold(torch.sigmoid(self.decode(z, prior_statistics=True)))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Thresholded reconstruction from the posterior mean, bool (N, 128, 57)."""
        return threshold(torch.sigmoid(self.decode(self.posterior(x)[0])))

    def _losses(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean BCE per cell, KL per cell (batch mean) and the logits."""
        logits, mu, sigma = self(x)
        bce = F.binary_cross_entropy_with_logits(logits, x.to(logits.dtype))
        kl = 0.5 * (mu.pow(2) + sigma.pow(2) - 1 - 2 * sigma.log()).sum(1).mean()
        return bce, kl / (PHRASE_STEPS * PHRASE_COLUMNS), logits

    def kl_weight_at(self, batch_idx: int) -> float:
        """beta for training batch ``batch_idx`` of the current epoch."""
        batches = self.trainer.num_training_batches
        fraction = batch_idx / batches if 0 < batches < float("inf") else 0.0
        return kl_weight(self.current_epoch + fraction, self.hparams.kl_warmup_epochs)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        bce, kl, _ = self._losses(batch)
        beta = self.kl_weight_at(batch_idx)
        loss = bce + beta * kl
        size = batch.shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=size)
        self.log("train/bce", bce, on_step=True, on_epoch=True, batch_size=size)
        self.log("train/kl", kl, on_step=True, on_epoch=True, batch_size=size)
        self.log("train/beta", beta, on_step=True, on_epoch=False, batch_size=size)
        return loss

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_hamming)

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_hamming)

    def _evaluate(self, batch: Tensor, stage: str, hamming: BinaryHammingDistance) -> None:
        """ELBO terms at beta = 1 (comparable across epochs) and the Hamming error of the posterior-mean reconstruction."""
        bce, kl, _ = self._losses(batch)
        hamming.update(self.reconstruct(batch).long(), batch.long())
        size = batch.shape[0]
        self.log(f"{stage}/loss", bce + kl, on_epoch=True, sync_dist=True, batch_size=size)
        self.log(f"{stage}/bce", bce, on_epoch=True, sync_dist=True, batch_size=size)
        self.log(f"{stage}/kl", kl, on_epoch=True, sync_dist=True, batch_size=size)
        self.log(f"{stage}/hamming", hamming, on_epoch=True, batch_size=size)

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        return adamw_with_cosine(self, hp.lr, hp.min_lr, hp.weight_decay)
