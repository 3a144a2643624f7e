"""EMACodebook: EMA update by hand, restarts, perplexity, straight-through gradient, DDP reduction."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_modules.nets.codebook import EMACodebook, usage_perplexity


def channel_major(vectors: list[list[float]]) -> torch.Tensor:
    """(1, D, S) encoder output holding ``vectors`` (S x D) as its steps."""
    return torch.tensor(vectors, dtype=torch.float32).t().unsqueeze(0).contiguous()


def two_entry_codebook(**kwargs) -> EMACodebook:
    codebook = EMACodebook(num_codes=2, dim=2, decay=0.5, eps=1e-5, restart_threshold=0.1, **kwargs)
    codebook.embedding.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    codebook.ema_count.copy_(torch.tensor([2.0, 2.0]))
    codebook.ema_sum.copy_(torch.tensor([[0.0, 0.0], [20.0, 20.0]]))
    return codebook


def test_ema_update_matches_hand_computation():
    codebook = two_entry_codebook().train()
    out = codebook(channel_major([[1, 0], [0, 1], [9, 9]]))

    assert out.indices.tolist() == [[0, 0, 1]]
    # the returned entries are those assigned against, before the update: (0,0), (0,0), (10,10)
    assert out.z_q[0].t().tolist() == [[0, 0], [0, 0], [10, 10]]
    # squared errors 1 + 1 + 2 over 6 elements
    assert out.commitment.item() == pytest.approx(4 / 6)
    # step counts (2, 1), sums ((1,1), (9,9)); EMA with decay 0.5
    counts = [0.5 * 2 + 0.5 * 2, 0.5 * 2 + 0.5 * 1]  # 2.0, 1.5
    sums = [0.5 * 0 + 0.5 * 1, 0.5 * 20 + 0.5 * 9]  # 0.5, 14.5 (both coordinates)
    assert codebook.ema_count.tolist() == pytest.approx(counts)
    torch.testing.assert_close(codebook.ema_sum, torch.tensor([[sums[0]] * 2, [sums[1]] * 2]))
    total, eps, k = sum(counts), 1e-5, 2
    smoothed = [(n + eps) / (total + k * eps) * total for n in counts]
    expected = torch.tensor([[s / n] * 2 for s, n in zip(sums, smoothed)])
    torch.testing.assert_close(codebook.embedding, expected, rtol=1e-6, atol=0)
    assert out.restarts.item() == 0
    assert out.perplexity.item() == pytest.approx(math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))))
    assert codebook.steps.item() == 1


def test_eval_mode_leaves_the_codebook_untouched():
    codebook = two_entry_codebook().eval()
    before = {name: buffer.clone() for name, buffer in codebook.named_buffers()}
    codebook(channel_major([[1, 0], [0, 1], [9, 9]]))
    for name, buffer in codebook.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_dead_entry_is_restarted_from_a_batch_vector():
    codebook = EMACodebook(num_codes=3, dim=2, decay=0.9, restart_threshold=1.0).train()
    codebook.embedding.copy_(torch.tensor([[0.0, 0.0], [100.0, 100.0], [-100.0, -100.0]]))
    codebook.ema_count.copy_(torch.tensor([50.0, 5.0, 0.5]))  # entry 2 is dead already, 1 is alive
    codebook.ema_sum.copy_(codebook.embedding * codebook.ema_count[:, None])
    batch = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]  # all nearest to entry 0
    out = codebook(channel_major(batch))

    assert out.restarts.item() == 1
    assert codebook.ema_count[2].item() == 1.0  # reset to the threshold
    restarted = codebook.embedding[2].tolist()
    assert any(restarted == pytest.approx(v, rel=1e-4) for v in batch), restarted
    assert codebook.ema_sum[2].tolist() in batch  # sum = threshold x vector, exactly
    assert codebook.embedding[1].tolist() == pytest.approx([100.0, 100.0], rel=1e-3)  # alive: kept
    # the next batch lands on the restarted entry
    assert codebook.eval().assign(channel_major([restarted])).item() == 2


def test_more_entries_than_vectors_restarts_all_from_the_batch():
    torch.manual_seed(0)
    codebook = EMACodebook(num_codes=512, dim=4).train()
    z = torch.randn(1, 4, 3)  # three vectors, fresh (all-zero) statistics
    out = codebook(z)
    assert out.restarts.item() == 512
    vectors = z[0].t()
    distance_to_batch = torch.cdist(codebook.embedding, vectors).min(1).values
    assert distance_to_batch.max().item() < 1e-3 * vectors.norm(dim=1).max().item()
    assert torch.isfinite(codebook.embedding).all()
    assert codebook.ema_count.tolist() == [1.0] * 512


def test_all_zero_encoder_output_stays_finite():
    codebook = EMACodebook(num_codes=8, dim=4).train()
    for _ in range(3):
        out = codebook(torch.zeros(2, 4, 5))
    assert torch.isfinite(codebook.embedding).all()
    assert torch.isfinite(out.commitment)
    assert out.used.item() == 1 and out.perplexity.item() == pytest.approx(1.0)


def test_perplexity():
    assert usage_perplexity(torch.tensor([5.0, 5.0, 5.0, 0.0])).item() == pytest.approx(3.0)
    assert usage_perplexity(torch.tensor([0.0, 7.0, 0.0])).item() == pytest.approx(1.0)
    assert usage_perplexity(torch.tensor([1.0, 3.0])).item() == pytest.approx(math.exp(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))))


def test_straight_through_gradient_reaches_the_input():
    codebook = two_entry_codebook().train()
    z = channel_major([[1, 0], [0, 1], [9, 9]]).requires_grad_(True)
    out = codebook(z)
    (out.z_q * torch.arange(6.0).view(1, 2, 3)).sum().backward()
    assert torch.equal(z.grad, torch.arange(6.0).view(1, 2, 3))  # identity through the quantiser

    z.grad = None
    two_entry_codebook().eval()(z).commitment.backward()
    entries = torch.tensor([[0.0, 0.0], [0.0, 0.0], [10.0, 10.0]]).t().unsqueeze(0)
    assert torch.allclose(z.grad, 2 * (z.detach() - entries) / 6)


# --- data-parallel reduction -------------------------------------------------------------------

DDP_STEPS = 6
DDP_SIZES = (3, 5)  # batch size per rank, unequal on purpose; each item holds 4 vectors of dim 4


def ddp_batch(step: int, rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(DDP_SIZES[rank], 4, 4, generator=generator) + 3 * rank


def fresh_ddp_codebook() -> EMACodebook:
    torch.manual_seed(0)
    return EMACodebook(num_codes=16, dim=4, decay=0.8, restart_threshold=1.0, seed=7).train()


def ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        codebook = fresh_ddp_codebook()
        restarts = 0
        for step in range(DDP_STEPS):
            restarts += codebook(ddp_batch(step, rank)).restarts.item()
        state = {name: buffer.clone() for name, buffer in codebook.named_buffers()}
        torch.save({"state": state, "restarts": restarts}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_codebook_is_identical_across_ranks_and_equals_one_process(tmp_path):
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    reference = fresh_ddp_codebook()
    restarts = 0
    for step in range(DDP_STEPS):
        restarts += reference(torch.cat([ddp_batch(step, 0), ddp_batch(step, 1)])).restarts.item()

    assert restarts > 0  # the restart path was exercised
    for name, buffer in ranks[0]["state"].items():
        assert torch.equal(buffer, ranks[1]["state"][name]), f"{name} differs across ranks"
        expected = dict(reference.named_buffers())[name]
        assert torch.allclose(buffer, expected, atol=1e-5), f"{name} differs from the single-process update"
    assert ranks[0]["restarts"] == ranks[1]["restarts"] == restarts
