"""Random-number generators for sampling that differ across ranks but are reproducible."""
from __future__ import annotations

import torch


def sampling_generator(seed: int, global_rank: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed + global_rank``.

    ``seed_everything`` gives every rank the same global RNG state, so samples drawn from it would
    be identical on all ranks; offsetting by the rank makes each rank draw different samples while
    keeping a run reproducible.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed) + int(global_rank))
    return generator
