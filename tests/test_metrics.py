"""Generative metrics: PRDC against the reference package, UP/ND by hand, the random CNN, the Metric classes."""
from __future__ import annotations

import contextlib
import io
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from prdc import compute_prdc

import callbacks.metrics as metrics
from callbacks.metrics import (
    PRDC,
    PRDC_KEYS,
    GenerativeMetrics,
    LoopScore,
    NoteDensity,
    UniquePitch,
    _smallest_per_row,
    embed,
    f1_score,
    note_density,
    prdc,
    random_cnn_embedding,
    unique_pitch,
)
from datamodules.correlation import c_midi



def reference_prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    with contextlib.redirect_stdout(io.StringIO()):
        return {key: float(value) for key, value in compute_prdc(real, fake, k).items()}


def assert_matches_reference(real: np.ndarray, fake: np.ndarray, k: int, **kwargs) -> None:
    expected = reference_prdc(real, fake, k)
    got = prdc(torch.from_numpy(real), torch.from_numpy(fake), k, **kwargs)
    for key in PRDC_KEYS:
        assert got[key].item() == pytest.approx(expected[key], abs=1e-6), key


def random_phrases(n: int, density: float = 0.1, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 128, 57, generator=torch.Generator().manual_seed(seed)) < density


# ------------------------------------------------------------------------------------------ PRDC


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_prdc_equals_reference_on_random_features(k, chunk_size):
    rng = np.random.default_rng(k)
    real = rng.standard_normal((300, 16)).astype(np.float32)
    fake = (rng.standard_normal((220, 16)) * 1.1 + 0.2).astype(np.float32)
    assert_matches_reference(real, fake, k, chunk_size=chunk_size)


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_prdc_equals_reference_with_exact_duplicates_and_ties(chunk_size):
    # Small integer features: every distance is exact in float32, so duplicates sit at exactly 0
    # and many distances tie with radii; strict "<" decides them.
    rng = np.random.default_rng(1)
    real = rng.integers(-1, 2, (250, 5)).astype(np.float32)
    fake = rng.integers(-1, 2, (180, 5)).astype(np.float32)
    fake[:60] = real[:60]
    assert len(np.unique(real, axis=0)) < len(real)
    assert_matches_reference(real, fake, 5, chunk_size=chunk_size)


def test_prdc_on_large_embeddings_with_many_duplicates_matches_reference():
    net = random_cnn_embedding(0)
    distinct = random_phrases(60, seed=3)
    real = embed(net, distinct[torch.randint(0, 60, (400,), generator=torch.Generator().manual_seed(0))])
    fake = embed(net, torch.cat([distinct[:20], random_phrases(150, seed=4)]))
    assert_matches_reference(real.numpy(), fake.numpy(), 5)


def test_radius_zero_contains_nothing_unless_distinct_neighbours():
    rng = np.random.default_rng(2)
    points = rng.standard_normal((20, 8)).astype(np.float32)
    real = np.repeat(points, 6, axis=0)  # every point has 5 exact copies: radius 0 for k=5
    fake = points.copy()
    reference = reference_prdc(real, fake, 5)
    assert reference["precision"] == 0 and reference["coverage"] == 0
    assert_matches_reference(real, fake, 5)
    distinct = prdc(torch.from_numpy(real), torch.from_numpy(fake), 5, distinct_neighbours=True)
    assert distinct["precision"].item() == 1.0 and distinct["coverage"].item() == 1.0
    # Each fake lies in the balls of its 6 real copies at least.
    assert distinct["density"].item() >= 6 / 5


def test_prdc_equals_reference_where_float32_cannot_decide(monkeypatch):
    # The fake set sits far from the real mean, so its float32 squared distances carry errors far
    # larger than the gaps between neighbours: radii and ball memberships fall back to exact
    # float64 distances pair by pair, and rows whose nearest neighbours cannot be told apart are
    # computed again whole (in float32), in both sets.
    rng = np.random.default_rng(4)
    real = rng.standard_normal((200, 16)).astype(np.float32)
    fake = (rng.standard_normal((150, 16)) + 300).astype(np.float32)
    fake[:40] = (real[:40] + 300).astype(np.float32)
    real[150:] = fake[100:150] - 1e-3  # real points in the fake cloud, next to fakes
    whole_rows = []
    settle = metrics._settle_radii
    monkeypatch.setattr(metrics, "_settle_radii", lambda points, rows, values, *args: whole_rows.append(
        (len(points), values.shape[1] == len(points))) or settle(points, rows, values, *args))
    matmul_dtypes = []
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b, **kw: matmul_dtypes.append(a.dtype) or mm(a, b, **kw))
    assert_matches_reference(real, fake, 5)
    assert {(200, True), (150, True)} <= set(whole_rows)
    assert set(matmul_dtypes) == {torch.float32}


def distinct_neighbours_reference(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """The package's PRDC with radii to the k-th nearest *distinct* point (exact duplicates skipped)."""

    def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        squared = ((a[:, None, :].astype(np.float64) - b[None, :, :].astype(np.float64)) ** 2).sum(axis=2)
        return np.sqrt(squared.astype(np.float32))

    def radii(points: np.ndarray) -> np.ndarray:
        own = distances(points, points)
        return np.sort(np.where(own > 0, own, np.inf), axis=1)[:, k - 1]

    real_radii, fake_radii, cross = radii(real), radii(fake), distances(real, fake)
    in_real_balls = cross < real_radii[:, None]
    return {
        "precision": in_real_balls.any(axis=0).mean(),
        "recall": (cross < fake_radii[None, :]).any(axis=1).mean(),
        "density": in_real_balls.sum(axis=0).mean() / k,
        "coverage": (cross.min(axis=1) < real_radii).mean(),
    }


@pytest.mark.parametrize("chunk_size", [None, 9])
def test_distinct_neighbours_equals_brute_force(chunk_size):
    # Some points have many copies (more than the neighbour list holds), some none.
    rng = np.random.default_rng(5)
    distinct = rng.standard_normal((70, 8)).astype(np.float32)
    real = np.concatenate([distinct[rng.integers(0, 70, 180)], np.repeat(distinct[:2], 15, axis=0)])
    fake = np.concatenate([distinct[rng.integers(0, 70, 60)], rng.standard_normal((120, 8)).astype(np.float32)])
    expected = distinct_neighbours_reference(real, fake, 5)
    got = prdc(torch.from_numpy(real), torch.from_numpy(fake), 5, distinct_neighbours=True, chunk_size=chunk_size)
    for key in PRDC_KEYS:
        assert got[key].item() == pytest.approx(expected[key], abs=1e-6), key


@pytest.mark.parametrize("columns", [50, 64 * 14, 64 * 20 + 37, 3000])
def test_smallest_per_row_equals_topk(columns):
    generator = torch.Generator().manual_seed(columns)
    block = torch.randint(0, 200, (40, columns), generator=generator).float()  # many ties
    for view in (block, block.T.contiguous().T):  # row-major and column-major storage
        values, indices = _smallest_per_row(view, 14)
        assert torch.equal(values, view.topk(14, dim=1, largest=False).values)
        assert torch.equal(view.gather(1, indices), values)
        assert all(len(set(row.tolist())) == 14 for row in indices)


def test_prdc_rejects_too_few_samples_and_mismatched_features():
    with pytest.raises(ValueError, match="more than 5"):
        prdc(torch.randn(5, 3), torch.randn(10, 3), 5)
    with pytest.raises(ValueError, match="equal D"):
        prdc(torch.randn(10, 3), torch.randn(10, 4), 5)
    with pytest.raises(ValueError, match="fake features contain NaN"):
        prdc(torch.randn(10, 3), torch.randn(10, 3).index_fill(0, torch.tensor([4]), float("nan")), 5)


def test_f1_of_table_3_means():
    assert f1_score(torch.tensor(0.779), torch.tensor(0.636)).item() == pytest.approx(0.700, abs=5e-4)
    assert f1_score(torch.tensor(0.0), torch.tensor(0.0)).item() == 0.0


# --------------------------------------------------------------------------------------- UP / ND


def test_unique_pitch_and_note_density_by_hand():
    phrase = torch.zeros(128, 57, dtype=torch.bool)
    # Bar 0: kick on steps 0, 4, 8, 12; bass pitch column 20 held over steps 0-7; column 30 at step 15.
    phrase[[0, 4, 8, 12], 0] = True
    phrase[0:8, 20] = True
    phrase[15, 30] = True
    # Bar 3: snare and hi-hat together at step 2 (one step, two columns).
    phrase[3 * 16 + 2, [1, 2]] = True
    # Bars 0: columns {0, 20, 30} -> 3, active steps {0..8, 12, 15} -> 11; bar 3: 2 columns, 1 step.
    empty = torch.zeros(128, 57, dtype=torch.bool)
    phrases = torch.stack([phrase, empty]).float()
    assert unique_pitch(phrases).tolist() == [(3 + 2) / 8, 0.0]
    assert note_density(phrases).tolist() == [(11 + 1) / 8, 0.0]
    full = torch.ones(1, 128, 57)
    assert unique_pitch(full).item() == 57 and note_density(full).item() == 16


def test_phrase_functions_reject_wrong_shapes():
    with pytest.raises(ValueError, match=r"\(N, 128, 57\)"):
        unique_pitch(torch.zeros(2, 57, 128))


def test_unique_pitch_and_note_density_of_demo_phrases(demo_root):
    from datamodules.phrases import PhraseDataModule

    module = PhraseDataModule(cache=str(demo_root / "phrases"), midi=str(demo_root / "midi"), demo_root=str(demo_root))
    module.prepare_data()
    phrases = module.train_phrases()
    up, nd = unique_pitch(phrases).mean().item(), note_density(phrases).mean().item()
    print(f"demo training set: {len(phrases)} phrases, UP {up:.3f}, ND {nd:.3f} (paper's Lakh set: 5.769, 14.383)")
    # Every kept phrase has >= 32 drum and >= 32 bass cells, so a bar holds at least one drum class
    # and one bass pitch on average, and UP/ND lie well inside their ranges.
    assert 2 <= up <= 20 and 4 <= nd <= 16


# ------------------------------------------------------------------------------------- embedding


def test_random_cnn_is_deterministic_per_seed_and_leaves_global_rng_alone():
    phrases = random_phrases(6)
    state = torch.get_rng_state()
    a, b, c = random_cnn_embedding(0), random_cnn_embedding(0), random_cnn_embedding(1)
    assert torch.equal(torch.get_rng_state(), state)
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    out = embed(a, phrases)
    assert out.shape == (6, 128)
    assert torch.equal(out, embed(b, phrases))
    assert not torch.allclose(out, embed(c, phrases))
    # Batching does not change the features.
    assert torch.allclose(out, embed(a, phrases, batch_size=4), atol=1e-6)


# -------------------------------------------------------------------------------- Metric classes


def test_per_phrase_metrics_count_each_index_once():
    phrases = random_phrases(10, density=0.05)
    metric = UniquePitch()
    metric.update(phrases[:6], torch.arange(6))
    metric.update(phrases[4:], torch.arange(4, 10))  # indices 4 and 5 again (sampler padding)
    assert metric.compute().item() == pytest.approx(unique_pitch(phrases).mean().item())
    density = NoteDensity()
    density.update(phrases[:3])
    density.update(phrases[:3])  # no index: both copies count
    assert density.compute().item() == pytest.approx(note_density(phrases[:3]).mean().item())


class StandInDetector(torch.nn.Module):
    """A fixed linear scorer with the LoopDetector's ``loop_score`` interface."""

    def __init__(self):
        super().__init__()
        self.weights = torch.nn.Parameter(torch.linspace(-1, 1, 28))

    def loop_score(self, correlations: torch.Tensor) -> torch.Tensor:
        return (correlations @ self.weights) ** 2


def test_loop_score_is_the_mean_detector_score_of_c_midi():
    detector = StandInDetector()
    phrases = random_phrases(7, density=0.2)
    metric = LoopScore(detector)
    metric.update(phrases[:3])
    metric.update(phrases[3:])
    expected = detector.loop_score(c_midi(phrases)).mean()
    assert metric.compute().item() == pytest.approx(expected.item(), rel=1e-6)


def test_prdc_metric_ignores_duplicate_indices():
    real, fake = torch.randn(40, 6), torch.randn(30, 6)
    metric = PRDC(k=3)
    metric.update(real=real[:25], real_index=torch.arange(25))
    metric.update(real=real[20:], real_index=torch.arange(20, 40), fake=fake)
    expected = prdc(real, fake, 3)
    got = metric.compute()
    assert all(torch.equal(got[key], expected[key]) for key in PRDC_KEYS)


def test_generative_metrics_average_repeats_and_take_f1_of_means():
    real, fake = random_phrases(40, 0.1, seed=1), random_phrases(30, 0.12, seed=2)
    metric = GenerativeMetrics(n_networks=3, max_samples=1000, k=3)
    metric.update(real=real[:20], fake=fake)
    metric.update(real=real[20:])
    result = metric.compute()
    repeats = torch.stack([
        torch.stack(list(prdc(embed(random_cnn_embedding(s), real), embed(random_cnn_embedding(s), fake), 3).values()))
        for s in range(3)
    ])
    for i, key in enumerate(PRDC_KEYS):
        assert result[key].item() == pytest.approx(repeats[:, i].mean().item(), abs=1e-6)
        assert result[f"{key}_std"].item() == pytest.approx(repeats[:, i].std(correction=0).item(), abs=1e-6)
    p, r, d, c = (result[key].item() for key in PRDC_KEYS)
    assert result["f1_pr"].item() == pytest.approx(2 * p * r / (p + r), abs=1e-6)
    assert result["f1_dc"].item() == pytest.approx(2 * d * c / (d + c), abs=1e-6)


def test_generative_metrics_subsample_is_seeded_and_bounded():
    real, fake = random_phrases(60, 0.1, seed=1), random_phrases(50, 0.12, seed=2)

    def run(real_order):
        metric = GenerativeMetrics(n_networks=2, max_samples=20, k=3)
        metric.update(real=real[real_order], fake=fake, real_index=real_order, fake_index=torch.arange(50))
        return metric.compute()

    forward, shuffled = run(torch.arange(60)), run(torch.randperm(60, generator=torch.Generator().manual_seed(5)))
    # Sorting by index makes the subsample independent of the order samples arrived in.
    assert all(torch.equal(forward[key], shuffled[key]) for key in forward)
    full = GenerativeMetrics(n_networks=2, max_samples=1000, k=3)
    full.update(real=real, fake=fake)
    assert any(not torch.equal(forward[key], value) for key, value in full.compute().items())


def test_generative_metrics_unpack_only_the_drawn_subsets(monkeypatch, tmp_path):
    """Packed input, a phrase cache read from disk and bool input agree; no call unpacks more than a subset."""
    from datamodules.pianoroll import load_phrase_cache, pack_phrases, write_phrase_cache

    real, fake = random_phrases(300, 0.1, seed=1), random_phrases(250, 0.12, seed=2)
    write_phrase_cache(tmp_path / "real", pack_phrases(real.numpy()), ["a.mid"] * 300, np.arange(300))
    unpacked_sizes = []
    original = metrics.unpack_phrases
    monkeypatch.setattr(metrics, "unpack_phrases", lambda packed: unpacked_sizes.append(len(packed)) or original(packed))

    from_bool = GenerativeMetrics(n_networks=2, max_samples=40, k=3)
    from_bool.update(real=real, fake=fake)
    from_packed = GenerativeMetrics(n_networks=2, max_samples=40, k=3)
    from_packed.update(real=pack_phrases(real), fake=pack_phrases(fake))
    from_cache = metrics.random_cnn_prdc(load_phrase_cache(tmp_path / "real").packed, pack_phrases(fake), 2, 40, 3)
    expected = from_bool.compute()
    for result in (from_packed.compute(), from_cache):
        assert all(torch.equal(result[key], expected[key]) for key in expected)
    assert unpacked_sizes and max(unpacked_sizes) == 40


# ----------------------------------------------------------------------------------- multi-rank


def _padded_shard(n: int, rank: int, world: int) -> torch.Tensor:
    """The indices DistributedSampler(shuffle=False) gives ``rank``: padded with the first ones."""
    total = -(-n // world) * world
    indices = torch.arange(total) % n
    return indices[rank:total:world]


def _prdc_worker(rank: int, world: int, port: str, real: torch.Tensor, fake: torch.Tensor, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        metric = PRDC(k=5)
        phrases_metric = UniquePitch()
        for start in (0, 1):  # two batches per rank, as a validation loop would
            real_index = _padded_shard(len(real), rank, world)[start::2]
            fake_index = _padded_shard(len(fake), rank, world)[start::2]
            metric.update(real=real[real_index], fake=fake[fake_index], real_index=real_index, fake_index=fake_index)
        phrases = random_phrases(11, seed=9)
        index = _padded_shard(11, rank, world)
        phrases_metric.update(phrases[index], index)
        result = {key: value.item() for key, value in metric.compute().items()}
        result["unique_pitch"] = phrases_metric.compute().item()
        results[rank] = result
    finally:
        dist.destroy_process_group()


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


@pytest.mark.slow
def test_prdc_metric_across_two_ranks_equals_one_process():
    generator = torch.Generator().manual_seed(0)
    real, fake = torch.randn(53, 8, generator=generator), torch.randn(47, 8, generator=generator) + 0.3
    results = mp.Manager().dict()
    mp.spawn(_prdc_worker, args=(2, _free_port(), real, fake, results), nprocs=2, join=True)
    expected = {key: value.item() for key, value in prdc(real, fake, 5).items()}
    expected["unique_pitch"] = unique_pitch(random_phrases(11, seed=9)).mean().item()
    assert results[0] == results[1]
    assert results[0] == pytest.approx(expected, abs=1e-7)
