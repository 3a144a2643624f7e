"""What the thin top-level scripts share: exit codes for bad configs and output-folder checks."""
from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import DictConfig

from framework.config import ConfigError
from framework.errors import InputError


def script_main(run: Callable[[list[str]], Any], argv: Sequence[str] | None = None,
                report: Callable[[Any], int | None] | None = None) -> int:
    """Call ``run(argv)`` (default: the command line); a ConfigError or an InputError prints one line
    and gives exit code 2 instead of a traceback. ``report`` receives the result and may return an
    exit code."""
    try:
        result = run(sys.argv[1:] if argv is None else list(argv))
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except InputError as err:
        print(f"input error: {err}", file=sys.stderr)
        return 2
    return (report(result) or 0) if report else 0


def check_checkpoints(cfg: DictConfig, keys: Sequence[str]) -> None:
    """Every key of ``keys`` that is set must name an existing checkpoint file."""
    for key in keys:
        if cfg[key] is not None and not Path(cfg[key]).is_file():
            raise ConfigError(f"{key}={cfg[key]}: no such checkpoint file")


# What loading a file that is not a checkpoint of the expected class raises: unpickling errors,
# missing hyperparameters or state-dict keys, mismatched shapes.
CHECKPOINT_ERRORS = (OSError, RuntimeError, EOFError, KeyError, ValueError, TypeError, AttributeError,
                     pickle.UnpicklingError)


def load_checkpoint(module_class: type, path: str | Path, device: Any = "cpu", key: str | None = None):
    """``module_class.load_from_checkpoint(path)`` on ``device``; an :class:`InputError` naming the
    file (and the config ``key`` that gave it) when it is missing or is not a checkpoint of that class."""
    where = f"{key}={path}" if key else str(path)
    if not Path(path).is_file():
        raise InputError(f"{where}: no such checkpoint file")
    try:
        return module_class.load_from_checkpoint(path, map_location=device)
    except CHECKPOINT_ERRORS as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise InputError(f"{where}: not a readable {module_class.__name__} checkpoint "
                         f"({type(error).__name__}: {first_line})") from error


def check_output_folder(out: str | Path, overwrite: bool) -> None:
    """``out`` must be absent or an empty folder, unless ``overwrite`` (then it is replaced)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"out={out} exists and is not empty; choose another folder or pass overwrite=true")
