"""Checkpoint selection: ``last.ckpt`` is the final epoch even when a monitor prefers an earlier one."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.demos.boring_classes import BoringModel

from framework.build import build_callbacks
from pipeline import evaluation_checkpoint


class WorseningModel(BoringModel):
    """Its validation metric grows every epoch, so the best checkpoint is the first one."""

    def validation_step(self, batch, batch_idx):
        self.log("val/metric", float(self.current_epoch), sync_dist=True)


def fit(tmp_path, monitor, max_epochs=4) -> pl.Trainer:
    cfg = OmegaConf.create({"seed": 0, "callbacks": {},
                            "checkpoint": {"monitor": monitor, "mode": "min", "every_n_epochs": 1}})
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=max_epochs, limit_train_batches=2,
                         limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
                         callbacks=build_callbacks(cfg, tmp_path, has_logger=False), accelerator="cpu")
    trainer.fit(WorseningModel())
    return trainer


def test_last_checkpoint_is_the_final_epoch_and_names_the_best(tmp_path):
    trainer = fit(tmp_path, "val/metric")
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["epoch"] == 3 and last["global_step"] == trainer.global_step == 8
    best = evaluation_checkpoint(tmp_path)
    assert best == trainer.checkpoint_callback.best_model_path and best.endswith("epoch=000-step=0000002.ckpt")
    assert torch.load(best, weights_only=False)["epoch"] == 0


def test_without_a_monitor_only_the_last_checkpoint_is_kept(tmp_path):
    trainer = fit(tmp_path, None, max_epochs=3)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["last.ckpt"]
    assert evaluation_checkpoint(tmp_path) == str(tmp_path / "checkpoints" / "last.ckpt")
    assert torch.load(evaluation_checkpoint(tmp_path), weights_only=False)["global_step"] == trainer.global_step
