"""Objective mix metrics against librosa / pyloudnorm and hand-computed values, and the callback."""
from __future__ import annotations

import os
import socket

import librosa
import numpy as np
import pyloudnorm
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from callbacks.mix_metrics import (METRIC_NAMES, MixFeatureError, MixMetrics, loudness_peak_frames,
                                   magnitude_spectrogram, mix_feature_errors, panning_frames,
                                   running_mean, spectral_frames)
from lightning_modules.mixer import AutoMixer

SR = 16000
SMALL_NET = {"filters": 8, "kernel_size": 16, "envelope_kernel": 16, "pool": 16, "bottleneck": 8,
             "hidden": 8, "skip": 4, "repeats": 1, "blocks": 2, "lstm_layers": 1, "se_hidden": 8}


def _noise(*shape, seed=0, scale=0.1):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32)) * scale


def test_spectral_frames_match_librosa():
    spec = magnitude_spectrogram(_noise(SR) * torch.linspace(0, 1, SR))
    ours = spectral_frames(spec, SR)
    S = spec.numpy()
    reference = {
        "centroid": librosa.feature.spectral_centroid(S=S, sr=SR, n_fft=4096)[0],
        "bandwidth": librosa.feature.spectral_bandwidth(S=S, sr=SR, n_fft=4096)[0],
        "rolloff": librosa.feature.spectral_rolloff(S=S, sr=SR, n_fft=4096)[0],
        "flatness": librosa.feature.spectral_flatness(S=S, n_fft=4096)[0],
    }
    for name, expected in reference.items():
        assert np.allclose(ours[name].numpy(), expected, rtol=1e-4, atol=1e-3), name


def test_frame_loudness_and_peak_match_pyloudnorm():
    x = _noise(1, 2, 2 * SR, scale=0.05) * torch.tensor([1.0, 0.5]).view(1, 2, 1)
    loudness, peak = loudness_peak_frames(x, SR)
    meter = pyloudnorm.Meter(SR, block_size=0.4)
    length, hop = int(0.4 * SR), int(0.2 * SR)
    for index in range(loudness.shape[1]):
        frame = x[0, :, index * hop:index * hop + length].numpy()
        assert abs(loudness[0, index].item() - meter.integrated_loudness(frame.T)) < 0.05
        assert abs(peak[0, index].item() - 20 * np.log10(np.abs(frame).max())) < 1e-4


@pytest.mark.parametrize("gains, expected", [((1.0, 0.0), 1.0), ((0.0, 1.0), 1.0), ((1.0, 1.0), 0.0),
                                             ((1.0, 0.5), 0.2)])
def test_panning_rms_of_amplitude_panned_noise(gains, expected):
    x = _noise(1, 1, SR) * torch.tensor(gains).view(1, 2, 1)
    bands = panning_frames(magnitude_spectrogram(x), SR)
    for name in ("panning_all", "panning_low", "panning_mid", "panning_high"):
        assert torch.allclose(bands[name], torch.tensor(expected), atol=1e-4), name


def test_running_mean_over_forty_frames():
    x = torch.arange(50.0)
    assert torch.equal(running_mean(x), torch.arange(11.0) + 19.5)
    assert torch.equal(running_mean(torch.arange(10.0)), torch.tensor([4.5]))


def test_errors_are_zero_for_identity_and_grow_with_distortion():
    target = _noise(2, 2, SR)
    assert mix_feature_errors(target, target, SR).abs().max() == 0
    errors = [mix_feature_errors(target + _noise(2, 2, SR, seed=1, scale=s), target, SR)[:, :16].mean()
              for s in (0.01, 0.05, 0.2)]
    assert errors[0] < errors[1] < errors[2]
    quieter = mix_feature_errors(target * 0.5, target, SR)
    loudness, _ = loudness_peak_frames(target, SR)
    assert torch.allclose(quieter[:, 0], (20 * np.log10(2) / loudness.abs()).mean(1), rtol=1e-3)


def test_repeated_segments_are_counted_once():
    target, output = _noise(3, 2, SR), _noise(3, 2, SR, seed=2)
    once = MixFeatureError(SR)
    once.update(output, target)
    padded = MixFeatureError(SR)
    padded.update(output[:2], target[:2])
    padded.update(output[2:], target[2:])
    padded.update(output[:1], target[:1])  # a DistributedSampler repeat
    for name, value in once.compute().items():
        assert torch.allclose(value, padded.compute()[name]), name


def _ddp_worker(rank, world_size, port, outputs, targets, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    metric = MixFeatureError(SR)
    indices = [0, 2] if rank == 0 else [1, 0]  # 3 segments padded to 4 with a repeat of segment 0
    metric.update(outputs[indices], targets[indices])
    values = metric.compute()
    if rank == 0:
        result.update({name: value.item() for name, value in values.items()})
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_metric_under_two_gloo_ranks_equals_single_process():
    outputs, targets = _noise(3, 2, SR, seed=3), _noise(3, 2, SR, seed=4)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    manager = torch.multiprocessing.Manager()
    result = manager.dict()
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, outputs, targets, result), nprocs=2)
    single = MixFeatureError(SR)
    single.update(outputs, targets)
    for name, value in single.compute().items():
        assert result[name] == pytest.approx(value.item(), rel=1e-5), name


def test_callback_logs_metrics_and_media_but_skips_the_sanity_check(tmp_path):
    torch.manual_seed(0)
    stems = _noise(4, 8, SR)
    data = DataLoader(TensorDataset(stems, stems.unflatten(1, (4, 2)).sum(1) * 0.5), batch_size=2)
    model = AutoMixer(net=SMALL_NET, sample_rate=SR, loss_n_fft=1024, loss_hop_length=256,
                      loss_edge_frames=2)
    callback = MixMetrics(sample_rate=SR, n_media=1)
    updates = []
    original_update = callback.metric.update
    callback.metric.update = lambda *args: (updates.append(1), original_update(*args))
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=1, limit_train_batches=1,
                         num_sanity_val_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, callbacks=[callback])
    trainer.fit(model, data, data)
    assert len(updates) == 2  # the two validation batches, not the sanity batch
    assert set(f"val/mix/{name}" for name in METRIC_NAMES) <= set(trainer.callback_metrics)
    assert "val/mix/sum/mape_mean" in trainer.callback_metrics
    media = sorted(p.name for p in (tmp_path / "media" / "epoch_000").iterdir())
    assert media == ["segment_0_input.wav", "segment_0_output.wav", "segment_0_spectrograms.png",
                     "segment_0_target.wav"]


def test_whole_songs_are_measured_in_blocks_exactly(monkeypatch):
    """Frame features computed a few frames at a time (block edges everywhere, the K-weighting
    filter's memory carried across them) equal the computation in one block."""
    import callbacks.mix_metrics as mix_metrics

    torch.manual_seed(0)
    target = torch.randn(1, 2, 6 * SR) * torch.linspace(0.1, 1.0, 6 * SR)
    output = 0.8 * target + 0.05 * torch.randn_like(target)
    whole = mix_metrics.mix_feature_errors(output.double(), target.double(), SR)
    monkeypatch.setattr(mix_metrics, "BLOCK_FRAMES", 7)
    blocked = mix_metrics.mix_feature_errors(output.double(), target.double(), SR)
    torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=1e-6)


def test_k_weighting_response_moves_with_the_metric():
    metric = MixFeatureError(SR).to("meta")
    assert metric.response.device.type == "meta"
    assert "response" not in metric.state_dict()
