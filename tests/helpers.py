"""Run experiments from tests: in-process, or as a multi-process DDP job on CPU."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import pytorch_lightning as pl
import torch

from framework.io import save_checkpoint  # noqa: F401  (tests save untrained modules with it)

REPO = Path(__file__).resolve().parent.parent

# Per experiment, arguments that shrink one training step to seconds on a CPU.
QUICK = {
    "loop_detector": ["model.pretrain_epochs=1", "model.svdd_epochs=1"],
    "vqvae": ["trainer.max_epochs=1", "datamodule.batch_size=64"],
    "cnn_vae": ["trainer.max_epochs=1", "datamodule.batch_size=64", "callbacks.generation.every_n_epochs=1",
                "callbacks.generation.n_samples=32", "callbacks.generation.n_networks=2"],
    "prior": ["trainer.max_epochs=1", "datamodule.batch_size=64", "model.hidden=64", "model.layers=1",
              "callbacks.generation.every_n_epochs=1", "callbacks.generation.n_samples=32",
              "callbacks.generation.n_networks=2"],
    "music_transformer": ["trainer.max_epochs=1", "model.hidden=32", "model.layers=1", "model.feed_forward=64",
                          "callbacks.generation.n_samples=32", "callbacks.generation.n_networks=2"],
    "musegan": ["trainer.max_epochs=1", "model.generator_width=32", "model.critic_width=16",
                "callbacks.generation.n_samples=32", "callbacks.generation.n_networks=2"],
    "mixer_paper": ["datamodule.batch_size=1", "trainer.precision=32-true"],
}


def load_packed_in_memory(cache) -> np.ndarray:
    """A phrase cache's packed phrases, every shard loaded whole and concatenated: the plain
    in-memory reading that the on-demand reading must reproduce."""
    import json

    import numpy as np

    cache = Path(cache)
    shards = json.loads((cache / "report.json").read_text())["shards"]
    return np.concatenate([np.zeros((0, 912), np.uint8), *(np.load(cache / shard)["packed"] for shard in shards)])


def run_train(args: Sequence[str]):
    """Run ``train.py`` in this process; return (trainer, module, datamodule, cfg)."""
    import train

    return train.run(list(args))


def _subprocess_env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "WANDB_SILENT": "true",
            "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _failure(command: Sequence[str], result: subprocess.CompletedProcess) -> str:
    return f"{' '.join(command)} exited with {result.returncode}:\n{(result.stdout + result.stderr)[-6000:]}"


def run_train_subprocess(args: Sequence[str], devices: int = 2, timeout: float = 600,
                         accelerator: str = "cpu") -> subprocess.CompletedProcess:
    """Run ``train.py`` as ``devices`` processes with the ``ddp`` strategy (gloo on CPUs).

    Lightning's plain ``ddp`` relaunches the script for every extra rank, so the job has to start
    as a subprocess of the test rather than inside it. Raises AssertionError with the end of the
    job's output when it fails.
    """
    command = [
        sys.executable, str(REPO / "train.py"), *args,
        f"trainer.accelerator={accelerator}", f"trainer.devices={devices}", "trainer.strategy=ddp",
        "trainer.enable_progress_bar=false",
    ]
    result = subprocess.run(command, cwd=REPO, env=_subprocess_env(), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(_failure(command, result))
    return result


def run_torchrun(args: Sequence[str], nproc: int = 2, timeout: float = 600,
                 accelerator: str = "cpu") -> subprocess.CompletedProcess:
    """Run ``train.py`` under ``torchrun --standalone`` as ``nproc`` processes (gloo on CPUs); the
    result is returned whatever the exit code."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(REPO / "train.py"), *args, f"trainer.accelerator={accelerator}", f"trainer.devices={nproc}",
        "trainer.strategy=ddp", "trainer.enable_progress_bar=false",
    ]
    return subprocess.run(command, cwd=REPO, env=_subprocess_env(), capture_output=True, text=True, timeout=timeout)


def assert_succeeded(result: subprocess.CompletedProcess) -> None:
    if result.returncode != 0:
        raise AssertionError(_failure(result.args, result))


class RecordNoise(pl.Callback):
    """Saves, per rank, the first values the global RNG gives in training (``noise-rank<R>.pt``)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0 and trainer.current_epoch == 0:
            torch.save(torch.rand(8), Path(trainer.default_root_dir) / f"noise-rank{trainer.global_rank}.pt")


class KillRank(pl.Callback):
    """Kills its own process (SIGKILL, as the out-of-memory killer would) on rank 1 at the second
    training batch, while the other ranks carry on into the next gradient all-reduce."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == 1 and batch_idx == 1:
            os.kill(os.getpid(), signal.SIGKILL)


class ParametersAgreeAcrossRanks(pl.Callback):
    """For multi-process tests: at the end of fitting, fail unless every rank holds the same parameters;
    rank 0 then writes ``<default_root_dir>/ranks_agree.txt``. Add it to a run with
    ``+callbacks.NAME._target_=tests.helpers.ParametersAgreeAcrossRanks``."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        if not all(torch.equal(gathered[0], other) for other in gathered[1:]):
            raise AssertionError("parameters differ across ranks after training")
        if trainer.is_global_zero:
            Path(trainer.default_root_dir, "ranks_agree.txt").write_text(f"{trainer.world_size} ranks agree")
