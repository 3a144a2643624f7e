"""Shared fixtures: offline W&B, and the demo data generated once per test session."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
# numba's on-disk cache can be corrupted when two processes compile the same function at once
# (pytest-xdist workers importing librosa in a fresh environment): one cache folder per test
# process, set unconditionally because the workers inherit the controlling process's environment.
# Subprocesses a test starts inherit their worker's folder after the worker has filled it.
os.environ["NUMBA_CACHE_DIR"] = str(Path(tempfile.gettempdir()) / f"numba-cache-{os.getpid()}")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """The MIDI and audio-loop parts of the built-in demo data, made once per session."""
    from datamodules.demo import ensure_demo_data

    root = tmp_path_factory.mktemp("demo")
    ensure_demo_data(root, parts=("midi", "loops"))
    return root


@pytest.fixture(scope="session")
def phrase_cache(demo_root):
    """The demo MIDI's phrase cache (inside the demo folder, where experiments look for it)."""
    from datamodules.pianoroll import ingest

    cache = demo_root / "phrases"
    if not (cache / "report.json").exists():
        ingest(demo_root / "midi", cache, progress=False)
    return cache


@pytest.fixture(scope="session")
def detector_ckpt(demo_root, tmp_path_factory):
    """A briefly trained loop detector checkpoint (threshold included)."""
    from tests.helpers import run_train

    run_dir = tmp_path_factory.mktemp("detector")
    run_train(["experiment=loop_detector", f"paths.demo={demo_root}", f"run_dir={run_dir}", "logger=none",
               "trainer.accelerator=cpu", "model.pretrain_epochs=2", "model.svdd_epochs=2", "trainer.max_epochs=4",
               "callbacks.loop_analysis=null", "trainer.enable_progress_bar=false"])
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def code_cache(phrase_cache, demo_root, tmp_path_factory):
    """Codes of the demo phrases from a VQ-VAE trained for a few steps (its checkpoint recorded)."""
    from datamodules.codes import encode_phrase_cache
    from lightning_modules.vqvae import VQVAE
    from tests.helpers import run_train

    run_dir = tmp_path_factory.mktemp("vqvae")
    run_train(["experiment=vqvae", f"paths.demo={demo_root}", f"run_dir={run_dir}", "logger=none",
               "trainer.accelerator=cpu", "trainer.max_steps=3", "trainer.limit_val_batches=1", "model.channels=16",
               "datamodule.batch_size=64", "trainer.enable_progress_bar=false"])
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    out = run_dir / "codes"
    encode_phrase_cache(VQVAE.load_from_checkpoint(ckpt, map_location="cpu"), phrase_cache, out, vqvae_ckpt=str(ckpt))
    return out


@pytest.fixture(scope="session")
def multitrack_root(tmp_path_factory):
    """A tiny MUSDB18-layout set (4 wet songs of a few seconds, 1 dry song) outside any demo folder."""
    from datamodules.demo.multitrack import write_multitrack_demo

    root = tmp_path_factory.mktemp("multitrack")
    write_multitrack_demo(root, seed=0, n_train=3, n_test=1, n_dry=1, seconds=(3.0, 4.0))
    return root
