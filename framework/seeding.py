"""Random numbers that are reproducible yet independent across ranks, epochs and sample chunks.

``seed_everything`` gives every rank the same global RNG state. Sampling therefore uses explicit
generators seeded from a tuple of keys (a seed and, say, an epoch and a chunk number), and
training noise (dropout, a VAE's reparameterisation) uses a global RNG that :class:`RankSeeding`
re-seeds per rank. Tuples are turned into seeds by NumPy's ``SeedSequence``, which hashes them:
adding keys (``seed + rank``) would make seed 0 on rank 1 replay seed 1 on rank 0.
"""
from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch


def stream_seed(*keys: int) -> int:
    """A 63-bit seed determined by the tuple of non-negative integers ``keys``."""
    state = np.random.SeedSequence([int(key) for key in keys]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def seeded_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`stream_seed` of ``keys``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(stream_seed(*keys))
    return generator


def sampling_generator(seed: int, global_rank: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    """The sampling generator of ``global_rank`` in a run seeded with ``seed``."""
    return seeded_generator(seed, global_rank, device=device)


class RankSeeding(pl.Callback):
    """Re-seed torch's global RNG (CPU and every GPU) with ``(seed, global rank)`` when training starts.

    Every rank builds and initialises the model from the common seed (networks built lazily in
    ``setup`` included); from the first training batch on, dropout masks and reparameterisation
    noise differ between ranks, as they would in one process over the whole batch, and the run
    stays reproducible.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.manual_seed(stream_seed(self.seed, trainer.global_rank))
