"""Turn a composed configuration into Lightning objects: DataModule, module, callbacks, logger, Trainer."""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any, Mapping

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger

from framework.checkpoints import LastCheckpoint
from framework.config import ConfigError, to_container
from framework.seeding import RankSeeding


def instantiate(spec: Mapping[str, Any] | DictConfig, what: str) -> Any:
    """Import ``spec['_target_']`` and call it with the other keys as keyword arguments.

    ``what`` names the config node in error messages (``model``, ``callbacks.generation``).
    """
    kwargs = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else dict(spec)
    target = kwargs.pop("_target_", None)
    if not target:
        raise ConfigError(f"Config node {what!r} has no _target_ naming the class to build.")
    module_name, _, attr = target.rpartition(".")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"{what}._target_={target!r} cannot be imported: {err}") from err
    signature = inspect.signature(factory)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    unknown = sorted(set(kwargs) - set(signature.parameters))
    if unknown and not accepts_any:
        valid = ", ".join(n for n in signature.parameters if n not in ("self", "args", "kwargs"))
        raise ConfigError(f"{what}: {target} takes no argument(s) {', '.join(unknown)}. Valid: {valid}.")
    return factory(**kwargs)


class ConfigInCheckpoint(Callback):
    """Store the resolved run configuration in every checkpoint under the key ``config``."""

    def __init__(self, cfg: DictConfig):
        self.config = to_container(cfg)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["config"] = self.config


def build_logger(cfg: DictConfig, run_dir: Path) -> Logger | bool:
    """The logger named by ``cfg.logger.name``: ``wandb`` (default, offline unless told), ``csv``, ``none``."""
    options = to_container(cfg.logger)
    name = options.pop("name")
    if name == "none":
        return False
    if name == "csv":
        return CSVLogger(save_dir=str(run_dir), name="csv", version="")
    if name == "wandb":
        return WandbLogger(
            save_dir=str(run_dir),
            name=f"{cfg.experiment}/{run_dir.name}",
            config=to_container(cfg),
            **options,
        )
    raise ConfigError(f"logger.name={name!r} is not one of: wandb, csv, none.")


def build_callbacks(cfg: DictConfig, run_dir: Path, has_logger: bool) -> list[Callback]:
    """Checkpointing (the best by ``checkpoint.monitor`` when set, then ``last.ckpt``: see
    :mod:`framework.checkpoints`), the config-in-checkpoint hook, per-rank training noise, a
    learning-rate monitor, then the experiment's own callbacks. The best-checkpoint callback comes
    first so that the state stored in ``last.ckpt`` already names the best of the same epoch."""
    monitor = cfg.checkpoint.monitor
    every_n_epochs = cfg.checkpoint.every_n_epochs
    dirpath = str(run_dir / "checkpoints")
    callbacks: list[Callback] = []
    if monitor:
        callbacks.append(ModelCheckpoint(
            dirpath=dirpath, filename="epoch={epoch:03d}-step={step:07d}", auto_insert_metric_name=False,
            monitor=monitor, mode=cfg.checkpoint.mode, save_top_k=1, every_n_epochs=every_n_epochs,
        ))
    callbacks += [
        LastCheckpoint(dirpath, every_n_epochs=every_n_epochs),
        ConfigInCheckpoint(cfg),
        RankSeeding(cfg.seed),
    ]
    if has_logger:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    for name, spec in cfg.callbacks.items():
        if spec is not None:
            callbacks.append(instantiate(spec, f"callbacks.{name}"))
    return callbacks


def build_trainer(cfg: DictConfig, run_dir: Path) -> pl.Trainer:
    kwargs = {k: v for k, v in to_container(cfg.trainer).items() if v is not None}
    accelerator = kwargs.get("accelerator", "auto")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if kwargs.get("sync_batchnorm") and on_cpu:
        raise ConfigError("trainer.sync_batchnorm=true needs GPUs: SyncBatchNorm has no CPU implementation.")
    logger = build_logger(cfg, run_dir)
    return pl.Trainer(
        default_root_dir=str(run_dir),
        logger=logger,
        callbacks=build_callbacks(cfg, run_dir, has_logger=bool(logger)),
        **kwargs,
    )
