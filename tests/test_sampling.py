"""Sampling filters and inverse-CDF draws: exact kept sets, greedy limits, empirical frequencies."""
import pytest
import torch
from scipy.stats import chisquare

from lightning_modules.prior import filter_logits
from lightning_modules.sampling import SamplingSettings, invert_cdf, sample_from_logits

# Exact binary fractions in shuffled order: sorted cumulative sums 0.5, 0.75, 0.875, 0.953125, 1.
PROBS = torch.tensor([5 / 64, 0.5, 0.125, 3 / 64, 0.25], dtype=torch.float64)


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


def random_logits(rows: int = 64, classes: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, classes, generator=torch.Generator().manual_seed(seed)) * 3


def test_top_k_one_and_top_p_zero_keep_only_the_argmax():
    logits = random_logits()
    argmax = logits.argmax(dim=-1, keepdim=True)
    for filtered in (filter_logits(logits, top_k=1), filter_logits(logits, top_p=0.0), filter_logits(logits, top_p=1e-9)):
        assert torch.isfinite(filtered).sum(dim=-1).eq(1).all()
        assert torch.isfinite(filtered.gather(-1, argmax)).all()


def test_top_k_keeps_the_k_largest_unchanged():
    logits = random_logits()
    filtered = filter_logits(logits, top_k=7)
    for row, out in zip(logits, filtered):
        assert kept(out) == set(row.topk(7).indices.tolist())
        assert torch.equal(out[torch.isfinite(out)], row[torch.isfinite(out)])


@pytest.mark.parametrize(
    "top_p, expected",
    [
        (0.3, {1}),
        (0.5, {1}),  # boundary: the most probable entry reaches p exactly
        (0.5000001, {1, 4}),
        (0.75, {1, 4}),  # boundary: 0.5 + 0.25 = 0.75 exactly
        (0.76, {1, 4, 2}),
        (0.875, {1, 4, 2}),
        (0.9, {1, 4, 2, 0}),
        (0.99, {0, 1, 2, 3, 4}),
        (1.0, {0, 1, 2, 3, 4}),
    ],
)
def test_top_p_keeps_the_smallest_sorted_prefix_reaching_p(top_p, expected):
    for dtype in (torch.float64, torch.float32):
        assert kept(filter_logits(PROBS.log().to(dtype), top_p=top_p)) == expected


def test_top_p_sums_in_sorted_order_not_index_order():
    # Summed in index order, 5/64 + 0.5 reaches 0.55 at index 1 and would keep {0, 1}.
    assert kept(filter_logits(PROBS.log(), top_p=0.55)) == {1, 4}


def test_top_k_then_top_p_renormalises_over_the_top_k():
    # Over all five entries 0.5 < 0.6 and index 4 joins; over the top 2 the leader holds 2/3 >= 0.6.
    assert kept(filter_logits(PROBS.log(), top_p=0.6)) == {1, 4}
    assert kept(filter_logits(PROBS.log(), top_k=2, top_p=0.6)) == {1}
    assert kept(filter_logits(PROBS.log(), top_k=3, top_p=0.6)) == {1, 4}  # leader holds 0.5 / 0.875 < 0.6


def test_invert_cdf_picks_the_interval_holding_each_uniform():
    probs = torch.tensor([0.25, 0.0, 0.5, 0.25, 0.0])
    uniforms = torch.tensor([0.0, 0.2499, 0.25, 0.7499, 0.75, 0.9999999])
    assert invert_cdf(probs.expand(6, -1), uniforms).tolist() == [0, 0, 2, 2, 3, 3]


def test_zero_temperature_is_greedy_and_small_temperature_approaches_it():
    logits = random_logits()
    uniforms = torch.rand(logits.shape[0], generator=torch.Generator().manual_seed(1))
    greedy = logits.argmax(dim=-1)
    assert torch.equal(sample_from_logits(logits, uniforms, SamplingSettings(temperature=0.0)), greedy)
    assert torch.equal(sample_from_logits(logits, uniforms, SamplingSettings(temperature=1e-3)), greedy)
    assert not torch.equal(sample_from_logits(logits, uniforms, SamplingSettings(temperature=1.0)), greedy)


@pytest.mark.parametrize(
    "settings",
    [SamplingSettings(temperature=0.7), SamplingSettings(top_k=5), SamplingSettings(temperature=2.0, top_p=0.6)],
    ids=["temperature", "top_k", "top_p"],
)
def test_sampled_frequencies_match_the_filtered_distribution(settings):
    logits = torch.randn(12, generator=torch.Generator().manual_seed(3)) * 2
    expected = filter_logits(logits / settings.temperature, settings.top_k, settings.top_p).softmax(dim=-1)
    draws = 20000
    uniforms = torch.rand(draws, generator=torch.Generator().manual_seed(4))
    counts = torch.bincount(sample_from_logits(logits.expand(draws, -1), uniforms, settings), minlength=12)
    support = expected > 0
    assert counts[~support].sum() == 0
    expected = expected[support].double() / expected[support].double().sum()
    assert chisquare(counts[support].numpy(), expected.numpy() * draws).pvalue > 1e-3


def test_settings_from_mode_and_invalid_values():
    assert SamplingSettings.from_mode("temperature", 0.7, 30, 0.08) == SamplingSettings(0.7, 0, 1.0)
    assert SamplingSettings.from_mode("top_k", 1.0, 30, 0.08) == SamplingSettings(1.0, 30, 1.0)
    assert SamplingSettings.from_mode("top_p", 1.0, 30, 0.08) == SamplingSettings(1.0, 0, 0.08)
    with pytest.raises(ValueError, match="valid modes: temperature, top_k, top_p"):
        SamplingSettings.from_mode("nucleus")
    for bad in ({"temperature": -1.0}, {"top_k": -1}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            SamplingSettings(**bad)
