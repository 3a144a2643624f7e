"""Checkpoint files: ``last.ckpt`` is the final epoch, and the selection read back from a run folder
names the best by the monitor when one is set."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.demos.boring_classes import BoringModel

from framework.build import build_callbacks
from framework.checkpoints import selected_checkpoint


class ScoredModel(BoringModel):
    """Logs ``val/metric`` = ``sign * epoch``: the best (lowest) is the first epoch for sign 1, the last for -1."""

    def __init__(self, sign: float = 1.0):
        super().__init__()
        self.sign = sign

    def validation_step(self, batch, batch_idx):
        self.log("val/metric", self.sign * float(self.current_epoch), sync_dist=True)


def fit(tmp_path, monitor, max_epochs=4, sign=1.0, every_n_epochs=1, **trainer_options) -> pl.Trainer:
    cfg = OmegaConf.create({"seed": 0, "callbacks": {},
                            "checkpoint": {"monitor": monitor, "mode": "min", "every_n_epochs": every_n_epochs}})
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=max_epochs, limit_train_batches=2,
                         limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
                         callbacks=build_callbacks(cfg, tmp_path, has_logger=False), accelerator="cpu",
                         **trainer_options)
    trainer.fit(ScoredModel(sign))
    return trainer


def test_last_checkpoint_is_the_final_epoch_when_the_monitor_prefers_an_earlier_one(tmp_path):
    trainer = fit(tmp_path, "val/metric")
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["epoch"] == 3 and last["global_step"] == trainer.global_step == 8
    best = selected_checkpoint(tmp_path)
    assert str(best) == trainer.checkpoint_callback.best_model_path and best.name == "epoch=000-step=0000002.ckpt"


def test_selection_names_the_final_epoch_when_it_is_the_best(tmp_path):
    fit(tmp_path, "val/metric", sign=-1.0)
    assert selected_checkpoint(tmp_path).name == "epoch=003-step=0000008.ckpt"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch=003-step=0000008.ckpt", "last.ckpt"]


def test_without_a_monitor_only_the_last_checkpoint_is_kept(tmp_path):
    trainer = fit(tmp_path, None, max_epochs=3)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["last.ckpt"]
    assert selected_checkpoint(tmp_path) == tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(selected_checkpoint(tmp_path), weights_only=False)["global_step"] == trainer.global_step


@pytest.mark.parametrize("options", [{"every_n_epochs": 0}, {"every_n_epochs": 2}, {"check_val_every_n_epoch": 2}],
                         ids=["never-during-fit", "every-2nd-epoch", "validation-every-2nd-epoch"])
def test_last_checkpoint_holds_the_final_step_whatever_the_cadence(tmp_path, options):
    trainer = fit(tmp_path, None, max_epochs=3, **options)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == trainer.global_step == 6


def test_a_run_without_checkpoints_selects_none(tmp_path):
    assert selected_checkpoint(tmp_path) is None
