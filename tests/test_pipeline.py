"""The whole chain end to end at a tiny size: every step's outputs exist and hand over by path."""
from __future__ import annotations

import csv
import json

import pytest

import pipeline
from framework.config import ConfigError


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
    assert models[0] == "Training set" and "CNN-VAE" in models and len(models) == 5
    assert (root / "evaluation" / "rejection.png").is_file()
    printed = capsys.readouterr().out
    assert str(root / "generated" / "midi") in printed and str(root / "evaluation") in printed


@pytest.mark.slow
def test_mixing_steps_train_both_mixers_mix_every_dry_song_and_evaluate_them(multitrack_root, tmp_path, capsys):
    root = tmp_path / "run"
    pipeline.run([f"run_dir={root}", f"multitrack={multitrack_root}/multitrack", f"dry={multitrack_root}/dry",
                  f"normalised={tmp_path}/normalised", "steps=[mixer,wave_u_net,mix,evaluate_mix]", "scale=tiny",
                  "accelerator=cpu", "logger=none"])
    songs = sorted(p.name for p in (multitrack_root / "dry").iterdir())
    assert sorted(p.stem for p in (root / "mixes").glob("*.wav")) == songs
    with open(root / "evaluation_mix" / "table.csv") as handle:
        rows = {row["system"]: row for row in csv.DictReader(handle)}
    assert list(rows) == ["target", "sum", "fxnorm", "wave_u_net"] and float(rows["target"]["mape_mean"]) == 0
    assert "Objective evaluation of the mixes" in capsys.readouterr().out


def test_unknown_step_or_scale_fails_naming_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match="valid: detector, extract"):
        pipeline.run([f"run_dir={tmp_path}", "steps=[detector,train]"])
    with pytest.raises(ConfigError, match="choose one of: demo, tiny, paper"):
        pipeline.run([f"run_dir={tmp_path}", "scale=huge"])
    with pytest.raises(ConfigError, match="Valid keys at the top level"):
        pipeline.run([f"run_dir={tmp_path}", "midis=x"])
