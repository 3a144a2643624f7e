"""Crash-safe file output: a file or folder either appears complete or not at all."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Works for files and folders alike: whatever the block writes at the yielded path replaces
    ``path`` in one ``os.replace`` (folders: the old one is removed first). An exception, or a
    killed process, leaves ``path`` untouched and at most a ``.tmp-*`` sibling behind, which a
    re-run ignores.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    tmp = tmp_dir / path.name
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def save_checkpoint(module, path: str | os.PathLike) -> str:
    """Save a LightningModule built outside a Trainer (untrained, or set by hand) as a checkpoint, atomically.

    ``type(module).load_from_checkpoint(path)`` restores it: the file holds its state dict and
    hyperparameters as a Trainer's checkpoint would.
    """
    import pytorch_lightning as pl
    import torch

    with atomic_path(path) as tmp:
        torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                    "pytorch-lightning_version": pl.__version__}, tmp)
    return str(path)
