"""Paper-scale data: loop extraction and evaluation on a synthetic cache of the paper's size, peak RSS per process.

Writes a synthetic phrase cache of 5,687,274 phrases (the paper's count; ``--phrases N`` for fewer)
in the real format, as ingest lays it out (256 source files a shard, 32 phrases a file on average,
bars that repeat in some phrases and not in others), and a loop detector whose threshold keeps the
paper's share of phrases (751,935 of 5,687,274). Then, each in processes of its own:

1. extraction, ``train.py experiment=extract_loops`` on ``--devices`` CPU processes (DDP over gloo);
2. evaluation, ``evaluate.py`` against a training cache of 751,935 loops (``--loops N``), the paper's
   subset sizes (n = 10,000 phrases per model, 10,000 per side for P/R/D/C) and small untrained
   generators (their size does not depend on the data). To keep the run short on a CPU it averages
   2 random CNNs instead of 10 and has one prior row and a 3-threshold rejection sweep of the
   CNN-VAE; every repeat and row holds the same data, so memory is that of the full protocol
   (``--eval-arg key=value`` restores any setting, e.g. ``--eval-arg n_networks=10``).

Every Python process of a stage, DDP children included, records its own peak resident set
(``VmHWM``) when it exits, through a ``sitecustomize`` hook on ``PYTHONPATH``. Targets:
extraction <= 1.5 GiB per process, evaluation <= 3 GiB, against the 5.2 GB of packed phrases a rank
held when it loaded the whole cache. The caches live in ``--workdir`` (a temporary folder by
default) and are deleted unless ``--keep``; at most one large cache exists at a time. Prints wall
time, phrases/s and peak RSS per process of each stage; the peak RSS line is last.

    python benchmarks/scale.py                         # the paper's sizes (about 6 GB of disk)
    python benchmarks/scale.py --phrases 500000 --loops 100000 --devices 1
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from datamodules.correlation import c_midi_packed  # noqa: E402
from datamodules.pianoroll import PACKED_BYTES, load_phrase_cache  # noqa: E402
from datamodules.pianoroll.cache import SHARD_PATTERN, write_report, write_shard  # noqa: E402
from framework.io import save_checkpoint  # noqa: E402

PAPER_PHRASES = 5_687_274
PAPER_LOOPS = 751_935
LAKH_FILES = 176_581
FILES_PER_SHARD = 256  # ingest's default chunk size
BAR_BYTES = PACKED_BYTES // 8  # a bar is 16 steps x 57 columns = 114 bytes of the packed row
GIB = 2**30
EXTRACTION_TARGET, EVALUATION_TARGET = 1.5 * GIB, 3.0 * GIB

# The peak RSS of the process itself: VmHWM of its own address space. ru_maxrss is not used: exec
# carries the parent's peak over into it (a child of a large process starts "large").
_RSS_HOOK = r'''import atexit, os, resource, sys


def _record_peak_rss():
    try:
        with open("/proc/self/status") as status:
            peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(os.path.join({folder!r}, f"{{os.getpid()}}.txt"), "w") as handle:
        handle.write(f"{{peak}}\n{{os.environ.get('LOCAL_RANK', '0')}}\n{{' '.join(sys.argv)}}")


atexit.register(_record_peak_rss)
'''


def write_synthetic_cache(out: Path, phrases: int, seed: int = 0, progress: bool = True) -> Path:
    """A phrase cache of ``phrases`` synthetic phrases in ingest's layout: shards of 256 source files
    holding about 32 phrases each; a third of the phrases repeat one, two or four bars, the rest
    draw eight bars independently, from a pool of 16,384 sparse random bars."""
    rng = np.random.default_rng(seed)
    bars = np.packbits(rng.random((16_384, BAR_BYTES * 8)) < 0.06, axis=1)
    n_files = max(1, round(phrases * LAKH_FILES / PAPER_PHRASES))
    per_file = rng.multinomial(phrases, np.full(n_files, 1 / n_files))
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for number, first in enumerate(tqdm(range(0, n_files, FILES_PER_SHARD), desc="synthetic shards", disable=not progress)):
        counts = per_file[first : first + FILES_PER_SHARD]
        rows = int(counts.sum())
        layout = rng.integers(0, len(bars), size=(rows, 8))
        period = rng.choice([1, 2, 4, 8], size=rows, p=[0.12, 0.11, 0.1, 0.67])
        layout = np.take_along_axis(layout, np.arange(8)[None, :] % period[:, None], axis=1)
        names = [f"synthetic/{first + i:06d}.mid" for i in range(len(counts))]
        shard = SHARD_PATTERN.format(number)
        write_shard(out / shard, bars[layout].reshape(rows, PACKED_BYTES), np.repeat(np.arange(len(counts)), counts),
                    np.concatenate([np.zeros(0, np.int64), *(np.arange(c) for c in counts)]), names, counts,
                    [""] * len(counts))
        shards.append(shard)
    write_report(out, {"files_seen": n_files, "files_used": int(np.count_nonzero(per_file)), "phrases": phrases,
                       "skipped": {}, "skipped_examples": {}, "shards": shards, "source": "synthetic"})
    return out


def synthetic_detector(path: Path, cache: Path, kept_fraction: float, seed: int = 0) -> Path:
    """An untrained loop detector centred on a sample of ``cache``, its threshold at the sample's
    ``kept_fraction`` quantile of scores, saved as a checkpoint."""
    from lightning_modules.loop_detector import LoopDetector

    packed = load_phrase_cache(cache).packed
    sample = np.sort(np.random.default_rng(seed).choice(len(packed), min(len(packed), 65_536), replace=False))
    torch.manual_seed(seed)
    detector = LoopDetector(pretrain_epochs=0, svdd_epochs=1).eval()
    with torch.no_grad():
        correlations = c_midi_packed(torch.from_numpy(packed[sample]))
        detector.center.copy_(detector.encoder(correlations).mean(dim=0))
        scores = detector.loop_score(correlations)
    detector.score_threshold.fill_(float(torch.quantile(scores, kept_fraction)))
    return Path(save_checkpoint(detector, path))


def small_generators(folder: Path, seed: int = 0) -> dict[str, str]:
    """Untrained CNN-VAE, VQ-VAE and LSTM prior checkpoints of a few thousand weights each."""
    from lightning_modules.cnn_vae import CNNVAE
    from lightning_modules.prior import LSTMPrior
    from lightning_modules.vqvae import VQVAE

    torch.manual_seed(seed)
    vqvae = save_checkpoint(VQVAE(channels=8, num_codes=16, code_dim=4), folder / "vqvae.ckpt")
    prior = LSTMPrior(vqvae_ckpt=vqvae, num_codes=16, embed_dim=8, hidden=16, layers=1,
                      first_index_distribution=torch.ones(16))
    return {"cnn_vae": save_checkpoint(CNNVAE(channels=8, latent_dim=16), folder / "cnn_vae.ckpt"),
            "prior": save_checkpoint(prior, folder / "prior.ckpt"), "vqvae": vqvae}


@dataclass
class Measured:
    """A finished stage: wall time and the peak RSS in bytes of each of its Python processes, by local rank."""

    seconds: float
    peaks: dict[int, int]

    @property
    def largest(self) -> int:
        return max(self.peaks.values())


def run_measured(command: list[str], workdir: Path, threads: int) -> Measured:
    """Run ``command`` (a Python script) from the repository root; every Python process it starts
    records its peak RSS. Raises with the end of the output if it fails."""
    hook = Path(tempfile.mkdtemp(prefix="rss-hook-", dir=workdir))
    records = hook / "peaks"
    records.mkdir()
    (hook / "sitecustomize.py").write_text(_RSS_HOOK.format(folder=str(records)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} exited with {result.returncode}:\n{(result.stdout + result.stderr)[-4000:]}")
    peaks = {}
    for record in records.iterdir():
        peak, rank, argv = record.read_text().split("\n", 2)
        if Path(command[1]).name in argv:  # the stage's own processes, not helpers they may start
            peaks[int(rank)] = int(peak)
    shutil.rmtree(hook)
    return Measured(seconds, peaks)


def extraction_command(cache: Path, detector: Path, out: Path, run_dir: Path, devices: int) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "experiment=extract_loops", f"detector={detector}",
            f"phrases={cache}", f"out={out}", f"run_dir={run_dir}", "logger=none", "trainer.accelerator=cpu",
            f"trainer.devices={devices}", *(["trainer.strategy=ddp"] if devices > 1 else []),
            "trainer.enable_progress_bar=false", f"paths.demo={run_dir / 'no-demo'}"]


def evaluation_command(training: Path, detector: Path, generators: dict[str, str], out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, str(REPO / "evaluate.py"), f"training={training}", f"detector={detector}",
            *(f"{name}={path}" for name, path in generators.items()), f"out={out}", "n_networks=2",
            "prior_sampling=[{mode: top_k, k: 30}]", "rejection.generators=[CNN-VAE]",
            "rejection.thresholds=[null,1.0,0.1]", "rejection.max_rounds=10", *extra]


def gib(size: float) -> str:
    return f"{size / GIB:.2f} GiB"


def describe(measured: Measured) -> str:
    if len(measured.peaks) == 1:
        return gib(measured.largest)
    return ", ".join(f"rank {rank} {gib(peak)}" for rank, peak in sorted(measured.peaks.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phrases", type=int, default=PAPER_PHRASES, help="phrases in the cache extraction scores")
    parser.add_argument("--loops", type=int, default=PAPER_LOOPS, help="training loops evaluation compares with")
    parser.add_argument("--devices", type=int, default=2, help="extraction processes (ddp over gloo when > 1)")
    parser.add_argument("--workdir", type=Path, default=None, help="folder (made if missing) for the temporary folder of caches (default: the system's)")
    parser.add_argument("--keep", action="store_true", help="keep the caches and outputs in --workdir")
    parser.add_argument("--eval-arg", action="append", default=[], help="extra evaluate.py key=value (repeatable)")
    args = parser.parse_args()
    if args.workdir is None and args.keep:
        parser.error("--keep needs --workdir")
    threads = max(1, (os.cpu_count() or 1) // args.devices)

    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="loopmix-scale-", dir=args.workdir))
    try:
        phrases = workdir / "phrases"
        start = time.perf_counter()
        write_synthetic_cache(phrases, args.phrases)
        shards = len(load_phrase_cache(phrases).packed.shards)
        print(f"synthetic phrase cache: {args.phrases:,} phrases in {shards} shards "
              f"({args.phrases * PACKED_BYTES / 1e9:.2f} GB packed), written in {time.perf_counter() - start:.0f} s")
        detector = synthetic_detector(workdir / "detector.ckpt", phrases, PAPER_LOOPS / PAPER_PHRASES)

        extraction = run_measured(extraction_command(phrases, detector, workdir / "loops", workdir / "extract", args.devices),
                                  workdir, threads)
        kept = len(load_phrase_cache(workdir / "loops"))
        print(f"extraction (train.py experiment=extract_loops, {args.devices} process(es), {threads} thread(s) each): "
              f"{extraction.seconds:.0f} s, {args.phrases / extraction.seconds:,.0f} phrases/s, {kept:,} loops kept")
        print(f"  peak RSS: {describe(extraction)} (target <= {gib(EXTRACTION_TARGET)} per process)")
        if len(extraction.peaks) != args.devices:
            raise RuntimeError(f"{len(extraction.peaks)} extraction processes recorded their peak RSS, expected {args.devices}")
        shutil.rmtree(phrases)  # one large cache at a time

        training = write_synthetic_cache(workdir / "training_loops", args.loops, seed=1, progress=False)
        generators = small_generators(workdir)
        evaluation = run_measured(evaluation_command(training, detector, generators, workdir / "evaluation", args.eval_arg),
                                  workdir, os.cpu_count() or 1)
        print(f"evaluation (evaluate.py, {args.loops:,} training loops): {evaluation.seconds:.0f} s, "
              f"{args.loops / evaluation.seconds:,.0f} training loops/s")
        print(f"  peak RSS: {describe(evaluation)} (target <= {gib(EVALUATION_TARGET)})")
        print(f"peak RSS: extraction {gib(extraction.largest)} per process (largest of {len(extraction.peaks)}), "
              f"evaluation {gib(evaluation.largest)}")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
