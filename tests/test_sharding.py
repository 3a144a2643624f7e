"""Evaluation shards: every sample on exactly one rank, and Lightning keeps the sampler."""
from __future__ import annotations

import pytest
from torch.utils.data import DistributedSampler

from datamodules.sharding import UnpaddedShardSampler


@pytest.mark.parametrize("n, world", [(10, 3), (7, 2), (1, 4), (0, 2), (8, 1)])
def test_ranks_partition_the_dataset_without_padding(n, world):
    shards = []
    for rank in range(world):
        sampler = UnpaddedShardSampler(range(n))
        sampler.num_replicas, sampler.rank = world, rank
        shards.append(list(sampler))
        assert len(sampler) == len(shards[-1])
    assert sorted(i for shard in shards for i in shard) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_outside_a_process_group_it_yields_everything_and_stays_a_distributed_sampler():
    sampler = UnpaddedShardSampler(range(5))
    assert list(sampler) == [0, 1, 2, 3, 4]
    assert isinstance(sampler, DistributedSampler)  # Lightning injects no padding sampler over it
