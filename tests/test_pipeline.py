"""The whole chain end to end at a tiny size: every step's outputs exist and hand over by path."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

import pipeline
from framework.config import ConfigError, compose, load_config
from tests.helpers import REPO


@pytest.mark.slow
def test_loop_generation_chain_runs_end_to_end(demo_root, tmp_path, capsys):
    root = tmp_path / "run"
    pipeline.run([f"run_dir={root}", f"demo={demo_root}", "scale=tiny", "accelerator=cpu", "logger=none"])
    loops = json.loads((root / "loops" / "report.json").read_text())
    assert 0 < loops["n_loops"] < loops["n_phrases"]
    summary = json.loads((root / "generated" / "summary.json").read_text())
    assert summary["written"] == 16 and len(list((root / "generated" / "midi").glob("*.mid"))) == 16
    assert (root / "generated" / "pianorolls.png").is_file()
    with open(root / "evaluation" / "table2.csv") as handle:
        models = [row["model"] for row in csv.DictReader(handle)]
    assert models[:4] == ["Training set", "CNN-VAE", "Music Transformer", "MuseGAN"] and len(models) == 7
    with open(root / "evaluation" / "rejection.csv") as handle:
        assert {row["model"] for row in csv.DictReader(handle)} == {"MuseGAN", "VQ-VAE+LSTM (top-k sampling=30)"}
    assert (root / "evaluation" / "rejection.png").is_file()
    printed = capsys.readouterr().out
    assert str(root / "generated" / "midi") in printed and str(root / "evaluation") in printed


@pytest.mark.slow
def test_two_device_pipeline_runs_each_step_once_in_one_run_dir(demo_root, tmp_path):
    """``devices=2`` without a run_dir, as a user would type it: the training steps run as
    two-process jobs, everything else once, all in one timestamped run directory."""
    command = [sys.executable, str(REPO / "pipeline.py"), "scale=tiny", "accelerator=cpu", "devices=2",
               f"demo={demo_root}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    (root,) = (tmp_path / "runs" / "pipeline").iterdir()
    assert sorted(p.name for p in root.iterdir()) == [
        "cnn_vae", "codes", "detector", "evaluation", "extract", "generated", "loops", "musegan",
        "music_transformer", "prior", "vqvae"]
    assert len(list((root / "generated" / "midi").glob("*.mid"))) == 16
    with open(root / "evaluation" / "table2.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 7
    with open(root / "prior" / "csv" / "metrics.csv") as handle:
        columns = next(csv.reader(handle))
    assert {"val/gen/loop_score", "val/gen/precision", "val/gen/coverage"} <= set(columns)
    assert result.stdout.count("[9/10] generate") == 1 and "torch.distributed.run" in result.stdout


@pytest.mark.slow
def test_mixing_steps_train_both_mixers_mix_every_dry_song_and_evaluate_them(multitrack_root, tmp_path, capsys):
    root = tmp_path / "run"
    pipeline.run([f"run_dir={root}", f"multitrack={multitrack_root}/multitrack", f"dry={multitrack_root}/dry",
                  f"normalised={tmp_path}/normalised", "steps=[mixer_pretrain,mixer,wave_u_net,mix,evaluate_mix]",
                  "scale=tiny",
                  "accelerator=cpu", "logger=none"])
    songs = sorted(p.name for p in (multitrack_root / "dry").iterdir())
    assert sorted(p.stem for p in (root / "mixes").glob("*.wav")) == songs
    with open(root / "evaluation_mix" / "table.csv") as handle:
        rows = {row["system"]: row for row in csv.DictReader(handle)}
    assert list(rows) == ["target", "sum", "fxnorm", "wave_u_net"] and float(rows["target"]["mape_mean"]) == 0
    out = capsys.readouterr().out
    assert "Objective evaluation of the mixes" in out
    pretrained = pipeline.evaluation_checkpoint(root / "mixer_pretrain")
    assert f"model.init_from={pretrained}" in out  # the mixer starts from the pretrained filter bank
    mixer = torch.load(root / "mixer" / "checkpoints" / "last.ckpt", weights_only=False)
    assert mixer["hyper_parameters"]["init_from"] == pretrained


def test_unknown_step_or_scale_fails_naming_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match="valid: detector, extract"):
        pipeline.run([f"run_dir={tmp_path}", "steps=[detector,train]"])
    with pytest.raises(ConfigError, match="choose one of: demo, tiny, paper"):
        pipeline.run([f"run_dir={tmp_path}", "scale=huge"])
    with pytest.raises(ConfigError, match="Valid keys at the top level"):
        pipeline.run([f"run_dir={tmp_path}", "midis=x"])


def test_mixing_steps_out_of_order_or_without_the_mixer_fail_before_any_work(tmp_path):
    for steps, message in [("[mixer,mixer_pretrain]", "mixer_pretrain must come before mixer"),
                           ("[evaluate_mix,mixer]", "mixer must come before evaluate_mix"),
                           ("[wave_u_net,mix]", "mix needs the mixer step")]:
        with pytest.raises(ConfigError, match=message):
            pipeline.run([f"run_dir={tmp_path}", f"steps={steps}"])
    assert not any(tmp_path.iterdir())


def test_paper_scale_pretrains_the_front_end_of_the_paper_mixer():
    scales = load_config(pipeline.CONFIG).scales
    for scale in ("demo", "paper"):
        pretrain = compose(["experiment=mixer_pretrain", *scales[scale].mixer_pretrain])
        mixer = compose(["experiment=mixer", *scales[scale].mixer])
        for key in ("filters", "kernel_size", "envelope_kernel", "pool"):
            assert pretrain.model.net[key] == mixer.model.net[key], (scale, key)
