"""Loop scoring throughput: C_MIDI on the packed bits + detector, batched, vs a per-phrase NumPy loop.

Both score the same 50,000 bit-packed phrases (random sparse phrases with repeated bars, so the
bar distances vary) with the same untrained detector, on one thread each (BLAS/OpenMP thread
counts and ``torch.set_num_threads`` set to 1), best of 3 runs. Ours is what loop extraction runs:
:meth:`LoopDetector.score_packed` on batches of 8,192 phrases. The reference follows the spec's
formula as one would write it per phrase: unpack the phrase, count the differing cells of each of
the 28 bar pairs, normalise by the maximum, then run the encoder as NumPy matrix products. Prints
both rates, the projected time for the paper's 5,687,274 phrases, and the speed-up last.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from datamodules.pianoroll import N_COLUMNS, PHRASE_STEPS, pack_phrases  # noqa: E402
from lightning_modules.loop_detector import LoopDetector  # noqa: E402

N_PHRASES = 50_000
PAPER_PHRASES = 5_687_274
BATCH_SIZE = 8192
BAR_CELLS = 16 * N_COLUMNS
REPEATS = 3


def make_packed(n: int, seed: int = 0) -> np.ndarray:
    """``n`` packed phrases built from 1,000 distinct ones whose 8 bars repeat a few random bars."""
    rng = np.random.default_rng(seed)
    distinct = 1000
    bars = rng.random((distinct, 4, 16, N_COLUMNS)) < 0.06
    layout = rng.integers(0, 4, size=(distinct, 8))
    phrases = bars[np.arange(distinct)[:, None], layout].reshape(distinct, PHRASE_STEPS, N_COLUMNS)
    return np.tile(pack_phrases(phrases), (-(-n // distinct), 1))[:n]


def ours(detector: LoopDetector, packed: np.ndarray) -> np.ndarray:
    packed = torch.from_numpy(packed)
    return torch.cat([detector.score_packed(chunk) for chunk in torch.split(packed, BATCH_SIZE)]).numpy()


def reference(detector: LoopDetector, packed: np.ndarray) -> np.ndarray:
    weights = [layer.weight.detach().numpy().astype(np.float64) for layer in detector.encoder if hasattr(layer, "weight")]
    center = detector.center.numpy().astype(np.float64)
    scores = np.empty(len(packed))
    for n, row in enumerate(packed):
        bars = np.unpackbits(row).reshape(8, BAR_CELLS)
        distances = np.array([np.count_nonzero(bars[i] != bars[j]) for i in range(8) for j in range(i + 1, 8)], float)
        x = 1.0 - distances / (distances.max() + 1e-5)
        for k, weight in enumerate(weights):
            x = weight @ x
            if k < len(weights) - 1:
                x = np.where(x > 0, x, 0.1 * x)
        scores[n] = np.mean((x - center) ** 2)
    return scores


def best_of(function, *args) -> tuple[float, np.ndarray]:
    """The shortest of ``REPEATS`` timed calls, and the result."""
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        result = function(*args)
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    detector = LoopDetector(pretrain_epochs=0, svdd_epochs=1).eval()
    detector.center.copy_(torch.linspace(-0.5, 0.5, 7))
    packed = make_packed(N_PHRASES)

    ours_s, fast = best_of(ours, detector, packed)
    reference_s, slow = best_of(reference, detector, packed)

    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-7)
    print(f"{N_PHRASES:,} packed phrases, one thread each, best of {REPEATS}")
    for name, seconds in (("ours (packed popcounts)", ours_s), ("reference (per-phrase numpy)", reference_s)):
        rate = N_PHRASES / seconds
        print(f"{name:30s} {rate:12,.0f} phrases/s; {PAPER_PHRASES:,} phrases would take {PAPER_PHRASES / rate / 60:8.2f} min")
    print(f"speed-up: {reference_s / ours_s:.1f}x")


if __name__ == "__main__":
    main()
