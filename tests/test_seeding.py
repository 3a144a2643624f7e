"""Training noise streams: distinct per rank, and a resumed run does not replay the noise it began with."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from framework.seeding import RankSeeding


def noise_after_train_start(rank: int, global_step: int) -> torch.Tensor:
    trainer = SimpleNamespace(global_rank=rank, global_step=global_step)
    RankSeeding(seed=0).on_train_start(trainer, None)
    return torch.rand(8)


def test_every_rank_draws_its_own_noise():
    assert not torch.equal(noise_after_train_start(0, 0), noise_after_train_start(1, 0))
    assert torch.equal(noise_after_train_start(1, 0), noise_after_train_start(1, 0))


def test_a_resumed_run_draws_new_noise_rather_than_the_first_epochs_again():
    assert not torch.equal(noise_after_train_start(0, 0), noise_after_train_start(0, 120))
