"""Our PRDC against the ``prdc`` package on 10,000 x 10,000 x 128 random features.

Both sides run in this process with the same thread count (``--threads``, default torch's, i.e.
the machine's cores): torch's intra-op threads for ours, the BLAS threads NumPy and scikit-learn
use for the reference (which also runs its own ``n_jobs=8`` joblib workers over them). The runs
alternate, reference then ours, ``--repeats`` times, and the best time of each side counts, so
load from other processes hits both alike; every run's values must agree to 1e-6. Also times
our PRDC once on 50,000 x 50,000 x 128 (the reference would need three 10 GB distance matrices)
and reports this process's peak memory after it. The last line is the speed-up over the reference.

    python benchmarks/prdc.py [--n 10000] [--large 50000] [--skip-large] [--repeats 3] [--threads T]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import sys
import time
from pathlib import Path

# The script's own folder comes first on sys.path, where this file would shadow the ``prdc``
# package it compares against: put the repository root there instead.
sys.path[0] = str(Path(__file__).resolve().parent.parent)
# OpenMP workers that spin at every barrier lose whole time slices when other processes share the
# cores, which would time the machine's load rather than the work; both sides wait passively
# (set before torch and scikit-learn load OpenMP; an explicit setting wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from prdc import compute_prdc  # noqa: E402
from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

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


def reference_prdc(real: np.ndarray, fake: np.ndarray) -> dict[str, float]:
    with contextlib.redirect_stdout(io.StringIO()):
        return {key: float(value) for key, value in compute_prdc(real, fake, K).items()}


def our_prdc(real: np.ndarray, fake: np.ndarray) -> dict[str, float]:
    return {key: value.item() for key, value in prdc(torch.from_numpy(real), torch.from_numpy(fake), K).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="samples per set for the comparison")
    parser.add_argument("--large", type=int, default=50_000, help="samples per set for the memory run")
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per side; the best counts")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for both sides")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    with threadpool_limits(limits=args.threads, user_api="blas"):
        blas = ", ".join(f"{pool['internal_api']} {pool['num_threads']}" for pool in threadpool_info()
                         if pool["user_api"] == "blas")
        print(f"threads: torch {torch.get_num_threads()}; reference BLAS {blas} (plus its joblib n_jobs=8); "
              f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")

        if not args.skip_large:
            # First, so the peak memory below is that of our blocked computation alone.
            real, fake = features(args.large, seed=1)
            large, seconds = timed(lambda: our_prdc(real, fake))
            print(f"ours {args.large:,} x {args.large:,} x {DIM}: {seconds:.1f} s, peak RSS {peak_rss_gib():.2f} GiB, "
                  + ", ".join(f"{key} {large[key]:.4f}" for key in PRDC_KEYS))
            del real, fake

        real, fake = features(args.n, seed=0)
        reference_times, our_times = [], []
        for _ in range(args.repeats):
            reference, seconds = timed(lambda: reference_prdc(real, fake))
            reference_times.append(seconds)
            ours, seconds = timed(lambda: our_prdc(real, fake))
            our_times.append(seconds)
            for key in PRDC_KEYS:
                assert abs(ours[key] - reference[key]) <= 1e-6, (key, ours[key], reference[key])

    print("values (equal to 1e-6): " + ", ".join(f"{key} {ours[key]:.5f}" for key in PRDC_KEYS))
    print(f"{args.n:,} x {args.n:,} x {DIM}, k={K}, best of {args.repeats} alternating runs: "
          f"prdc package {min(reference_times):.2f} s (all: {', '.join(f'{t:.2f}' for t in reference_times)}), "
          f"ours {min(our_times):.2f} s (all: {', '.join(f'{t:.2f}' for t in our_times)})")
    print(f"speed-up over the prdc package: {min(reference_times) / min(our_times):.2f}x")


if __name__ == "__main__":
    main()
