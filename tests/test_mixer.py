"""The mixer networks, the stereo-invariant losses, front-end pretraining and chunked inference."""
from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import pytest
import scipy.signal
import torch
from torch import nn

from lightning_modules.mixer import (AutoMixer, StereoInvariantLoss, a_weighting_gain, chunk_starts,
                                     crossfade_weights, mix_song, step_learning_rate,
                                     sum_difference_spectrograms)
from lightning_modules.nets.fxnorm_mixer import FxNormMixer
from lightning_modules.nets.wave_u_net import WaveUNet, receptive_field

SR = 8000
SMALL_NET = {"filters": 16, "kernel_size": 16, "envelope_kernel": 16, "pool": 16, "bottleneck": 16,
             "hidden": 8, "skip": 8, "repeats": 1, "blocks": 2, "lstm_layers": 1, "se_hidden": 16}
FILTER_BANK = {k: SMALL_NET[k] for k in ("filters", "kernel_size", "envelope_kernel", "pool")}
LOSS_ARGS = {"sample_rate": SR, "n_fft": 512, "hop_length": 128, "edge_frames": 4}
LOSS_LENGTH = 512 + 8 * 128 + 1000


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_default_fxnorm_mixer_is_the_papers_network_without_its_dead_convolution():
    """The paper counts 2,752,817 parameters, which include the last TCN block's residual 1x1
    convolution (256 x 128 + 256) whose output nothing reads; every parameter here is trained."""
    model = AutoMixer()
    dead = 256 * 128 + 256
    assert _count(model) + dead == 2_752_817
    assert model.net.tcn[-1].residual is None and all(block.residual is not None for block in model.net.tcn[:-1])
    model.net(torch.randn(1, 8, 4096)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.net.parameters())


def test_pretraining_trains_every_parameter_it_has():
    model = AutoMixer(net=FILTER_BANK, pretrain=True)
    assert set(dict(model.net.named_parameters())) == {"front_end.weight", "envelope.weight"}
    loss, _ = model._step((torch.randn(2, 8, 320), torch.randn(2, 2, 320)))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("length", [64 * 20, 1000, 1])
def test_fxnorm_mixer_output_shape_and_range(length):
    torch.manual_seed(0)
    net = FxNormMixer(**SMALL_NET)
    y = net(torch.randn(2, 8, length) * 3)
    assert y.shape == (2, 2, length)
    assert y.abs().max() <= 1


def test_back_end_is_the_adjoint_of_the_front_end():
    torch.manual_seed(0)
    net = FxNormMixer(**SMALL_NET)
    x, y = torch.randn(1, 8, 160, dtype=torch.float64), torch.randn(1, 16, 160, dtype=torch.float64)
    net = net.double()
    forward = net.analyse(x)[0]
    assert torch.allclose((forward * y).sum(), (x * net.synthesise(y)).sum())


def test_wave_u_net_shapes_and_decimation():
    torch.manual_seed(0)
    net = WaveUNet()
    lengths = []
    net.bottleneck.register_forward_hook(lambda module, inputs, output: lengths.append(inputs[0].shape[-1]))
    y = net(torch.randn(2, 8, 3200 + 7))
    assert y.shape == (2, 2, 3207) and y.abs().max() <= 1
    assert lengths == [3232 // 32]  # padded to a multiple of 2**5, then halved five times
    assert receptive_field(net) == 445  # the figure documented in the module; stride 1 gave ~69


def test_a_weighting_prefilter_matches_scipy_reference():
    x = torch.randn(3, 2000, dtype=torch.float64)
    freqs = np.linspace(0, SR / 2, 2048)
    fir = scipy.signal.firwin2(101, freqs, a_weighting_gain(freqs), fs=SR)
    filtered = scipy.signal.lfilter(fir, [1.0], x.numpy(), axis=-1)
    shifted = np.concatenate([np.zeros((3, 1)), filtered[:, :-1]], axis=1)
    expected = shifted + 0.85 * filtered
    assert np.allclose(StereoInvariantLoss(sample_rate=SR).prefilter(x.float()).numpy(), expected, atol=1e-5)


def test_loss_kernels_are_buffers_that_move_with_the_module():
    """On the meta device every input and kernel must be meta too: a kernel left on the host (or
    copied from it per call) fails there."""
    loss = StereoInvariantLoss("La", **LOSS_ARGS).to("meta")
    assert loss.kernel.device.type == loss.window.device.type == "meta"
    assert not any(name in loss.state_dict() for name in ("kernel", "window"))  # checkpoints unchanged
    x = torch.zeros(2, 2, LOSS_LENGTH, device="meta")
    assert loss.prefilter(x).device.type == "meta"
    assert abs(20 * np.log10(a_weighting_gain(np.array([1000.0]))[0])) < 0.01


@pytest.mark.parametrize("variant", ["La", "Lb"])
def test_losses_are_exactly_invariant_to_mirroring_and_zero_on_identity(variant):
    torch.manual_seed(0)
    pred, target = torch.randn(2, 2, LOSS_LENGTH), torch.randn(2, 2, LOSS_LENGTH)
    criterion = StereoInvariantLoss(variant, **LOSS_ARGS)
    loss = criterion(pred, target)
    assert loss > 0
    assert torch.equal(loss, criterion(pred.flip(1), target.flip(1)))
    # |D| is sign-blind, so mirroring only one side is invisible as well
    assert torch.equal(loss, criterion(pred.flip(1), target))
    assert criterion(target, target) == 0


@pytest.mark.parametrize("variant", ["La", "Lb"])
def test_losses_see_mirroring_of_one_overlapping_source(variant):
    torch.manual_seed(0)
    source_a = torch.randn(1, 1, LOSS_LENGTH) * torch.tensor([1.0, 0.2]).view(1, 2, 1)
    source_b = torch.randn(1, 1, LOSS_LENGTH) * torch.tensor([0.3, 1.0]).view(1, 2, 1)
    target = source_a + source_b
    mirrored_a = source_a.flip(1) + source_b
    assert StereoInvariantLoss(variant, **LOSS_ARGS)(mirrored_a, target) > 0.01


def test_la_is_finite_on_a_mono_target_and_measures_side_relative_to_mid():
    torch.manual_seed(0)
    mono = torch.randn(1, 1, LOSS_LENGTH).repeat(1, 2, 1)
    criterion = StereoInvariantLoss("La", **LOSS_ARGS)
    side = torch.randn(1, 1, LOSS_LENGTH) * torch.tensor([1.0, -1.0]).view(1, 2, 1)
    prediction = (mono + 0.01 * side).requires_grad_()
    loss = criterion(prediction, mono)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(prediction.grad).all()
    assert criterion(mono, mono) == 0
    assert criterion(mono + 0.001 * side, mono) < criterion(mono + 0.01 * side, mono)


def test_loss_rejects_segments_too_short_for_the_edge_drop():
    window = torch.hann_window(4096).sqrt()
    with pytest.raises(ValueError, match="at least n_fft"):
        sum_difference_spectrograms(torch.zeros(1, 2, 4096 + 59 * 1024), window)
    assert sum_difference_spectrograms(torch.zeros(1, 2, 4096 + 60 * 1024), window).shape[-1] == 1


def test_learning_rate_steps_through_the_listed_values():
    factor = step_learning_rate(1e-3, [2, 4], [3.3e-4, 1e-4])
    assert [round(1e-3 * factor(epoch), 7) for epoch in range(6)] == [1e-3, 1e-3, 3.3e-4, 3.3e-4, 1e-4, 1e-4]
    with pytest.raises(ValueError, match="same length"):
        step_learning_rate(1e-3, [2], [1e-4, 1e-5])


def test_pretrained_front_end_initialises_the_full_model(tmp_path):
    torch.manual_seed(0)
    pretrained = AutoMixer(net=FILTER_BANK, pretrain=True)
    stems = torch.randn(2, 8, 320)
    loss, reconstruction = pretrained._step((stems, stems[:, :2]))
    assert reconstruction.shape == stems.shape and loss > 0
    path = tmp_path / "pretrain.ckpt"
    torch.save({"state_dict": pretrained.state_dict()}, path)
    model = AutoMixer(net=SMALL_NET, init_from=str(path))
    assert not torch.equal(model.net.front_end.weight, pretrained.net.front_end.weight)
    model.setup("fit")
    for name in ("front_end", "envelope"):
        assert torch.equal(getattr(model.net, name).weight, getattr(pretrained.net, name).weight)
        assert getattr(model.net, name).weight.requires_grad
    with pytest.raises(ValueError, match="apply to the fxnorm"):
        AutoMixer(network="wave_u_net", pretrain=True)


@pytest.mark.parametrize("defect", ["missing", "corrupt", "not pretraining", "other widths"])
def test_init_from_a_bad_checkpoint_is_an_input_error_naming_the_file(tmp_path, defect):
    """An InputError, which train.py reports in one line, rather than a traceback."""
    from framework.errors import InputError

    path = tmp_path / "other.ckpt"
    if defect == "corrupt":
        path.write_bytes(b"not a checkpoint")
    elif defect == "not pretraining":
        torch.save({"state_dict": {}}, path)
    elif defect == "other widths":
        torch.save({"state_dict": AutoMixer(net={**FILTER_BANK, "filters": 8}, pretrain=True).state_dict()}, path)
    with pytest.raises(InputError, match="other.ckpt"):
        AutoMixer(net=SMALL_NET, init_from=str(path)).setup("fit")


class LocalMixer(nn.Module):
    """A time-local stand-in (receptive field 33 samples) that records every input length."""

    length_multiple = 16

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(8, 2, 33, padding=16)
        self.lengths: list[tuple[int, ...]] = []

    def forward(self, x):
        self.lengths.append(tuple(x.shape))
        return torch.tanh(self.conv(x))


def test_crossfade_weights_of_neighbours_sum_to_one():
    chunk, overlap = 400, 160
    first = crossfade_weights(chunk, 0, overlap)
    second = crossfade_weights(chunk, overlap, 0)
    assert np.allclose(first[chunk - overlap:] + second[:overlap], 1.0)
    assert (first[:chunk - overlap] == 1).all() and (second[overlap:] == 1).all()
    assert second[0] == 0 and first[-1] == 0


@pytest.mark.parametrize("length", [1000, 1600, 1601, 1617, 3000, 5 * 1600 + 7])
def test_chunks_cover_the_song_with_real_audio_only(length):
    chunk, overlap, multiple = 400, 96, 16
    starts = chunk_starts(length, chunk, overlap, multiple)
    ends = [min(s + chunk, length) for s in starts]
    assert starts[0] == 0 and ends[-1] == length and all(s % multiple == 0 for s in starts)
    assert all(e - s > chunk - multiple for s, e in zip(starts, ends))  # none short of a chunk but by the grid
    assert all(ends[i - 1] - starts[i] >= overlap for i in range(1, len(starts)))  # every seam fully overlaps


def test_chunked_mixing_has_no_seams_for_a_local_model():
    rng = np.random.default_rng(0)
    stems = rng.standard_normal((8, 3 * SR + 123)).astype(np.float32)
    model = LocalMixer()
    chunked = mix_song(model, stems, SR, chunk_seconds=0.5, overlap_seconds=0.1, progress=False)
    chunk = 4000  # 0.5 s on the 16-sample grid
    assert all(length > chunk - 16 for _, _, length in model.lengths)  # no zero-padded chunk
    assert model.lengths[-1][-1] == stems.shape[-1] - chunk_starts(stems.shape[-1], chunk, 800, 16)[-1]
    with torch.no_grad():
        single = model(torch.from_numpy(stems)[None])[0].numpy()
    assert chunked.shape == (2, stems.shape[-1])
    assert np.abs(chunked - single).max() < 1e-5  # cross-fades only where both chunks are exact


def test_a_song_shorter_than_a_chunk_is_mixed_in_one_pass_at_its_length():
    torch.manual_seed(0)
    model = AutoMixer(net=SMALL_NET).eval()
    stems = np.random.default_rng(2).standard_normal((8, SR // 3)).astype(np.float32) * 0.1
    recorder = []
    model.net.register_forward_hook(lambda module, inputs, output: recorder.append(inputs[0].shape[-1]))
    chunked = mix_song(model, stems, SR, chunk_seconds=0.5, overlap_seconds=0.2, progress=False)
    assert recorder == [SR // 3]
    with torch.no_grad():
        single = model(torch.from_numpy(stems)[None])[0].numpy()
    np.testing.assert_array_equal(chunked, single)


def test_chunked_mixing_of_the_real_model_is_continuous_and_close_to_a_single_pass():
    torch.manual_seed(0)
    model = AutoMixer(net=SMALL_NET).eval()
    stems = np.random.default_rng(1).standard_normal((8, 2 * SR + 700)).astype(np.float32) * 0.1
    chunked = mix_song(model, stems, SR, chunk_seconds=0.5, overlap_seconds=0.2, progress=False)
    with torch.no_grad():
        single = model(torch.from_numpy(stems)[None])[0].numpy()
    assert chunked.shape == single.shape and np.abs(chunked).max() <= 1
    # global context (BLSTM, squeeze-excitation, GroupNorm) differs per chunk: close, not equal.
    # Measured 2.3e-4; a zero-padded last chunk (700 real samples of 4000) gave 1.5e-3.
    assert np.abs(chunked - single).mean() < 5e-4 * np.abs(single).mean()


_FIVE_MINUTES = """
import resource, sys, numpy as np, torch
from lightning_modules.mixer import AutoMixer, mix_song
torch.manual_seed(0)
model = AutoMixer(net={net}, sample_rate={sr}).eval()
stems = np.random.default_rng(0).standard_normal((8, 5 * 60 * {sr} + 77), dtype=np.float32)
stems *= 0.1  # in place: no temporary may set the peak before the measurement
mix_song(model, stems[:, : 2 * {sr}], {sr}, progress=False)  # warm-up: allocator and kernels
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
mix = mix_song(model, stems, {sr}, progress=False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert mix.shape == (2, stems.shape[-1])
print((after - before) / 1024, mix.nbytes / 2**20)
"""


def test_chunked_mixing_of_five_minutes_stays_within_a_fixed_memory_bound():
    """Peak RSS grows by the output arrays (the mix and its weight sum, 1.5 x the mix) and one chunk's
    working set, not with the song's activations: measured in a fresh process (10 s chunks at
    8 kHz: about 95 MiB; a single pass of the same network over the song grew by 688 MiB)."""
    import subprocess
    import sys

    from tests.helpers import REPO

    code = _FIVE_MINUTES.format(net=SMALL_NET, sr=SR)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    grown_mib, output_mib = map(float, result.stdout.split())
    assert grown_mib < 1.5 * output_mib + 128, (grown_mib, output_mib)


def _mixing_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise-burst stems and their 'engineered' mix: fixed per-stem gains and pans, then summed."""
    generator = torch.Generator().manual_seed(seed)
    envelope = (torch.rand(n, 4, 1, SR // 400, generator=generator) > 0.5).float()
    sources = torch.randn(n, 4, 1, SR, generator=generator) * envelope.repeat_interleave(400, dim=-1)
    stems = (0.1 * sources).repeat(1, 1, 2, 1)
    pans = torch.tensor([[1.0, 1.0], [1.4, 0.3], [0.5, 0.5], [0.2, 1.2]]).view(1, 4, 2, 1)
    return stems.flatten(1, 2), (stems * pans).sum(1)


@pytest.mark.slow
def test_short_training_lowers_the_loss_and_beats_the_plain_sum(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from callbacks.mix_metrics import MixMetrics

    torch.manual_seed(0)
    train = DataLoader(TensorDataset(*_mixing_task(32, 0)), batch_size=4, shuffle=True)
    val = DataLoader(TensorDataset(*_mixing_task(8, 1)), batch_size=4)
    model = AutoMixer(net=SMALL_NET, sample_rate=SR, loss_n_fft=512, loss_hop_length=128,
                      loss_edge_frames=4, lr=3e-3)
    metrics = MixMetrics(sample_rate=SR, n_media=0)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, num_sanity_val_steps=0, callbacks=[metrics],
                         gradient_clip_val=0.2)
    before = trainer.validate(model, val, verbose=False)[0]
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=4, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, num_sanity_val_steps=0, callbacks=[metrics],
                         gradient_clip_val=0.2)
    trainer.fit(model, train, val)
    after = trainer.callback_metrics
    assert after["val/loss"] < 0.5 * before["val/loss"]
    # the magnitude-only loss does not fit the waveform (L1/L2), only the mix features
    assert after["val/mix/mape_mean"] < after["val/mix/sum/mape_mean"]
