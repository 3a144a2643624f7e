"""What a process started as one rank of several needs before its work starts.

- :func:`separate_numba_cache`: numba's on-disk cache is not safe against two processes compiling
  the same function at once (a corrupt cache that crashes later runs); in a fresh environment the
  ranks of a job all compile librosa's and our cached functions at the same moment.
- :func:`shared_run_dir`: under an external launcher (``torchrun``, SLURM's ``srun``, LSF's
  ``jsrun``) every rank runs the script from the top and would stamp its own run directory.
  Lightning's own ``ddp`` launcher is handled by ``train.py`` itself: it starts the other ranks
  and hands them its run directory through the environment.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from lightning_fabric.plugins.environments import (
    ClusterEnvironment,
    LSFEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)

EXTERNAL_LAUNCHERS = (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment)


def separate_numba_cache() -> None:
    """Give this process a numba cache folder of its own when it is one of several ranks on a machine.

    The folder is ``<NUMBA_CACHE_DIR or ~/.cache/loopmix/numba>/rank-<local rank>``, so each rank
    keeps reusing its own cache across runs. Call before anything imports numba.
    """
    local_rank = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID"))
    if local_rank is None:
        return
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    base = Path(os.environ.get("NUMBA_CACHE_DIR") or cache_home / "loopmix" / "numba")
    os.environ["NUMBA_CACHE_DIR"] = str(base / f"rank-{local_rank}")


def external_cluster() -> ClusterEnvironment | None:
    """The environment of an external launcher that started this process as one of several ranks."""
    for environment in EXTERNAL_LAUNCHERS:
        if environment.detect():
            cluster = environment()
            if cluster.world_size() > 1:
                return cluster
    return None


def shared_run_dir(run_dir: str) -> str:
    """Rank zero's ``run_dir`` on every rank of an externally launched job (``run_dir`` otherwise).

    Joins the job's process group early, with the launcher's address, port, rank and world size
    (gloo for host objects, NCCL for CUDA tensors when there is a GPU); Lightning then uses that
    group instead of creating its own.
    """
    cluster = external_cluster()
    if cluster is None:
        return run_dir
    if not dist.is_initialized():
        os.environ["MASTER_ADDR"] = cluster.main_address
        os.environ["MASTER_PORT"] = str(cluster.main_port)
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, rank=cluster.global_rank(), world_size=cluster.world_size())
    shared = [run_dir]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]
