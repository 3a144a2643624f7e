"""Which checkpoints a run writes and which one its later stages use.

``last.ckpt`` holds the final weights of a fit; a second file holds the best by
``checkpoint.monitor`` when one is set. The best is recorded in the checkpoint callbacks' state
inside ``last.ckpt``, so the choice can be read back from the run folder alone.
"""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    """Writes ``last.ckpt`` every ``every_n_epochs`` epochs and once more when fitting ends at a step
    it has not saved (``every_n_epochs=0``, or a validation cadence that skips the final epoch).

    Lightning 2.6 rewrites a ``save_last`` file only at steps where a best checkpoint is saved, so
    beside a monitor it would stay a copy of the best and a resumed run would restart from that
    epoch; this callback keeps the last file its own.
    """

    def __init__(self, dirpath: str | Path, every_n_epochs: int = 1):
        super().__init__(dirpath=str(dirpath), filename="last", monitor=None, save_top_k=1,
                         every_n_epochs=every_n_epochs, enable_version_counter=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))


def selected_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint a finished ``train.py`` run in ``run_dir`` selected: the best by its monitor,
    read from the checkpoint callbacks' state in ``last.ckpt``, else ``last.ckpt`` itself; None
    when the run wrote no ``last.ckpt``."""
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return None
    state = torch.load(last, map_location="cpu", weights_only=False, mmap=True)
    for name, callback in state.get("callbacks", {}).items():
        best = callback.get("best_model_path") if name.startswith("ModelCheckpoint") else None
        if callback.get("monitor") and best:
            # Looked up beside last.ckpt: the recorded path is relative to the run's working folder.
            best = last.parent / Path(best).name
            if best.is_file():
                return best
    return last
