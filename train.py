"""Run one experiment: ``python train.py experiment=NAME [key=value ...]``.

Composes the configuration (``framework.config``), builds the DataModule, the LightningModule, the
callbacks, the logger and the Trainer from it (``framework.build``), then runs the configured
stages (``fit`` then ``test`` by default). Everything the run writes goes under ``run_dir``.

Several processes: ``trainer.devices=N trainer.strategy=ddp`` lets Lightning start the other ranks
(it reruns this script with the same arguments); an external launcher works as well, e.g.
``torchrun --nproc_per_node=N train.py ... trainer.devices=N trainer.strategy=ddp`` or one
``srun`` task per device. Either way every rank writes into rank zero's run directory.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

from framework.launch import separate_numba_cache, shared_run_dir

separate_numba_cache()  # before any import of numba

import pytorch_lightning as pl  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from pytorch_lightning.utilities.model_helpers import is_overridden  # noqa: E402

from framework.build import build_trainer, instantiate  # noqa: E402
from framework.cli import script_main  # noqa: E402
from framework.config import ConfigError, compose  # noqa: E402

# Lightning's ddp strategy relaunches this script once per extra rank. The children inherit the
# environment, so rank 0 publishes its resolved run directory here and they reuse it instead of
# stamping a run directory of their own.
RUN_DIR_ENV = "LOOPMIX_RUN_DIR"

# Each stage after fitting and the DataModule hook that must exist for it to run.
EVALUATION_LOADERS = {"validate": "val_dataloader", "test": "test_dataloader", "predict": "predict_dataloader"}
STAGES = ("fit", *EVALUATION_LOADERS)


def run(argv: Sequence[str]):
    """Run the experiment described by ``argv``; return (trainer, module, datamodule, cfg)."""
    argv = list(argv)
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited and "LOCAL_RANK" in os.environ:
        argv.append(f"run_dir={inherited}")
    cfg = compose(argv)
    agreed = shared_run_dir(cfg.run_dir)
    if agreed != cfg.run_dir:
        cfg = compose([*argv, f"run_dir={agreed}"])
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"stages: unknown stage(s) {unknown}; valid: {', '.join(STAGES)}.")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.datamodule, "datamodule")
    module = instantiate(cfg.model, "model")
    trainer = build_trainer(cfg, run_dir)
    if trainer.is_global_zero:
        OmegaConf.save(cfg, run_dir / "config.yaml")

    previous = os.environ.get(RUN_DIR_ENV)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    try:
        for stage in cfg.stages:
            _run_stage(stage, trainer, module, datamodule, cfg)
    finally:
        if previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous
    return trainer, module, datamodule, cfg


def _run_stage(stage: str, trainer: pl.Trainer, module, datamodule, cfg) -> None:
    if stage == "fit":
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        return
    if not is_overridden(EVALUATION_LOADERS[stage], datamodule):
        print(f"[train.py] skipping stage {stage!r}: the datamodule defines no {stage} data", file=sys.stderr)
        return
    fitted = "fit" in cfg.stages
    ckpt_path = _evaluation_checkpoint(trainer) if fitted else cfg.ckpt_path
    if stage == "predict":
        trainer.predict(module, datamodule=datamodule, ckpt_path=ckpt_path, return_predictions=False)
    else:
        getattr(trainer, stage)(module, datamodule=datamodule, ckpt_path=ckpt_path)


def _evaluation_checkpoint(trainer: pl.Trainer) -> str | None:
    """After fitting, evaluate the best checkpoint when one was selected by a monitor; else the
    weights in memory (None)."""
    callback = trainer.checkpoint_callback
    if callback is not None and callback.monitor and callback.best_model_path:
        return callback.best_model_path
    return None


def main(argv: Sequence[str] | None = None) -> int:
    return script_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
