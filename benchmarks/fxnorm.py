"""FxNorm speed on one synthesised 3-minute, 4-stem, 44.1 kHz stereo song, on one core.

The stems are float32, as ``read_song`` reads them from WAV files, and each effect runs through
``FxNormalizer.normalize_stem`` on the previous effect's output: together the same work as
``FxNormalizer.normalize_song``, whose result is asserted equal. Times are CPU seconds of this
process (user + system, single-threaded), robust to other load on a shared machine; wall time
is printed beside them. Prints each effect's and the whole chain's real-time factor (audio
seconds per compute second), and the DRC compressor search against the exhaustive grid scan
(same setting asserted). The last line is the total.
"""
import os

for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_variable] = "1"

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from datamodules.demo.multitrack import process_stem, synthesize_song  # noqa: E402
from datamodules.fxnorm import STAGES, FxNormalizer, exhaustive_compressor_search, search_compressor  # noqa: E402
from datamodules.fxnorm.drc import ATTACK_RELEASE_MS, RATIO_START, onset_peak_stats, peak_normalize  # noqa: E402
from datamodules.fxnorm.normalizer import stem_rng  # noqa: E402

SR = 44100
SECONDS = 180.0


def main() -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    song = {kind: process_stem(audio, kind, SR, rng).astype(np.float32) for kind, audio in synthesize_song(rng, SECONDS).items()}
    seconds = next(iter(song.values())).shape[1] / SR
    normalizer = FxNormalizer.fit([{k: v[:, : 20 * SR] for k, v in song.items()}], SR, progress=False)
    normalizer.normalize_song({k: v[:, :SR] for k, v in song.items()}, SR)  # compile and warm up

    stems = dict(song)
    total = total_wall = 0.0
    for stage in STAGES:
        start, start_wall = time.process_time(), time.perf_counter()
        stems = {k: normalizer.normalize_stem(k, v, SR, stem_rng(0, "", k), stages=(stage,)) for k, v in stems.items()}
        elapsed, wall = time.process_time() - start, time.perf_counter() - start_wall
        total += elapsed
        total_wall += wall
        print(f"{stage:>8}: {seconds / elapsed:7.1f}x real time ({elapsed:.2f} s CPU, {wall:.2f} s wall)")
    whole = normalizer.normalize_song(song, SR, seed=0)
    for kind in song:
        np.testing.assert_array_equal(whole[kind], stems[kind])

    kind = "drums"
    attack, release = ATTACK_RELEASE_MS[kind]
    measured = peak_normalize(song[kind])
    target = onset_peak_stats(measured, SR)[0] - 1.5  # forces a search of a few grid steps
    start = time.process_time()
    fast, fast_runs = search_compressor(measured, SR, target, RATIO_START[kind], attack, release)
    fast_time = time.process_time() - start
    start = time.process_time()
    grid, grid_runs = exhaustive_compressor_search(measured, SR, target, RATIO_START[kind], attack, release)
    grid_time = time.process_time() - start
    assert fast == grid, (fast, grid)
    print(f"DRC search ({kind}, target {target:.2f} dB -> {fast.ratio:g}:1 at {fast.threshold_db:g} dB): "
          f"binary {fast_runs} runs {fast_time:.2f} s, exhaustive {grid_runs} runs {grid_time:.2f} s, "
          f"{grid_time / fast_time:.1f}x faster")
    print(f"chain wall time: {total_wall:.2f} s ({seconds / total_wall:.1f}x real time)")
    print(f"total: {seconds / total:.1f}x real time")


if __name__ == "__main__":
    main()
