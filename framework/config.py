"""Compose a run's configuration from YAML files and command-line overrides.

``python train.py experiment=vqvae trainer.devices=4 model.lr=3e-4`` is composed as

1. ``configs/base.yaml``;
2. one file per *config group*: a folder ``configs/<group>/`` whose file is chosen by a bare
   ``group=name`` argument (``experiment=vqvae``, ``logger=csv``); ``base.yaml``'s ``groups``
   mapping names the file used when the argument is absent; the group ``experiment`` is merged
   over the whole config, any other group replaces the node of its name. A file may start from
   others through a ``defaults`` mapping (see ``_load_group``);
3. the remaining ``key=value`` arguments (OmegaConf dotlist syntax), in order.

Struct mode is on for step 3: overriding a key that does not exist is an error naming the valid
keys at that level. ``+key=value`` adds a new key deliberately. Interpolations are resolved once,
so every rank and every checkpoint sees the same values (the run directory's timestamp included).
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

if not OmegaConf.has_resolver("now"):
    OmegaConf.register_resolver("now", lambda fmt: _dt.datetime.now().strftime(fmt), use_cache=True)
if not OmegaConf.has_resolver("add"):
    OmegaConf.register_resolver("add", lambda *terms: sum(terms))  # e.g. max_epochs = phase 1 + phase 2


class ConfigError(ValueError):
    """A command-line argument or config file that cannot be applied."""


def _split(argument: str) -> tuple[str, str]:
    if "=" not in argument:
        raise ConfigError(f"Argument {argument!r} is not of the form key=value.")
    key, value = argument.split("=", 1)
    if not key:
        raise ConfigError(f"Argument {argument!r} has an empty key.")
    return key, value


def _group_names(config_dir: Path) -> dict[str, list[str]]:
    return {
        folder.name: sorted(p.stem for p in folder.glob("*.yaml"))
        for folder in sorted(config_dir.iterdir())
        if folder.is_dir() and any(folder.glob("*.yaml"))
    }


def _load_group(config_dir: Path, groups: dict[str, list[str]], group: str, name: str,
                chain: tuple[str, ...] = ()) -> DictConfig:
    """Load ``configs/<group>/<name>.yaml`` with its ``defaults`` applied.

    A file's ``defaults`` mapping names files of other groups to start from: ``{datamodule:
    phrases}`` places ``configs/datamodule/phrases.yaml`` under the key ``datamodule``; a file's own
    group (``{experiment: mixer}`` in an experiment file) is inherited whole. The file's own keys
    are merged over those.
    """
    choices = groups.get(group, [])
    if name not in choices:
        raise ConfigError(f"Unknown {group} {name!r}; choose one of: {', '.join(choices)}.")
    here = f"{group}/{name}"
    if here in chain:
        raise ConfigError(f"Config defaults form a cycle: {' -> '.join((*chain, here))}.")
    node = OmegaConf.load(config_dir / group / f"{name}.yaml")
    defaults = node.pop("defaults", None) or {}
    merged = OmegaConf.create()
    for parent_group, parent_name in defaults.items():
        parent = _load_group(config_dir, groups, parent_group, parent_name, (*chain, here))
        merged = OmegaConf.merge(merged, parent if parent_group == group else {parent_group: parent})
    return OmegaConf.merge(merged, node)


def _check_key(cfg: DictConfig, dotted: str) -> None:
    """Raise ConfigError unless every component of ``dotted`` exists in ``cfg``."""
    node = cfg
    walked: list[str] = []
    for part in dotted.split("."):
        if isinstance(node, ListConfig):
            if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                where = ".".join(walked)
                raise ConfigError(f"Index {part!r} is out of range for the list {where!r} (length {len(node)}).")
            node = node[int(part)]
        elif isinstance(node, DictConfig) and part in node:
            node = node._get_node(part)
            node = node if isinstance(node, (DictConfig, ListConfig)) else None
        else:
            where = ".".join(walked) or "the top level"
            valid = sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []
            hint = f" Valid keys at {where}: {', '.join(valid)}." if valid else f" {where!r} holds no keys."
            raise ConfigError(f"Unknown config key {dotted!r}: {part!r} is not a key at {where}.{hint}"
                              " (Use +key=value to add a new key.)")
        walked.append(part)
        if node is None and walked != dotted.split("."):
            where = ".".join(walked)
            raise ConfigError(f"Unknown config key {dotted!r}: {where!r} is a value, not a mapping.")


def compose(argv: Sequence[str] = (), config_dir: Path = CONFIG_DIR) -> DictConfig:
    """Build the resolved, read-only run configuration from ``argv`` (see module docstring)."""
    config_dir = Path(config_dir)
    groups = _group_names(config_dir)
    cfg = OmegaConf.load(config_dir / "base.yaml")
    defaults = cfg.pop("groups", {})

    selected: dict[str, str] = {}
    overrides: list[tuple[str, str]] = []
    for argument in argv:
        key, value = _split(argument)
        if key in groups:
            selected[key] = value
        else:
            overrides.append((key, value))
    if "experiment" in groups and "experiment" not in selected:
        raise ConfigError(f"Choose an experiment with experiment=NAME; one of: {', '.join(groups['experiment'])}.")

    for group in groups:
        name = selected.get(group, defaults.get(group))
        if name is None:
            continue
        node = _load_group(config_dir, groups, group, name)
        if group == "experiment":
            cfg = OmegaConf.merge(cfg, node)
            cfg.experiment = name
        else:
            cfg[group] = node

    cfg = apply_overrides(cfg, overrides)
    OmegaConf.resolve(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def apply_overrides(cfg: DictConfig, arguments: Sequence[str | tuple[str, str]]) -> DictConfig:
    """Apply ``key=value`` arguments to ``cfg`` in order, in struct mode.

    An unknown key is a ConfigError naming the valid keys at its level; ``+key=value`` adds a key.
    Values are parsed as in an OmegaConf dotlist (``null``, numbers, lists, interpolations).
    """
    OmegaConf.set_struct(cfg, True)
    for argument in arguments:
        key, value = _split(argument) if isinstance(argument, str) else argument
        adding = key.startswith("+")
        key = key.lstrip("+")
        if not adding:
            _check_key(cfg, key)
        parsed = OmegaConf.select(OmegaConf.from_dotlist([f"{key}={value}"]), key)
        OmegaConf.set_struct(cfg, not adding)
        OmegaConf.update(cfg, key, parsed, merge=False)
        OmegaConf.set_struct(cfg, True)
    return cfg


def load_config(path: str | Path, argv: Sequence[str] = ()) -> DictConfig:
    """A stand-alone script's config: the YAML file at ``path`` with ``argv`` applied, resolved."""
    cfg = apply_overrides(OmegaConf.load(path), argv)
    OmegaConf.resolve(cfg)
    return cfg


def to_container(cfg: DictConfig) -> dict:
    """The config as plain Python containers (for kwargs, checkpoints and W&B)."""
    return OmegaConf.to_container(cfg, resolve=True)
