"""Objective mix metrics (MIXING.md section 6) as a torchmetrics ``Metric`` and a validation callback.

Each feature is computed frame-wise on the output mix and the target mix, smoothed by a running mean
over 40 frames (a plain mean over all frames when a segment has fewer than 40), and compared by
mean absolute percentage error (``|out - tar| / |tar|``, averaged). Everything is computed with torch
on the tensors' device. Frame settings follow the authors' evaluation at 44.1 kHz and scale with the
sample rate: loudness and peak on 0.4 s frames with a 0.2 s hop on the raw audio; all other features
on a 4096/1024 sqrt-Hann STFT (or 4096/1024-sample frames) of the audio peak-normalised to -1 dBFS.

* ``loudness``: BS.1770 K-weighted mean-square per frame in LUFS (single 0.4 s block, so no gating;
  floor -70 LUFS). ``peak``: frame peak in dBFS (floor -100 dB).
* ``centroid``, ``bandwidth`` (p = 2 on the frame-normalised magnitude), ``rolloff`` (85 % of the
  magnitude sum), ``flatness`` (power spectrum, floor 1e-10): librosa's definitions, per channel.
* ``contrast_low/mid/high``: spectral contrast of the bands 0-250 Hz / mean of 250-500, 500-1000,
  1000-2000 Hz / 2000 Hz-Nyquist: dB difference between the mean of the top and of the bottom 2 % of
  the band's magnitudes (librosa's definition without its 80 dB clipping).
* ``panning_all/low/mid/high``: RMS over 0-Nyquist / 0-250 / 250-2500 / 2500-Nyquist Hz of the
  Stereo Panning Spectrum ``(1 - psi) * sign(|R| - |L|)`` (-1 hard left, +1 hard right); frames whose
  target SPS RMS is 0 (exactly mono) are excluded.
* ``rms``, ``dynamic_spread``, ``crest``: per 4096-sample frame and channel, RMS level in dB,
  mean of ``20 log10 |x| - RMS dB``, and crest factor ``peak dB - RMS dB``, averaged over channels;
  RMS and spread enter the MAPE as ``1 - value`` so that the reference is positive and away from 0.
* ``l1``, ``l2``: mean absolute / squared waveform error (not percentages).

``mape_mean`` is the mean of all MAPE features. Frame features are computed in blocks of frames
(:data:`BLOCK_FRAMES`), so a whole song needs no more memory than a minute of it; peak normalisation
uses the whole signal's peak and the running means run over the whole song. Under DDP a
DistributedSampler pads an evaluation set with repeats; ``compute`` drops them by a fingerprint of
the target audio.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyloudnorm
import pytorch_lightning as pl
import scipy.signal
import soundfile as sf
import torch
from pytorch_lightning.loggers import WandbLogger
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from framework.io import atomic_path

RUNNING_FRAMES = 40
#: Frames of one analysis grid computed at once (about a minute of 4096/1024 frames at 44.1 kHz).
BLOCK_FRAMES = 2560
N_FFT = 4096
HOP = 1024
CONTRAST_EDGES_HZ = (0.0, 250.0, 500.0, 1000.0, 2000.0)
PANNING_BANDS_HZ = {"all": (0.0, None), "low": (0.0, 250.0), "mid": (250.0, 2500.0),
                    "high": (2500.0, None)}
MAPE_FEATURES = ("loudness", "peak", "centroid", "bandwidth", "contrast_low", "contrast_mid",
                 "contrast_high", "rolloff", "flatness", "panning_all", "panning_low", "panning_mid",
                 "panning_high", "rms", "dynamic_spread", "crest")
METRIC_NAMES = MAPE_FEATURES + ("l1", "l2", "mape_mean")


def _db(x: torch.Tensor, floor: float) -> torch.Tensor:
    return 20 * torch.log10(x.clamp_min(floor))


def _peak_normalising_gain(x: torch.Tensor, db: float = -1.0) -> torch.Tensor:
    """``(B, 1, 1)`` gains that bring each item's peak over the whole signal to ``db`` dBFS."""
    return 10 ** (db / 20) / x.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-8)


@functools.lru_cache(maxsize=8)
def k_weighting_response(sample_rate: int) -> np.ndarray:
    """Impulse response of pyloudnorm's BS.1770 K-weighting biquads, 0.2 s long (decayed below 1e-6)."""
    impulse = np.zeros(max(int(0.2 * sample_rate), 256))
    impulse[0] = 1.0
    for stage in pyloudnorm.Meter(sample_rate)._filters.values():
        impulse = scipy.signal.lfilter(stage.b, stage.a, impulse)
    return impulse.astype(np.float32)


def k_weight(x: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """K-weighting of ``x (..., T)`` by FFT convolution with the truncated impulse ``response``."""
    size = x.shape[-1] + response.numel() - 1
    spectrum = torch.fft.rfft(x, n=size) * torch.fft.rfft(response.to(x.dtype), n=size)
    return torch.fft.irfft(spectrum, n=size)[..., :x.shape[-1]]


def _frames(x: torch.Tensor, length: int, hop: int) -> torch.Tensor:
    if x.shape[-1] < length:
        raise ValueError(f"segment of {x.shape[-1]} samples is shorter than one analysis frame "
                         f"({length} samples)")
    return x.unfold(-1, length, hop)


def _frame_blocks(samples: int, length: int, hop: int) -> list[tuple[int, int]]:
    """Sample ranges of consecutive blocks of at most :data:`BLOCK_FRAMES` whole frames of a
    ``length``/``hop`` grid; together they hold every frame of ``samples`` samples once."""
    if samples < length:
        raise ValueError(f"segment of {samples} samples is shorter than one analysis frame ({length} samples)")
    count = (samples - length) // hop + 1
    return [(first * hop, (min(first + BLOCK_FRAMES, count) - 1) * hop + length)
            for first in range(0, count, BLOCK_FRAMES)]


def loudness_peak_frames(x: torch.Tensor, sample_rate: int, response: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, 2, T)`` -> frame loudness (LUFS) and frame peak (dBFS), each ``(B, N)``."""
    if response is None:
        response = torch.from_numpy(k_weighting_response(int(sample_rate))).to(x.device)
    length, hop = round(0.4 * sample_rate), round(0.2 * sample_rate)
    loudness, peak = [], []
    for start, stop in _frame_blocks(x.shape[-1], length, hop):
        context = min(start, response.numel() - 1)  # the causal filter's memory: exact at block edges
        weighted = _frames(k_weight(x[..., start - context:stop], response)[..., context:], length, hop)
        loudness.append(-0.691 + 10 * torch.log10(weighted.pow(2).mean(-1).sum(1).clamp_min(1e-7)))
        peak.append(_db(_frames(x[..., start:stop], length, hop).abs().amax(dim=(1, -1)), 1e-5))
    return torch.cat(loudness, -1), torch.cat(peak, -1)


def magnitude_spectrogram(x: torch.Tensor) -> torch.Tensor:
    """``(..., T)`` -> ``(..., F, N)`` magnitude, 4096/1024 sqrt-Hann, no centring."""
    window = torch.hann_window(N_FFT, device=x.device, dtype=x.dtype).sqrt()
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[-1] < N_FFT:
        raise ValueError(f"segment of {flat.shape[-1]} samples is shorter than one STFT frame ({N_FFT})")
    spec = torch.stft(flat, N_FFT, HOP, window=window, center=False, return_complex=True).abs()
    return spec.reshape(*x.shape[:-1], *spec.shape[-2:])


def spectral_frames(spec: torch.Tensor, sample_rate: int) -> dict[str, torch.Tensor]:
    """Per-frame spectral features of magnitudes ``(..., F, N)``, each ``(..., N)``."""
    freqs = torch.linspace(0, sample_rate / 2, spec.shape[-2], device=spec.device, dtype=spec.dtype)
    freqs = freqs.unsqueeze(-1)
    total = spec.sum(-2, keepdim=True).clamp_min(1e-10)
    weights = spec / total
    centroid = (weights * freqs).sum(-2)
    bandwidth = (weights * (freqs - centroid.unsqueeze(-2)) ** 2).sum(-2).sqrt()
    cumulative = spec.cumsum(-2)
    below = cumulative < 0.85 * cumulative[..., -1:, :]
    rolloff = freqs.squeeze(-1)[below.sum(-2).clamp_max(spec.shape[-2] - 1)]
    power = spec.pow(2).clamp_min(1e-10)
    flatness = torch.exp(power.log().mean(-2)) / power.mean(-2)
    contrasts = []
    edges = list(CONTRAST_EDGES_HZ) + [sample_rate / 2 + 1]
    for low, high in zip(edges[:-1], edges[1:]):
        band = spec[..., (freqs.squeeze(-1) >= low) & (freqs.squeeze(-1) < high), :]
        ordered = band.sort(dim=-2).values
        count = max(int(round(0.02 * band.shape[-2])), 1)
        valley = ordered[..., :count, :].mean(-2)
        peak = ordered[..., -count:, :].mean(-2)
        contrasts.append(10 * torch.log10(peak.clamp_min(1e-10)) - 10 * torch.log10(valley.clamp_min(1e-10)))
    return {"centroid": centroid, "bandwidth": bandwidth, "rolloff": rolloff, "flatness": flatness,
            "contrast_low": contrasts[0], "contrast_mid": torch.stack(contrasts[1:4]).mean(0),
            "contrast_high": contrasts[4]}


def panning_frames(spec: torch.Tensor, sample_rate: int) -> dict[str, torch.Tensor]:
    """SPS band RMS per frame from stereo magnitudes ``(B, 2, F, N)``, each ``(B, N)``."""
    left, right = spec[:, 0], spec[:, 1]
    similarity = 2 * left * right / (left.pow(2) + right.pow(2)).clamp_min(1e-20)
    sps = (1 - similarity) * torch.sign(right - left)
    bins_per_hz = N_FFT / sample_rate
    result = {}
    for name, (low, high) in PANNING_BANDS_HZ.items():
        first = int(math.floor(low * bins_per_hz))
        last = spec.shape[-2] if high is None else int(math.floor(high * bins_per_hz))
        result[f"panning_{name}"] = sps[:, first:last].pow(2).mean(1).sqrt()
    return result


def dynamics_frames(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """RMS level, dynamic spread and crest factor (dB) per 4096/1024 frame, channel-averaged, ``(B, N)``."""
    frames = _frames(x, N_FFT, HOP)
    rms = _db(frames.pow(2).mean(-1).sqrt(), 1e-5)
    spread = (_db(frames.abs(), 1e-5) - rms.unsqueeze(-1)).mean(-1)
    crest = _db(frames.abs().amax(-1), 1e-5) - rms
    return {"rms": 1 - rms.mean(1), "dynamic_spread": 1 - spread.mean(1), "crest": crest.mean(1)}


def running_mean(x: torch.Tensor, frames: int = RUNNING_FRAMES) -> torch.Tensor:
    """Mean over every window of ``frames`` consecutive frames (last axis); the overall mean as a
    single window when there are fewer frames."""
    if x.shape[-1] < frames:
        return x.mean(-1, keepdim=True)
    return x.unfold(-1, frames, 1).mean(-1)


def _mape(output: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-segment MAPE of running means; ``valid`` masks frames out (before smoothing)."""
    if valid is None:
        output, target = running_mean(output), running_mean(target)
        error = (output - target).abs() / target.abs().clamp_min(1e-8)
        return error.flatten(1).mean(1)
    values = []
    for out, tar, keep in zip(output, target, valid):
        out, tar = running_mean(out[keep]), running_mean(tar[keep])
        values.append(((out - tar).abs() / tar.abs().clamp_min(1e-8)).mean() if keep.any()
                      else out.new_tensor(0.0))
    return torch.stack(values)


def frame_features(x: torch.Tensor, sample_rate: int, response: torch.Tensor | None = None
                   ) -> dict[str, torch.Tensor]:
    """Every MAPE feature of ``(B, 2, T)`` mixes per frame, ``{name: (B, N)}``, computed in blocks."""
    features = dict(zip(("loudness", "peak"), loudness_peak_frames(x, sample_rate, response)))
    gain = _peak_normalising_gain(x)
    blocks = []
    for start, stop in _frame_blocks(x.shape[-1], N_FFT, HOP):
        normalised = x[..., start:stop] * gain
        spec = magnitude_spectrogram(normalised)
        blocks.append({**spectral_frames(spec, sample_rate), **panning_frames(spec, sample_rate),
                       **dynamics_frames(normalised)})
    features.update({name: torch.cat([block[name] for block in blocks], -1) for name in blocks[0]})
    return features


def mix_feature_errors(output: torch.Tensor, target: torch.Tensor, sample_rate: int,
                       response: torch.Tensor | None = None) -> torch.Tensor:
    """Per-item errors ``(B, len(METRIC_NAMES) - 1)`` between ``(B, 2, T)`` mixes (segments or whole
    songs), in the order of ``MAPE_FEATURES`` followed by ``l1`` and ``l2``. ``response`` is the
    K-weighting impulse response on the mixes' device (built from the sample rate when None)."""
    if output.shape != target.shape or output.ndim != 3 or output.shape[1] != 2:
        raise ValueError(f"expected matching (B, 2, T) mixes, got {tuple(output.shape)} and "
                         f"{tuple(target.shape)}")
    output, target = output.float(), target.float()
    out, tar = frame_features(output, sample_rate, response), frame_features(target, sample_rate, response)
    panned = tar["panning_all"] > 0
    columns = [_mape(out[name], tar[name], panned if name.startswith("panning") else None)
               for name in MAPE_FEATURES]
    columns.append((output - target).abs().mean(dim=(1, 2)))
    columns.append((output - target).pow(2).mean(dim=(1, 2)))
    return torch.stack(columns, dim=1)


def _fingerprint(target: torch.Tensor) -> torch.Tensor:
    """Two float64 sums identifying a segment, so repeated segments can be counted once."""
    flat = target.double().flatten(1)
    ramp = torch.linspace(1.0, 2.0, flat.shape[1], device=flat.device, dtype=flat.dtype)
    return torch.stack([flat.abs().sum(1), (flat * ramp).sum(1)], dim=1)


class MixFeatureError(Metric):
    """Mean over validation segments of the objective mix errors (see the module docstring).

    ``update(output (B, 2, T), target (B, 2, T))``; ``compute()`` returns ``{name: scalar}`` for
    ``METRIC_NAMES``, each segment counted once even if the sampler repeated it.
    """

    full_state_update = False

    def __init__(self, sample_rate: int = 44100, **kwargs):
        super().__init__(**kwargs)
        self.sample_rate = sample_rate
        self.add_state("errors", default=[], dist_reduce_fx="cat")
        self.add_state("fingerprints", default=[], dist_reduce_fx="cat")
        response = torch.from_numpy(k_weighting_response(int(sample_rate)))
        self.register_buffer("response", response, persistent=False)  # moves with the metric

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        self.errors.append(mix_feature_errors(output, target, self.sample_rate, self.response))
        self.fingerprints.append(_fingerprint(target))

    def compute(self) -> dict[str, torch.Tensor]:
        errors = dim_zero_cat(self.errors)
        fingerprints = dim_zero_cat(self.fingerprints)
        _, inverse = torch.unique(fingerprints, dim=0, return_inverse=True)
        order = torch.arange(len(inverse), device=inverse.device)
        first = torch.full((int(inverse.max()) + 1,), len(inverse), device=inverse.device)
        first = first.scatter_reduce(0, inverse, order, reduce="amin")
        means = errors[first].mean(0)
        values = dict(zip(METRIC_NAMES, means))
        values["mape_mean"] = means[:len(MAPE_FEATURES)].mean()
        return values


def save_spectrograms(path: Path, audio: dict[str, np.ndarray], sample_rate: int) -> None:
    """One PNG with the log-magnitude spectrogram of the mid channel of each ``(2, T)`` signal."""
    figure, axes = plt.subplots(len(audio), 1, figsize=(8, 2.2 * len(audio)), sharex=True)
    for axis, (name, signal) in zip(np.atleast_1d(axes), audio.items()):
        axis.specgram(signal.mean(0), NFFT=1024, Fs=sample_rate, noverlap=768, cmap="magma",
                      vmin=-140)
        axis.set_ylabel("Hz")
        axis.set_title(name)
    axes = np.atleast_1d(axes)
    axes[-1].set_xlabel("s")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=80)
    plt.close(figure)


class MixMetrics(pl.Callback):
    """Logs ``<stage>/mix/<name>`` for every ``MixFeatureError`` value at the end of each validation
    (10 s segments) and test (whole songs) epoch, and with ``plain_sum=True`` also
    ``<stage>/mix/sum/<name>`` for the plain sum of the input stems.

    On global rank 0 it also writes input (sum of stems) / output / target WAVs and a spectrogram PNG
    of the first ``n_media`` segments of the first validation batch to
    ``<default_root_dir>/media/epoch_NNN/`` and logs them to every attached ``WandbLogger``. Needs
    the module's ``validation_step`` and ``test_step`` to return ``{"mix": output}``; the sanity
    check is skipped.
    """

    def __init__(self, sample_rate: int = 44100, n_media: int = 2, plain_sum: bool = True):
        super().__init__()
        self.sample_rate = sample_rate
        self.n_media = n_media
        self.plain_sum = plain_sum
        self.metric = MixFeatureError(sample_rate)
        self.sum_metric = MixFeatureError(sample_rate)
        self._media: dict[str, np.ndarray] = {}

    def _start(self, pl_module) -> None:
        self.metric.to(pl_module.device).reset()
        self.sum_metric.to(pl_module.device).reset()
        self._media = {}

    def _update(self, outputs, batch) -> torch.Tensor:
        if not isinstance(outputs, dict) or outputs.get("mix") is None:
            raise KeyError("MixMetrics needs the module's step to return a dict with the output 'mix'")
        stems, target = batch
        plain_sum = stems.unflatten(1, (-1, 2)).sum(1)
        self.metric.update(outputs["mix"], target)
        if self.plain_sum:
            self.sum_metric.update(plain_sum, target)
        return plain_sum

    def _log(self, pl_module, stage: str) -> None:
        values = {f"{stage}/mix/{name}": value for name, value in self.metric.compute().items()}
        if self.plain_sum:
            values.update({f"{stage}/mix/sum/{name}": value for name, value in self.sum_metric.compute().items()})
        pl_module.log_dict(values)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._start(pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking:
            return
        plain_sum = self._update(outputs, batch)
        if trainer.is_global_zero and not self._media:
            target = batch[1]
            count = min(self.n_media, target.shape[0])
            self._media = {name: tensor[:count].float().cpu().numpy() for name, tensor in
                           (("input", plain_sum), ("output", outputs["mix"]), ("target", target))}

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self._log(pl_module, "val")
        if trainer.is_global_zero and self._media:
            self._write_media(trainer)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._start(pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx: int = 0) -> None:
        self._update(outputs, batch)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._log(pl_module, "test")

    def _write_media(self, trainer) -> None:
        folder = Path(trainer.default_root_dir) / "media" / f"epoch_{trainer.current_epoch:03d}"
        wandb_loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        for index in range(len(self._media["target"])):
            segment = {name: audio[index] for name, audio in self._media.items()}
            wav_paths = []
            for name, audio in segment.items():
                path = folder / f"segment_{index}_{name}.wav"
                with atomic_path(path) as tmp:
                    sf.write(tmp, np.clip(audio.T, -1, 1), self.sample_rate, format="WAV")
                wav_paths.append(str(path))
            png_path = folder / f"segment_{index}_spectrograms.png"
            save_spectrograms(png_path, segment, self.sample_rate)
            for logger in wandb_loggers:
                logger.log_audio(f"val/media/segment_{index}", audios=wav_paths,
                                 step=trainer.global_step, caption=list(segment),
                                 sample_rate=[self.sample_rate] * len(wav_paths))
                logger.log_image(f"val/media/segment_{index}_spectrograms", images=[str(png_path)],
                                 step=trainer.global_step)
