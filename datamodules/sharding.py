"""Evaluation sharding across ranks without the duplicates a DistributedSampler pads with."""
from __future__ import annotations

from typing import Iterator, Sized

import torch.distributed as dist
from torch.utils.data import DistributedSampler


class UnpaddedShardSampler(DistributedSampler):
    """Rank r of w gets indices r, r + w, r + 2w, ... of the dataset, in order, and nothing more.

    ``DistributedSampler`` repeats samples so every rank has the same count, which makes metrics
    over a validation or test set count those samples twice. This sampler gives ranks counts that
    differ by at most one instead; epoch-level metrics that sum and count (torchmetrics, or
    ``self.log(..., sync_dist=True)`` without ``on_step``) stay exact. Being a DistributedSampler,
    Lightning keeps it instead of injecting its own. Outside a process group it yields everything.
    """

    def __init__(self, dataset: Sized):
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(
            dataset,
            num_replicas=dist.get_world_size() if distributed else 1,
            rank=dist.get_rank() if distributed else 0,
            shuffle=False,
        )

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))
