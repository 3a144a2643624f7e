"""Where a system's loops come from in the loop listening test.

A system is given by a path, or by a mapping ``{path: ..., class: ..., sampling: {...}}``:

- a phrase cache folder (``report.json`` and shards: the training set, the extracted loops); a
  draw reads only the drawn phrases from the shard files, so drawing from a cache of millions of
  phrases costs the memory of the draw;
- a ``generate.py`` output folder (its ``phrases.npz``), or such an ``.npz`` file;
- a generator checkpoint (``.ckpt``) of any class with ``sample(n, generator)`` and
  ``load_from_checkpoint`` (CNN-VAE, LSTM prior, Music Transformer, MuseGAN). The class is the
  mapping's ``class`` (``package.module.Class``) or else the ``model._target_`` that every
  ``train.py`` run records in its checkpoints; ``sampling`` holds further keyword arguments of
  ``sample`` (the prior's ``mode``, ``temperature``, ``top_k``, ``top_p``).
"""
from __future__ import annotations

import importlib
import inspect
import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np
import torch

from datamodules.pianoroll import N_COLUMNS, PHRASE_STEPS, REPORT_NAME, load_phrase_cache
from framework.config import ConfigError

SPEC_KEYS = ("path", "class", "sampling")


class PhraseSource(Protocol):
    """Draws phrases at random: ``draw(n, seed)`` gives (min(n, available), 128, 57) bool."""

    description: str

    def draw(self, n: int, seed: int) -> np.ndarray: ...


def draw_indices(available: int, n: int, seed: int) -> np.ndarray:
    """``min(n, available)`` distinct indices in random order; a larger ``n`` extends a smaller one."""
    return np.random.default_rng(seed).permutation(available)[:n]


def unpack(packed: np.ndarray) -> np.ndarray:
    return np.unpackbits(packed, axis=1).reshape(len(packed), PHRASE_STEPS, N_COLUMNS).astype(bool)


@dataclass
class PackedPhrases:
    """Phrases already in memory, bit-packed (a ``generate.py`` output's ``phrases.npz``)."""

    packed: np.ndarray
    description: str

    def draw(self, n: int, seed: int) -> np.ndarray:
        return unpack(self.packed[draw_indices(len(self.packed), n, seed)])


@dataclass
class PhraseCacheFolder:
    """A phrase cache folder; a draw reads only the drawn rows."""

    path: Path
    description: str = ""

    def __post_init__(self):
        self.description = self.description or f"phrase cache {self.path}"
        try:
            report = json.loads((self.path / REPORT_NAME).read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ConfigError(f"phrase cache {self.path}: {REPORT_NAME} cannot be read: {err}") from err
        shards = report.get("shards") if isinstance(report, dict) else None
        if not isinstance(shards, list):
            raise ConfigError(f"phrase cache {self.path}: {REPORT_NAME} lists no shards")

    def draw(self, n: int, seed: int) -> np.ndarray:
        try:
            packed = load_phrase_cache(self.path).packed
            return unpack(packed[draw_indices(len(packed), n, seed)])
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
            raise ConfigError(f"phrase cache {self.path} cannot be read: {err}") from err


@dataclass
class GeneratorCheckpoint:
    """A trained generator, sampled with a seeded ``torch.Generator`` on ``device``."""

    path: Path
    module_class: type
    sampling: dict = field(default_factory=dict)
    device: str = "cpu"
    where: str = "systems"  # the config key naming this source, for error messages

    @property
    def description(self) -> str:
        extra = f" sampling {self.sampling}" if self.sampling else ""
        return f"{self.module_class.__name__} checkpoint {self.path}{extra}"

    def draw(self, n: int, seed: int) -> np.ndarray:
        device = torch.device(self.device)
        class_name = f"{self.module_class.__module__}.{self.module_class.__qualname__}"
        try:
            module = self.module_class.load_from_checkpoint(self.path, map_location=device).eval()
        except (RuntimeError, TypeError, KeyError, ValueError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"{self.where}: {self.path} cannot be loaded as {class_name}: {reason}") from err
        generator = torch.Generator(device=device).manual_seed(seed)
        try:
            with torch.no_grad():
                phrases = module.sample(n, generator, **self.sampling)
        except ValueError as err:  # a sampling value the module rejects (mode, top_k, ...)
            raise ConfigError(f"{self.where}: sampling {self.sampling}: {err}") from err
        return phrases.bool().cpu().numpy()


def import_class(name: str, where: str) -> type:
    module_name, _, attr = name.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"{where}: class {name!r} cannot be imported: {err}") from err
    if not (hasattr(found, "sample") and hasattr(found, "load_from_checkpoint")):
        raise ConfigError(f"{where}: {name} has no sample(n, generator) and load_from_checkpoint")
    return found


def check_sampling(module_class: type, sampling: Mapping[str, Any], where: str) -> None:
    """``sampling``'s keys must be keyword arguments of ``module_class.sample`` beyond ``n`` and ``generator``."""
    parameters = dict(inspect.signature(module_class.sample).parameters)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    valid = [name for name in parameters if name not in ("self", "n", "generator")]
    unknown = sorted(set(sampling) - set(valid))
    if unknown:
        raise ConfigError(f"{where}: sampling: unknown keys {unknown}; {module_class.__name__}.sample takes "
                          f"{', '.join(valid) or 'none'}")


def recorded_class(path: Path, where: str) -> str:
    """The ``model._target_`` a ``train.py`` run stored in the checkpoint's config."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ConfigError(f"{where}: {path} cannot be read as a checkpoint: {err}") from err
    target = ((checkpoint.get("config") or {}).get("model") or {}).get("_target_")
    if not target:
        raise ConfigError(f"{where}: {path} records no model class (config.model._target_); "
                          f"name it: {{path: {path}, class: package.module.Class}}")
    return target


def resolve_source(name: str, spec: Any, device: str = "cpu") -> PhraseSource:
    """The source of system ``name`` from its path or mapping (see the module docstring)."""
    where = f"systems.{name}"
    options: Mapping[str, Any] = spec if isinstance(spec, Mapping) else {"path": spec}
    unknown = sorted(set(options) - set(SPEC_KEYS))
    if unknown or options.get("path") is None:
        raise ConfigError(f"{where} must be a path or a mapping with `path` (and for a checkpoint `class`, "
                          f"`sampling`); got {dict(options)!r}; valid keys: {', '.join(SPEC_KEYS)}")
    path = Path(options["path"])
    is_checkpoint = path.is_file() and path.suffix == ".ckpt"
    if not is_checkpoint and (options.get("class") or options.get("sampling")):
        raise ConfigError(f"{where}: `class` and `sampling` apply to checkpoints only, {path} is not a .ckpt file")
    if is_checkpoint:
        module_class = import_class(options.get("class") or recorded_class(path, where), where)
        sampling = dict(options.get("sampling") or {})
        check_sampling(module_class, sampling, where)
        return GeneratorCheckpoint(path, module_class, sampling, device, where)
    if (path / REPORT_NAME).is_file():
        return PhraseCacheFolder(path)
    npz = path / "phrases.npz" if path.is_dir() else path
    if npz.is_file() and npz.suffix == ".npz":
        try:
            with np.load(npz) as arrays:
                return PackedPhrases(arrays["packed"], f"generated phrases {npz}")
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
            raise ConfigError(f"{where}: {npz} holds no readable `packed` phrases: {err}") from err
    raise ConfigError(f"{where}={path}: not a phrase cache folder (no {REPORT_NAME}), a generate.py output "
                      "(no phrases.npz) or a .ckpt file")
