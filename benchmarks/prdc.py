"""Our chunked torch PRDC against the ``prdc`` package on 10,000 x 10,000 x 128 random features.

Both run in this process with the machine's default thread count (torch's and NumPy/scikit-learn's
own); the values must agree to 1e-6. Also times our PRDC once on 50,000 x 50,000 x 128 (the
reference would need three 10 GB distance matrices) and reports this process's peak memory.
The last line is the speed-up over the reference.

    python benchmarks/prdc.py [--large 50000] [--skip-large]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import resource
import sys
import time
from pathlib import Path

# The script's own folder comes first on sys.path, where this file would shadow the ``prdc``
# package it compares against: put the repository root there instead.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from prdc import compute_prdc  # noqa: E402

from callbacks.metrics import PRDC_KEYS, prdc  # noqa: E402

DIM, K = 128, 5


def features(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    real = rng.standard_normal((n, DIM), dtype=np.float32)
    fake = (rng.standard_normal((n, DIM), dtype=np.float32) * 1.05 + 0.05).astype(np.float32)
    return real, fake


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="samples per set for the comparison")
    parser.add_argument("--large", type=int, default=50_000, help="samples per set for the memory run")
    parser.add_argument("--skip-large", action="store_true")
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")

    if not args.skip_large:
        # First, so the peak memory below is that of our chunked computation alone.
        real, fake = (torch.from_numpy(x) for x in features(args.large, seed=1))
        large, seconds = timed(lambda: prdc(real, fake, K))
        print(f"ours {args.large:,} x {args.large:,} x {DIM}: {seconds:.1f} s, peak RSS {peak_rss_gib():.2f} GiB, "
              + ", ".join(f"{key} {large[key].item():.4f}" for key in PRDC_KEYS))
        del real, fake

    real, fake = features(args.n, seed=0)
    with contextlib.redirect_stdout(io.StringIO()):
        reference, reference_seconds = timed(lambda: compute_prdc(real, fake, K))
    ours, our_seconds = timed(lambda: prdc(torch.from_numpy(real), torch.from_numpy(fake), K))
    for key in PRDC_KEYS:
        assert abs(ours[key].item() - float(reference[key])) <= 1e-6, (key, ours[key].item(), reference[key])
    print("values (equal to 1e-6): " + ", ".join(f"{key} {ours[key].item():.5f}" for key in PRDC_KEYS))
    print(f"{args.n:,} x {args.n:,} x {DIM}, k={K}: prdc package {reference_seconds:.2f} s, ours {our_seconds:.2f} s")
    print(f"speed-up over the prdc package: {reference_seconds / our_seconds:.2f}x")


if __name__ == "__main__":
    main()
