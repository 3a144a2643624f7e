"""Shared fixtures: offline W&B, and the demo data generated once per test session."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """The MIDI and audio-loop parts of the built-in demo data, made once per session."""
    from datamodules.demo import ensure_demo_data

    root = tmp_path_factory.mktemp("demo")
    ensure_demo_data(root, parts=("midi", "loops"))
    return root
