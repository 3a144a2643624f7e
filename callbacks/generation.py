"""Validation-time generation: sample phrases from the model, score them, and show a few."""
from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torchmetrics import Metric

from callbacks.media import log_media, pianoroll_grid, write_previews
from callbacks.metrics import GenerativeMetrics, LoopScore, NoteDensity, UniquePitch
from datamodules.pianoroll import N_COLUMNS, PHRASE_STEPS, pack_phrases
from datamodules.pianoroll.synth import DEFAULT_SR
from framework.io import atomic_path
from framework.seeding import seeded_generator
from lightning_modules.loop_detector import LoopDetector


class GenerationMetrics(pl.Callback):
    """Every ``every_n_epochs`` validation epochs, generate phrases and log how they compare.

    Any generator plugs in: the LightningModule offers ``sample(n, generator) -> Tensor``, bool
    ``(n, 128, 57)`` phrases drawn with ``generator`` (a ``torch.Generator`` on the module's
    device); the CNN-VAE decodes Gaussian latents, the LSTM prior decodes sampled code sequences
    with its VQ-VAE. The datamodule offers ``val_phrases() -> Tensor``, the bool validation
    phrases (the real side of P/R/D/C), or ``val_packed() -> Tensor``, the same bit-packed
    (N, 912) uint8, which is preferred: the phrases then stay packed until ``GenerativeMetrics``
    draws its subsets.

    The ``n_samples`` samples are drawn in chunks of ``batch_size``: chunk ``c`` of epoch ``e``
    with a generator seeded by ``(seed, e, c)`` on the module's device, chunks dealt to the ranks
    in turn (chunk ``c`` to rank ``c mod world_size``), every sample numbered by its position.
    Each rank adds every ``world_size``-th validation phrase, numbered by its position. The
    metrics keep one entry per number and sort by it, so the generated set, the real set and
    every logged value are the same on one rank or many (for the same weights); a ``batch_size``
    of at most ``n_samples / world_size`` keeps every rank sampling.

    Logged on every rank, computed on the module's device in float32 and reduced across ranks
    once per metric (by its ``compute``; nothing is reduced again when logging):
    ``val/gen/loop_score`` (only with a ``detector``), ``val/gen/unique_pitch``,
    ``val/gen/note_density``, ``val/gen/{precision,recall,density,coverage}`` with ``_std``, and
    ``val/gen/f1_pr``, ``val/gen/f1_dc`` (see :class:`callbacks.metrics.GenerativeMetrics`).

    After the metrics, rank zero writes the first ``n_media`` samples to
    ``<default_root_dir>/samples/epoch=NNN/`` (``pianoroll.png``, ``sample_NN.mid``,
    ``sample_NN.wav``) and sends them to any W&B logger. Disabled (``enabled=False``) or on a
    skipped epoch, the callback samples nothing.

    Args:
        detector: path of a ``LoopDetector`` checkpoint, or a module with ``loop_score``; None
            leaves the loop score out.
        n_networks, max_samples, k, distinct_neighbours: see ``GenerativeMetrics``.
        batch_size: phrases per ``sample`` call (one chunk).
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        n_samples: int = 256,
        detector: str | os.PathLike | nn.Module | None = None,
        n_networks: int = 10,
        max_samples: int = 10_000,
        k: int = 5,
        distinct_neighbours: bool = False,
        n_media: int = 4,
        bpm: float = 120.0,
        sample_rate: int = DEFAULT_SR,
        seed: int = 0,
        batch_size: int = 1024,
        enabled: bool = True,
    ):
        if every_n_epochs < 1 or n_samples <= k or batch_size < 1:
            raise ValueError(
                f"need every_n_epochs >= 1, n_samples > k and batch_size >= 1, "
                f"got {every_n_epochs}, {n_samples} (k={k}), {batch_size}"
            )
        self.every_n_epochs, self.n_samples, self.detector_source = every_n_epochs, n_samples, detector
        self.n_media, self.bpm, self.sample_rate, self.seed = n_media, bpm, sample_rate, seed
        self.batch_size, self.enabled, self.k = batch_size, enabled, k
        self.generative = GenerativeMetrics(n_networks, max_samples, k, distinct_neighbours)
        self.per_phrase: dict[str, Metric] = {"unique_pitch": UniquePitch(), "note_density": NoteDensity()}
        self._real: tuple[Tensor, Tensor] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._real = None
        if self.enabled and self.detector_source is not None and "loop_score" not in self.per_phrase:
            self.per_phrase["loop_score"] = LoopScore(self._load_detector())

    def _load_detector(self) -> nn.Module:
        if isinstance(self.detector_source, nn.Module):
            return self.detector_source
        path = Path(self.detector_source)
        if not path.is_file():
            raise FileNotFoundError(f"GenerationMetrics: detector checkpoint {path} does not exist")
        return LoopDetector.load_from_checkpoint(path, map_location="cpu")

    def _due(self, trainer: pl.Trainer) -> bool:
        return self.enabled and not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _real_shard(self, trainer: pl.Trainer) -> tuple[Tensor, Tensor]:
        """This rank's validation phrases (every world_size-th), bit-packed, and their positions, read once."""
        if self._real is None:
            datamodule = trainer.datamodule
            if hasattr(datamodule, "val_packed"):
                packed = datamodule.val_packed()
            elif hasattr(datamodule, "val_phrases"):
                packed = pack_phrases(torch.as_tensor(datamodule.val_phrases()).bool())
            else:
                raise AttributeError(f"GenerationMetrics needs {type(datamodule).__name__}.val_phrases()")
            if len(packed) <= self.k:
                raise ValueError(
                    f"GenerationMetrics: the validation set holds {len(packed)} phrases; P/R/D/C with "
                    f"k={self.k} needs more than {self.k} (hold out more data or lower callbacks.generation.k)"
                )
            index = torch.arange(trainer.global_rank, len(packed), trainer.world_size)
            self._real = packed[index], index
        return self._real

    def _generate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[Tensor, Tensor]:
        """This rank's chunks of the samples and their sample numbers (see the class docstring)."""
        rank, world, device = trainer.global_rank, trainer.world_size, pl_module.device
        parts = [torch.zeros(0, PHRASE_STEPS, N_COLUMNS, dtype=torch.bool, device=device)]
        numbers = [torch.zeros(0, dtype=torch.long, device=device)]
        for chunk, start in enumerate(range(0, self.n_samples, self.batch_size)):
            if chunk % world != rank:
                continue
            size = min(self.batch_size, self.n_samples - start)
            generator = seeded_generator(self.seed, trainer.current_epoch, chunk, device=device)
            phrases = pl_module.sample(size, generator)
            if tuple(phrases.shape) != (size, PHRASE_STEPS, N_COLUMNS):
                raise ValueError(
                    f"{type(pl_module).__name__}.sample returned shape {tuple(phrases.shape)}, "
                    f"not ({size}, {PHRASE_STEPS}, {N_COLUMNS})"
                )
            parts.append(phrases.bool())
            numbers.append(torch.arange(start, start + size, device=device))
        return torch.cat(parts), torch.cat(numbers)

    def metrics_on(self, device: torch.device) -> dict[str, Metric]:
        """Every metric of the callback, moved to ``device`` (a detector inside the loop score too)."""
        return {"generative": self.generative.to(device), **{name: m.to(device) for name, m in self.per_phrase.items()}}

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._due(trainer):
            return
        device = pl_module.device
        fake, fake_index = self._generate(trainer, pl_module)
        real, real_index = self._real_shard(trainer)
        metrics = self.metrics_on(device)
        generative = metrics.pop("generative")
        generative.update(real=real.to(device), fake=fake, real_index=real_index.to(device), fake_index=fake_index)
        values = dict(generative.compute())
        for name, metric in metrics.items():
            metric.update(fake, fake_index)
            values[name] = metric.compute()
        for metric in (generative, *metrics.values()):
            metric.reset()
        # compute() has gathered every rank's samples already: the values agree on all ranks.
        pl_module.log_dict({f"val/gen/{name}": value.float() for name, value in values.items()}, sync_dist=False)
        if trainer.is_global_zero and self.n_media > 0:
            self._write_media(trainer, fake[: self.n_media].cpu())

    def _write_media(self, trainer: pl.Trainer, phrases: Tensor) -> None:
        root = Path(trainer.default_root_dir)
        folder = root / "samples" / f"epoch={trainer.current_epoch:03d}"
        with atomic_path(folder) as tmp:
            pianoroll_grid(phrases, tmp / "pianoroll.png", title=f"epoch {trainer.current_epoch}")
            write_previews(phrases, tmp, bpm=self.bpm, sample_rate=self.sample_rate, seed=self.seed)
        previews = sorted(folder.glob("sample_*"))
        log_media(
            trainer, "val/gen", image=folder / "pianoroll.png",
            audio=[p for p in previews if p.suffix == ".wav"],
            files=[p for p in previews if p.suffix == ".mid"], base_path=root,
        )
