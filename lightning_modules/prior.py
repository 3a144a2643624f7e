"""LSTM prior over VQ-VAE code sequences: training by teacher forcing, batched sampling, decoding.

A loop is a sequence of S = 32 codebook indices. The prior predicts index t from indices 0..t-1;
the first index is drawn from the empirical distribution of first indices in the training codes,
kept as a buffer so a checkpoint can sample on its own. Sampled sequences are decoded into
pianoroll phrases by the VQ-VAE that produced the codes, loaded lazily from ``vqvae_ckpt``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from tqdm import tqdm

from datamodules.pianoroll import PACKED_BYTES, pack_phrases, unpack_phrases
from framework.devices import module_device
from lightning_modules.sampling import SAMPLING_MODES, SamplingSettings, filter_logits, invert_cdf, sample_from_logits
from lightning_modules.vqvae import VQVAE, adamw_with_cosine, threshold

__all__ = ["LSTMPrior", "GeneratedLoops", "generate_loops", "filter_logits", "SAMPLING_MODES"]


# oneDNN's CPU LSTM repacks the weights on every call; a single step pays that off only when it
# advances many sequences (measured crossover between 16 and 64), so smaller batches use ATen's kernel.
ONEDNN_MIN_BATCH = 32


def _cpu_lstm_kernel_for(batch: int):
    """Context choosing the CPU LSTM kernel for ``batch`` sequences.

    Under CPU autocast (``bf16-mixed``) ATen's kernel runs, in float32: oneDNN has no bfloat16 LSTM
    on CPUs without bfloat16 instructions (most x86 ones) and fails to build one there.
    """
    backend = torch.backends.mkldnn
    return backend.flags(
        enabled=backend.enabled and batch >= ONEDNN_MIN_BATCH and not torch.is_autocast_enabled("cpu"),
        deterministic=backend.deterministic, allow_tf32=None, fp32_precision=None,
    )


class LSTMPrior(pl.LightningModule):
    """Embedding(K, embed_dim) -> LSTM(embed_dim, hidden, layers) -> Linear(hidden, K).

    Args:
        vqvae_ckpt: checkpoint of the VQ-VAE whose codes the prior models; when None it is taken from
            the DataModule's ``vqvae_ckpt`` at fit time (and saved with the hyperparameters).
        num_codes: codebook size K; None builds the network at fit time for the DataModule's ``num_codes``.
        seq_len: indices per loop S.
        embed_dim, hidden, layers: network size (paper: 128, 512, 4).
        lr, min_lr, weight_decay: AdamW, cosine-annealed from ``lr`` to ``min_lr`` over the run.
        sample_mode, sample_temperature, sample_top_k, sample_top_p: defaults of :meth:`sample`
            (see :mod:`lightning_modules.sampling` for the modes).
        sample_batch_size: sequences generated and decoded together by :meth:`sample`.
        first_index_distribution: probabilities (or counts) of the first index, shape (K,); when
            None it is taken from the DataModule's ``first_index_distribution`` at fit time.
    """

    def __init__(
        self,
        vqvae_ckpt: str | None = None,
        num_codes: int | None = 512,
        seq_len: int = 32,
        embed_dim: int = 128,
        hidden: int = 512,
        layers: int = 4,
        lr: float = 1e-3,
        min_lr: float = 5e-6,
        weight_decay: float = 0.01,
        sample_mode: str = "top_k",
        sample_temperature: float = 1.0,
        sample_top_k: int = 30,
        sample_top_p: float = 0.08,
        sample_batch_size: int = 1000,
        first_index_distribution: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["first_index_distribution"])
        SamplingSettings.from_mode(sample_mode, sample_temperature, sample_top_k, sample_top_p)
        # No NaN check: it would read every batch's values back to the host.
        self.val_loss = MeanMetric(nan_strategy="disable")
        self.val_acc = MeanMetric(nan_strategy="disable")
        self._vqvae: nn.Module | None = None
        if num_codes is not None:
            self._build(num_codes)
        if first_index_distribution is not None:
            self.set_first_index_distribution(first_index_distribution)

    def _build(self, num_codes: int) -> None:
        hp = self.hparams
        hp.num_codes = int(num_codes)
        self.embedding = nn.Embedding(hp.num_codes, hp.embed_dim)
        self.lstm = nn.LSTM(hp.embed_dim, hp.hidden, num_layers=hp.layers, batch_first=True)
        self.head = nn.Linear(hp.hidden, hp.num_codes)
        self.register_buffer("first_index_distribution", torch.zeros(hp.num_codes))

    # ----------------------------------------------------------------------------------- network
    def forward(self, codes: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Next-index logits (B, L, K) for codes (B, L), and the LSTM state after the last position."""
        with _cpu_lstm_kernel_for(codes.shape[0]):
            output, state = self.lstm(self.embedding(codes), state)
        return self.head(output), state

    # ---------------------------------------------------------------------------------- training
    def setup(self, stage: str) -> None:
        """Take the codebook size, first-index distribution and VQ-VAE checkpoint from the DataModule if unset."""
        datamodule = getattr(self.trainer, "datamodule", None)
        num_codes = getattr(datamodule, "num_codes", None)
        if self.hparams.num_codes is None:
            if num_codes is None:
                raise ValueError("model.num_codes=null needs a DataModule with a num_codes attribute (the codebook size)")
            self._build(num_codes)
        elif num_codes is not None and int(num_codes) != self.hparams.num_codes:
            raise ValueError(
                f"model.num_codes={self.hparams.num_codes} but the codes come from a codebook of {num_codes} entries"
            )
        if datamodule is None:
            return
        if not self.has_first_index_distribution and getattr(datamodule, "first_index_distribution", None) is not None:
            self.set_first_index_distribution(datamodule.first_index_distribution)
        if self.hparams.vqvae_ckpt is None and getattr(datamodule, "vqvae_ckpt", None) is not None:
            self.hparams.vqvae_ckpt = str(datamodule.vqvae_ckpt)

    def _next_index_logits(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing: logits for positions 1..S-1 from 0..S-2, flattened, with their targets."""
        logits, _ = self(codes[:, :-1])
        return logits.reshape(-1, logits.shape[-1]), codes[:, 1:].reshape(-1)

    def training_step(self, codes: torch.Tensor, batch_idx: int) -> torch.Tensor:
        logits, targets = self._next_index_logits(codes)
        loss = F.cross_entropy(logits, targets)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=codes.shape[0])
        return loss

    def validation_step(self, codes: torch.Tensor, batch_idx: int) -> None:
        """Accumulate per-position loss and accuracy; the metrics sum and count across ranks."""
        logits, targets = self._next_index_logits(codes)
        self.val_loss.update(F.cross_entropy(logits, targets, reduction="none"))
        self.val_acc.update((logits.argmax(dim=-1) == targets).float())
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def configure_optimizers(self) -> dict:
        return adamw_with_cosine(self, self.hparams.lr, self.hparams.min_lr, self.hparams.weight_decay)

    # -------------------------------------------------------------------------- first index, VQ-VAE
    @property
    def has_first_index_distribution(self) -> bool:
        return bool(self.first_index_distribution.sum() > 0)

    def set_first_index_distribution(self, distribution: Sequence[float] | torch.Tensor) -> None:
        """Store the first-index distribution (counts or probabilities, shape (K,)), normalised."""
        distribution = torch.as_tensor(distribution, dtype=torch.float32).flatten()
        if distribution.numel() != self.hparams.num_codes or (distribution < 0).any() or distribution.sum() <= 0:
            raise ValueError(
                f"first_index_distribution must hold {self.hparams.num_codes} non-negative values with a "
                f"positive sum, got shape {tuple(distribution.shape)}"
            )
        self.first_index_distribution.copy_(distribution / distribution.sum())

    def attach_vqvae(self, vqvae: nn.Module) -> None:
        """Decode with ``vqvae`` (anything with ``decode_indices``) instead of loading ``vqvae_ckpt``."""
        vqvae.eval().requires_grad_(False)
        # Stored past nn.Module registration: a helper must not enter this model's state dict or optimiser.
        self.__dict__["_vqvae"] = vqvae

    @property
    def vqvae(self) -> nn.Module:
        """The VQ-VAE decoder, loaded from ``hparams.vqvae_ckpt`` on first use and kept out of the state dict."""
        if self._vqvae is None:
            if self.hparams.vqvae_ckpt is None:
                raise ValueError("LSTMPrior.hparams.vqvae_ckpt is not set: no VQ-VAE to decode the sampled codes")
            self.attach_vqvae(VQVAE.load_from_checkpoint(self.hparams.vqvae_ckpt, map_location=module_device(self)))
        return self._vqvae.to(module_device(self))

    # ---------------------------------------------------------------------------------- sampling
    def sampling_settings(
        self, mode: str | None = None, temperature: float | None = None, top_k: int | None = None, top_p: float | None = None
    ) -> SamplingSettings:
        """Resolve sampling arguments, filling each one left as None from the ``sample_*`` hyperparameters."""
        hp = self.hparams
        return SamplingSettings.from_mode(
            hp.sample_mode if mode is None else mode,
            hp.sample_temperature if temperature is None else temperature,
            hp.sample_top_k if top_k is None else top_k,
            hp.sample_top_p if top_p is None else top_p,
        )

    @torch.no_grad()
    def generate(self, uniforms: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
        """Code sequences (B, S) driven by ``uniforms`` (B, S): column 0 draws the first index, column t index t.

        All B sequences advance together: one LSTM step per position for the whole batch, the
        state carried between steps.
        """
        if not self.has_first_index_distribution:
            raise ValueError(
                "LSTMPrior has no first-index distribution: pass first_index_distribution= or train it "
                "with a DataModule that provides one"
            )
        device = module_device(self)
        uniforms = uniforms.to(device)
        batch = uniforms.shape[0]
        codes = torch.empty(batch, self.hparams.seq_len, dtype=torch.long, device=device)
        codes[:, 0] = invert_cdf(self.first_index_distribution.expand(batch, -1), uniforms[:, 0])
        state = None
        for position in range(1, self.hparams.seq_len):
            logits, state = self(codes[:, position - 1 : position], state)
            codes[:, position] = sample_from_logits(logits[:, 0], uniforms[:, position], settings)
        return codes

    def sample_codes(
        self,
        n: int,
        generator: torch.Generator | None = None,
        mode: str | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """``n`` code sequences (n, S), generated ``batch_size`` at a time on the model's device.

        The uniforms for all sequences are drawn from ``generator`` first, one row per sequence, so
        sequence i is the same for any batch size and for ``n`` calls with ``n=1`` on a CPU
        generator (up to float rounding between LSTM kernels, which changes a draw only when its
        uniform falls within rounding distance of a CDF step). Unset sampling arguments come from
        the ``sample_*`` hyperparameters.
        """
        settings = self.sampling_settings(mode, temperature, top_k, top_p)
        device = generator.device if generator is not None else torch.device("cpu")
        uniforms = torch.rand(n, self.hparams.seq_len, generator=generator, device=device)
        batch_size = batch_size or self.hparams.sample_batch_size
        return torch.cat([self.generate(chunk, settings) for chunk in uniforms.split(batch_size)])

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Binary phrases (N, 128, 57) from code sequences (N, S): VQ-VAE probabilities >= 0.5."""
        vqvae = self.vqvae
        batch_size = batch_size or self.hparams.sample_batch_size
        device = module_device(self)
        return torch.cat([threshold(vqvae.decode_indices(chunk.to(device))) for chunk in codes.split(batch_size)])

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        mode: str | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """``n`` generated phrases, bool (n, 128, 57): :meth:`sample_codes` decoded by the VQ-VAE."""
        codes = self.sample_codes(n, generator, mode, temperature, top_k, top_p, batch_size)
        return self.decode(codes, batch_size)


@dataclass
class GeneratedLoops:
    """Phrases kept by :func:`generate_loops` and how many candidates it took to find them.

    The phrases are kept bit-packed (912 bytes each, 8x less than bool): ``phrases`` unpacks them.
    """

    packed: torch.Tensor  # uint8 (A, 912)
    codes: torch.Tensor  # long (A, S)
    scores: torch.Tensor | None  # loop scores (A,), when a detector was given
    generated: int  # candidates sampled
    passed: int  # candidates under the threshold (all of them without rejection), >= A
    rounds: int  # batches sampled

    @property
    def phrases(self) -> torch.Tensor:
        """The kept phrases, bool (A, 128, 57), unpacked anew on each access."""
        return unpack_phrases(self.packed)

    @property
    def acceptance_rate(self) -> float:
        return self.passed / self.generated if self.generated else 0.0


def generate_loops(
    prior: LSTMPrior,
    n: int,
    generator: torch.Generator,
    settings: dict | None = None,
    batch_size: int = 1000,
    detector: nn.Module | None = None,
    threshold: float | None = None,
    max_rounds: int = 100,
    progress: bool = True,
) -> GeneratedLoops:
    """Sample loops in batches until ``n`` are kept, by rejection when ``threshold`` is given.

    ``settings`` holds keyword arguments of :meth:`LSTMPrior.sample_codes` (mode, temperature,
    top_k, top_p). With a ``detector`` (``score_phrases``: bool phrases -> loop scores) every
    phrase is scored; with a ``threshold`` too, only phrases scoring below it are kept and at most
    ``max_rounds`` batches are drawn, so fewer than ``n`` come back when the acceptance rate is too
    low for that budget.
    """
    if threshold is not None and detector is None:
        raise ValueError("rejection sampling needs a loop detector: a threshold was given without one")
    settings = settings or {}
    kept_packed, kept_codes, kept_scores = [], [], []
    generated = passed = rounds = 0
    with tqdm(total=n, desc="generating loops", unit="loop", disable=not progress) as bar:
        while passed < n and (threshold is None or rounds < max_rounds):
            size = batch_size if threshold is not None else min(batch_size, n - passed)
            codes = prior.sample_codes(size, generator, batch_size=size, **settings)
            phrases = prior.decode(codes, batch_size=size)
            scores = detector.score_phrases(phrases).to(phrases.device) if detector is not None else None
            keep = scores < threshold if threshold is not None else torch.ones(size, dtype=torch.bool, device=phrases.device)
            kept_packed.append(pack_phrases(phrases[keep]).cpu())
            kept_codes.append(codes[keep].cpu())
            if scores is not None:
                kept_scores.append(scores[keep].cpu())
            generated, passed, rounds = generated + size, passed + int(keep.sum()), rounds + 1
            bar.set_postfix(generated=generated, acceptance=f"{passed / generated:.1%}", refresh=False)
            bar.update(min(passed, n) - bar.n)
    return GeneratedLoops(
        packed=torch.cat(kept_packed)[:n] if kept_packed else torch.zeros(0, PACKED_BYTES, dtype=torch.uint8),
        codes=torch.cat(kept_codes)[:n] if kept_codes else torch.zeros(0, prior.hparams.seq_len, dtype=torch.long),
        scores=torch.cat(kept_scores)[:n] if kept_scores else None,
        generated=generated,
        passed=passed,
        rounds=rounds,
    )
