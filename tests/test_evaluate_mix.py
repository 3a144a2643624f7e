"""evaluate_mix.py: whole-song objective evaluation of mixers, its outputs and its errors."""
from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

import evaluate_mix
from callbacks.mix_metrics import METRIC_NAMES
from datamodules.fxnorm import FxNormalizer
from datamodules.fxnorm.songs import MIXTURE, list_songs, read_song
from lightning_modules.mixer import AutoMixer
from tests.helpers import save_checkpoint

SMALL_NET = {"filters": 8, "kernel_size": 16, "envelope_kernel": 16, "pool": 16, "bottleneck": 8,
             "hidden": 8, "skip": 4, "repeats": 1, "blocks": 2, "lstm_layers": 1, "se_hidden": 8}


@pytest.fixture(scope="module")
def checkpoints(multitrack_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixers")
    features = folder / "features.npz"
    FxNormalizer.musdb18_reference().save(features)
    torch.manual_seed(0)
    mixer = save_checkpoint(AutoMixer(net=SMALL_NET, features=str(features)), folder / "fxnorm.ckpt")
    wave_u_net = save_checkpoint(AutoMixer(network="wave_u_net", net={"channels": [4, 8], "kernel_size": 5, "norm_groups": 2},
                                           features=str(features)), folder / "wave_u_net.ckpt")
    return mixer, wave_u_net


def test_every_system_mixes_every_song_in_full_and_the_target_scores_zero(multitrack_root, checkpoints, tmp_path):
    mixer, wave_u_net = checkpoints
    songs = multitrack_root / "multitrack" / "test"
    out = tmp_path / "evaluation"
    result = evaluate_mix.run([f"ckpt={mixer}", f"baseline={wave_u_net}", f"songs={songs}", f"out={out}",
                               f"cache={tmp_path / 'cache'}", "chunk_seconds=1.0", "overlap_seconds=0.25"])
    rows = result["rows"]
    assert list(rows) == ["target", "sum", "fxnorm", "wave_u_net"]
    assert all(value == 0 for value in rows["target"].values())
    assert rows["sum"]["mape_mean"] > 0 and rows["fxnorm"]["l1"] > 0
    with open(out / "table.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [row["system"] for row in table] == list(rows) and set(table[0]) == {"system", *METRIC_NAMES}
    for song in list_songs(songs):
        reference, _ = read_song(song, (MIXTURE,))
        for system in rows:
            audio, rate = sf.read(out / "mixes" / system / f"{song.name}.wav", always_2d=True)
            assert rate == 44100 and audio.shape == reference[MIXTURE].T.shape
        target, _ = sf.read(out / "mixes" / "target" / f"{song.name}.wav", always_2d=True)
        np.testing.assert_array_equal(target.T.astype(np.float32), reference[MIXTURE])
    assert (out / "features.png").is_file() and (out / "table.md").read_text().count("|") > 20


def test_checkpoints_of_different_features_and_bad_songs_fail_in_one_line(multitrack_root, checkpoints, tmp_path, capsys):
    mixer, _ = checkpoints
    other = tmp_path / "other.npz"
    reference = FxNormalizer.musdb18_reference()
    reference.loudness_target["bass"] -= 3.0
    reference.save(other)
    odd = save_checkpoint(AutoMixer(net=SMALL_NET, features=str(other)), tmp_path / "odd.ckpt")
    songs = multitrack_root / "multitrack" / "test"
    assert evaluate_mix.main([f"ckpt={mixer}", f"baseline={odd}", f"songs={songs}", f"out={tmp_path / 'a'}"]) == 2
    assert "different FxNorm features" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(songs, broken)
    (next(iter(list_songs(broken))) / "drums.wav").unlink()
    assert evaluate_mix.main([f"ckpt={mixer}", f"songs={broken}", f"out={tmp_path / 'b'}",
                              f"cache={tmp_path / 'cache'}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "drums.wav: missing" in error[0] and not (tmp_path / "cache").exists()


def test_an_unreadable_checkpoint_fails_in_one_line_naming_it(multitrack_root, checkpoints, tmp_path, capsys):
    mixer, _ = checkpoints
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint\n")
    songs = multitrack_root / "multitrack" / "test"
    assert evaluate_mix.main([f"ckpt={mixer}", f"baseline={corrupt}", f"songs={songs}", f"out={tmp_path / 'a'}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and str(corrupt) in error[0]
