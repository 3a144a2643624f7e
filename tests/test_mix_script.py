"""mix.py: argument checking, stem loading, and an end-to-end mix from a checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import soundfile as sf
import torch

import mix
from framework.errors import InputError
from datamodules.fxnorm import FxNormalizer
from lightning_modules.mixer import AutoMixer

SR = 8000
SMALL_NET = {"filters": 8, "kernel_size": 16, "envelope_kernel": 16, "pool": 16, "bottleneck": 8,
             "hidden": 8, "skip": 4, "repeats": 1, "blocks": 2, "lstm_layers": 1, "se_hidden": 8}


def _tone(seconds: float, freq: float, sr: int = SR, channels: int = 2) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    tone = 0.3 * np.sin(2 * np.pi * freq * t) * (1 + np.sin(2 * np.pi * 2 * t)) / 2
    return np.repeat(tone[:, None], channels, axis=1).astype(np.float32)


def test_unknown_and_missing_keys_fail_naming_the_valid_ones():
    with pytest.raises(ValueError, match="valid keys: ckpt, stems, out"):
        mix.parse_args(["ckpt=a", "stems=b", "out=c", "chunk=3"])
    with pytest.raises(ValueError, match="missing required key.*stems"):
        mix.parse_args(["ckpt=a", "out=c"])
    assert mix.parse_args(["ckpt=a", "stems=b", "out=c", "chunk_seconds=4"])["chunk_seconds"] == 4


def test_read_stems_fills_missing_stems_with_silence_and_resamples(tmp_path):
    sf.write(tmp_path / "vocals.wav", _tone(1.0, 440, channels=1), SR)
    sf.write(tmp_path / "drums.wav", _tone(0.5, 110, sr=2 * SR), 2 * SR)
    with pytest.raises(InputError, match="drums.wav: 4000 samples.*pad=true"):
        mix.read_stems(tmp_path, SR)
    stems = mix.read_stems(tmp_path, SR, pad=True)
    assert list(stems) == list(mix.STEMS)
    assert all(audio.shape == (2, SR) for audio in stems.values())
    assert np.array_equal(stems["vocals"][0], stems["vocals"][1])  # mono duplicated
    assert not stems["bass"].any() and not stems["other"].any()
    assert np.abs(stems["drums"][:, :SR // 2]).max() > 0.1 and not stems["drums"][:, SR // 2:].any()
    with pytest.raises(InputError, match="none of vocals.wav"):
        mix.read_stems(tmp_path / "empty", SR)


@pytest.fixture()
def checkpoint(tmp_path):
    torch.manual_seed(0)
    features = tmp_path / "features.npz"
    FxNormalizer.musdb18_reference(SR).save(features)
    model = AutoMixer(net=SMALL_NET, sample_rate=SR, features=str(features))
    path = tmp_path / "mixer.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": pl.__version__}, path)
    return path


def test_mix_script_writes_a_mix_of_the_input_length(tmp_path, checkpoint):
    partial, complete = tmp_path / "partial", tmp_path / "complete"
    for folder in (partial, complete):
        folder.mkdir()
        sf.write(folder / "vocals.wav", _tone(3.3, 440), SR)
        sf.write(folder / "drums.wav", _tone(3.3, 90), SR)
    sf.write(complete / "bass.wav", np.zeros((int(3.3 * SR), 2), dtype=np.float32), SR)
    sf.write(complete / "other.wav", np.zeros((int(3.3 * SR), 2), dtype=np.float32), SR)
    outputs = []
    for folder in (partial, complete):
        out = tmp_path / f"{folder.name}.wav"
        assert mix.main([f"ckpt={checkpoint}", f"stems={folder}", f"out={out}", "chunk_seconds=1.0",
                         "overlap_seconds=0.25", "progress=false"]) == 0
        audio, rate = sf.read(out, always_2d=True)
        assert rate == SR and audio.shape == (int(3.3 * SR), 2)
        outputs.append(audio)
    assert np.abs(outputs[0]).max() > 0
    assert np.array_equal(outputs[0], outputs[1])  # a missing stem mixes exactly like silence


def test_mix_script_reports_bad_arguments(capsys):
    assert mix.main(["ckpt=a", "stems=b", "out=c", "speed=2"]) == 2
    assert "valid keys" in capsys.readouterr().err


@pytest.mark.parametrize("defect", ["empty", "unreadable", "shorter", "nan"])
def test_bad_stems_fail_in_one_line_naming_the_file(tmp_path, checkpoint, capsys, defect):
    folder = tmp_path / "stems"
    folder.mkdir()
    sf.write(folder / "vocals.wav", _tone(1.0, 440), SR)
    bass = folder / "bass.wav"
    if defect == "empty":
        sf.write(bass, np.zeros((0, 2), np.float32), SR)
    elif defect == "unreadable":
        bass.write_bytes(b"RIFF, but not really")
    elif defect == "shorter":
        sf.write(bass, _tone(0.5, 110), SR)
    else:
        audio = _tone(1.0, 110)
        audio[100] = np.nan
        sf.write(bass, audio, SR, subtype="FLOAT")
    out = tmp_path / "mix.wav"
    assert mix.main([f"ckpt={checkpoint}", f"stems={folder}", f"out={out}", "progress=false"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "bass.wav" in error[0] and not out.exists()


@pytest.mark.parametrize("defect", ["missing", "corrupt", "pretraining"])
def test_bad_checkpoints_fail_in_one_line_naming_the_file(tmp_path, checkpoint, capsys, defect):
    folder = tmp_path / "stems"
    folder.mkdir()
    sf.write(folder / "vocals.wav", _tone(1.0, 440), SR)
    ckpt = tmp_path / f"{defect}.ckpt"
    if defect == "corrupt":
        ckpt.write_bytes(b"not a checkpoint\n")
    elif defect == "pretraining":
        model = AutoMixer(pretrain=True, net={k: SMALL_NET[k] for k in ("filters", "kernel_size", "envelope_kernel", "pool")},
                          sample_rate=SR)
        torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                    "pytorch-lightning_version": pl.__version__}, ckpt)
    out = tmp_path / "mix.wav"
    assert mix.main([f"ckpt={ckpt}", f"stems={folder}", f"out={out}", "progress=false"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and str(ckpt) in error[0] and not out.exists()
