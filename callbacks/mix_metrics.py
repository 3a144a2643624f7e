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

``mape_mean`` is the mean of all MAPE features. Under DDP a DistributedSampler pads the validation set
with repeated segments; ``compute`` drops repeats by a fingerprint of the target audio.
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


def _peak_normalise(x: torch.Tensor, db: float = -1.0) -> torch.Tensor:
    peak = x.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-8)
    return x * (10 ** (db / 20) / peak)


@functools.lru_cache(maxsize=8)
def _k_weighting_response(sample_rate: int) -> np.ndarray:
    """Impulse response of pyloudnorm's BS.1770 K-weighting biquads, 0.2 s long (decayed below 1e-6)."""
    impulse = np.zeros(max(int(0.2 * sample_rate), 256))
    impulse[0] = 1.0
    for stage in pyloudnorm.Meter(sample_rate)._filters.values():
        impulse = scipy.signal.lfilter(stage.b, stage.a, impulse)
    return impulse.astype(np.float32)


def k_weight(x: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """K-weighting of ``x (..., T)`` by FFT convolution with the truncated impulse response."""
    response = torch.from_numpy(_k_weighting_response(int(sample_rate))).to(x)
    size = x.shape[-1] + response.numel() - 1
    spectrum = torch.fft.rfft(x, n=size) * torch.fft.rfft(response, n=size)
    return torch.fft.irfft(spectrum, n=size)[..., :x.shape[-1]]


def _frames(x: torch.Tensor, length: int, hop: int) -> torch.Tensor:
    if x.shape[-1] < length:
        raise ValueError(f"segment of {x.shape[-1]} samples is shorter than one analysis frame "
                         f"({length} samples)")
    return x.unfold(-1, length, hop)


def loudness_peak_frames(x: torch.Tensor, sample_rate: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, 2, T)`` -> frame loudness (LUFS) and frame peak (dBFS), each ``(B, N)``."""
    length, hop = round(0.4 * sample_rate), round(0.2 * sample_rate)
    weighted = _frames(k_weight(x, sample_rate), length, hop)
    loudness = -0.691 + 10 * torch.log10(weighted.pow(2).mean(-1).sum(1).clamp_min(1e-7))
    peak = _db(_frames(x, length, hop).abs().amax(dim=(1, -1)), 1e-5)
    return loudness, peak


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


def mix_feature_errors(output: torch.Tensor, target: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Per-segment errors ``(B, len(METRIC_NAMES) - 1)`` between ``(B, 2, T)`` mixes, in the order of
    ``MAPE_FEATURES`` followed by ``l1`` and ``l2``."""
    if output.shape != target.shape or output.ndim != 3 or output.shape[1] != 2:
        raise ValueError(f"expected matching (B, 2, T) mixes, got {tuple(output.shape)} and "
                         f"{tuple(target.shape)}")
    output, target = output.float(), target.float()
    errors = {}
    for name, out, tar in zip(("loudness", "peak"), loudness_peak_frames(output, sample_rate),
                              loudness_peak_frames(target, sample_rate)):
        errors[name] = _mape(out, tar)
    out_norm, tar_norm = _peak_normalise(output), _peak_normalise(target)
    out_spec, tar_spec = magnitude_spectrogram(out_norm), magnitude_spectrogram(tar_norm)
    out_spectral, tar_spectral = spectral_frames(out_spec, sample_rate), spectral_frames(tar_spec, sample_rate)
    for name in out_spectral:
        errors[name] = _mape(out_spectral[name], tar_spectral[name])
    out_pan, tar_pan = panning_frames(out_spec, sample_rate), panning_frames(tar_spec, sample_rate)
    panned = tar_pan["panning_all"] > 0
    for name in out_pan:
        errors[name] = _mape(out_pan[name], tar_pan[name], panned)
    out_dyn, tar_dyn = dynamics_frames(out_norm), dynamics_frames(tar_norm)
    for name in out_dyn:
        errors[name] = _mape(out_dyn[name], tar_dyn[name])
    columns = [errors[name] for name in MAPE_FEATURES]
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

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        self.errors.append(mix_feature_errors(output, target, self.sample_rate))
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
    """Logs ``val/mix/<name>`` for every ``MixFeatureError`` value at each validation epoch end, and
    with ``baseline=True`` also ``val/mix/baseline/<name>`` for the plain sum of the input stems.

    On global rank 0 it also writes input (sum of stems) / output / target WAVs and a spectrogram PNG
    of the first ``n_media`` segments of the first validation batch to
    ``<default_root_dir>/media/epoch_NNN/`` and logs them to every attached ``WandbLogger``. Needs
    the module's ``validation_step`` to return ``{"mix": output}``; the sanity check is skipped.
    """

    def __init__(self, sample_rate: int = 44100, n_media: int = 2, baseline: bool = True):
        super().__init__()
        self.sample_rate = sample_rate
        self.n_media = n_media
        self.baseline = baseline
        self.metric = MixFeatureError(sample_rate)
        self.baseline_metric = MixFeatureError(sample_rate)
        self._media: dict[str, np.ndarray] = {}

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.metric.to(pl_module.device).reset()
        self.baseline_metric.to(pl_module.device).reset()
        self._media = {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking:
            return
        if not isinstance(outputs, dict) or outputs.get("mix") is None:
            raise KeyError("MixMetrics needs validation_step to return a dict with the output 'mix'")
        stems, target = batch
        plain_sum = stems.unflatten(1, (-1, 2)).sum(1)
        self.metric.update(outputs["mix"], target)
        if self.baseline:
            self.baseline_metric.update(plain_sum, target)
        if trainer.is_global_zero and not self._media:
            count = min(self.n_media, target.shape[0])
            self._media = {name: tensor[:count].float().cpu().numpy() for name, tensor in
                           (("input", plain_sum), ("output", outputs["mix"]), ("target", target))}

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        values = {f"val/mix/{name}": value for name, value in self.metric.compute().items()}
        if self.baseline:
            values.update({f"val/mix/baseline/{name}": value
                           for name, value in self.baseline_metric.compute().items()})
        pl_module.log_dict(values)
        if trainer.is_global_zero and self._media:
            self._write_media(trainer)

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
