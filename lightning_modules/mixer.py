"""Automatic mixer: normalised stems -> stereo mix, its stereo-invariant losses and chunked inference.

Losses (MIXING.md section 5). Output and target are pre-filtered by an A-weighting FIR followed by
``y[n] = x[n-1] + 0.85 x[n]``; the sum ``S = L + R`` and difference ``D = L - R`` are compared as
magnitude STFTs. Invariance, exactly: swapping L and R leaves ``S`` unchanged and negates ``D``,
whose magnitude spectrogram is unchanged (negation is exact in floating point), so the loss is
exactly invariant to mirroring the whole prediction, the whole target, or both. It is *not* invariant
to mirroring one source inside a mix: its contribution to ``D`` changes sign while the others' do
not, which changes ``|D|`` wherever that source overlaps other sources in time and frequency (it is
unchanged only in bins that the mirrored source alone occupies).
"""
from __future__ import annotations

import functools
import math
import pickle
from typing import Callable, Sequence

import numpy as np
import pytorch_lightning as pl
import scipy.signal
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from framework.errors import InputError
from lightning_modules.nets.fxnorm_mixer import FilterBank, FxNormMixer
from lightning_modules.nets.wave_u_net import WaveUNet

NETWORKS = {"fxnorm": FxNormMixer, "wave_u_net": WaveUNet}
LOSS_VARIANTS = ("La", "Lb")


def a_weighting_gain(freqs: np.ndarray) -> np.ndarray:
    """Linear A-weighting magnitude (IEC 61672 analytic curve, 0 dB at 1 kHz)."""
    f2 = np.asarray(freqs, dtype=np.float64) ** 2
    ra = (12194.0 ** 2 * f2 ** 2) / ((f2 + 20.6 ** 2) * np.sqrt((f2 + 107.7 ** 2) * (f2 + 737.9 ** 2))
                                     * (f2 + 12194.0 ** 2))
    return ra * 10 ** (2.0 / 20)


@functools.lru_cache(maxsize=8)
def _prefilter_kernel(sample_rate: int, taps: int, emphasis: float) -> np.ndarray:
    """A-weighting FIR (window method) convolved with the two-tap ``[emphasis, 1]`` filter."""
    freqs = np.linspace(0.0, sample_rate / 2, 2048)
    a_weighting = scipy.signal.firwin2(taps, freqs, a_weighting_gain(freqs), fs=sample_rate)
    return np.convolve(a_weighting, [emphasis, 1.0]).astype(np.float32)


def sum_difference_spectrograms(x: torch.Tensor, window: torch.Tensor, hop_length: int = 1024,
                                edge_frames: int = 30) -> torch.Tensor:
    """``(B, 2, T)`` stereo -> ``(B, 2, F, N)`` magnitudes of ``L + R`` and ``L - R`` (``window``, of
    length ``n_fft``; no centring), with ``edge_frames`` frames dropped at each edge.

    Raises ``ValueError`` when ``T`` leaves no frame after the edge drop (fewer than
    ``n_fft + 2 * edge_frames * hop_length`` samples): shorten ``edge_frames`` or lengthen segments.
    """
    batch, channels, length = x.shape
    n_fft = window.numel()
    if channels != 2:
        raise ValueError(f"expected stereo (B, 2, T) audio, got shape {tuple(x.shape)}")
    minimum = n_fft + 2 * edge_frames * hop_length
    if length < minimum:
        raise ValueError(f"segment of {length} samples is too short for the stereo-invariant loss: it "
                         f"needs at least n_fft + 2 * edge_frames * hop_length = {minimum} samples "
                         f"(n_fft={n_fft}, hop_length={hop_length}, edge_frames={edge_frames})")
    sum_difference = torch.stack([x[:, 0] + x[:, 1], x[:, 0] - x[:, 1]], dim=1)
    spec = torch.stft(sum_difference.reshape(batch * 2, length), n_fft, hop_length, window=window.to(x.dtype),
                      center=False, return_complex=True).abs()
    spec = spec.reshape(batch, 2, *spec.shape[-2:])
    return spec[..., edge_frames:spec.shape[-1] - edge_frames]


class StereoInvariantLoss(nn.Module):
    """Stereo-invariant spectral loss between ``(B, 2, T)`` mixes, summed over {S, D}.

    ``La``: ``||Y - Y_hat||_F / ||Y||_F`` (per example, averaged over the batch) plus
    ``mean |log Y_hat - log Y|``; ``Lb``: ``MSE(Y_hat, Y)`` plus the same log term. Logs are taken of
    ``magnitude + eps``. For ``La`` the norm of the target's difference signal is floored at
    ``la_floor_db`` below the norm of its sum signal: a mono target has ``D = 0`` and the relative
    error would divide by zero, so its side energy is measured relative to the mid instead (side
    content 40 dB below the mid costs about as much as a 100 % error). The A-weighting kernel and
    the STFT window are buffers, so they move with the module and are never copied per call.
    Computed in float32 outside autocast.
    """

    def __init__(self, variant: str = "Lb", sample_rate: int = 44100, n_fft: int = 4096,
                 hop_length: int = 1024, edge_frames: int = 30, eps: float = 1e-7, taps: int = 101,
                 emphasis: float = 0.85, la_floor_db: float = -40.0):
        super().__init__()
        if variant not in LOSS_VARIANTS:
            raise ValueError(f"unknown loss variant {variant!r}; valid: {', '.join(LOSS_VARIANTS)}")
        self.variant, self.hop_length, self.edge_frames, self.eps = variant, hop_length, edge_frames, eps
        self.la_floor = 10.0 ** (la_floor_db / 20.0)
        kernel = torch.from_numpy(_prefilter_kernel(int(sample_rate), taps, emphasis))
        self.register_buffer("kernel", kernel.flip(0).view(1, 1, -1), persistent=False)
        self.register_buffer("window", torch.hann_window(n_fft).sqrt(), persistent=False)

    def prefilter(self, x: torch.Tensor) -> torch.Tensor:
        """Causal A-weighting FIR then ``y[n] = x[n-1] + emphasis * x[n]``, per channel of ``x (..., T)``."""
        shape = x.shape
        flat = F.pad(x.reshape(-1, 1, shape[-1]), (self.kernel.shape[-1] - 1, 0))
        return F.conv1d(flat, self.kernel.to(x.dtype)).reshape(shape)

    def spectrograms(self, x: torch.Tensor) -> torch.Tensor:
        return sum_difference_spectrograms(self.prefilter(x), self.window, self.hop_length, self.edge_frames)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(prediction.device.type, enabled=False):
            y_hat, y = self.spectrograms(prediction.float()), self.spectrograms(target.float())
            log_term = (torch.log(y_hat + self.eps) - torch.log(y + self.eps)).abs().mean(dim=(0, 2, 3))
            if self.variant == "La":
                distance = torch.linalg.vector_norm(y - y_hat, dim=(2, 3))
                norm = torch.linalg.vector_norm(y, dim=(2, 3))
                scale = torch.maximum(norm, self.la_floor * norm[:, :1]) + self.eps
                magnitude_term = (distance / scale).mean(dim=0)
            else:
                magnitude_term = (y_hat - y).pow(2).mean(dim=(0, 2, 3))
            return (magnitude_term + log_term).sum()


def step_learning_rate(base_lr: float, milestones: Sequence[int], values: Sequence[float]
                       ) -> Callable[[int], float]:
    """Multiplier for ``LambdaLR``: ``base_lr`` until the first milestone epoch, then each listed value
    from its milestone on (an explicit-value ``MultiStepLR``)."""
    if len(milestones) != len(values):
        raise ValueError(f"lr_milestones ({len(milestones)}) and lr_values ({len(values)}) must have "
                         "the same length")
    if list(milestones) != sorted(milestones):
        raise ValueError(f"lr_milestones must be increasing, got {list(milestones)}")

    def factor(epoch: int) -> float:
        lr = base_lr
        for milestone, value in zip(milestones, values):
            if epoch >= milestone:
                lr = value
        return lr / base_lr

    return factor


class AutoMixer(pl.LightningModule):
    """Mixer network (``network='fxnorm'`` proposed, ``'wave_u_net'`` baseline) trained on
    ``(stems (B, 8, T), mixture (B, 2, T))`` batches with a stereo-invariant loss.

    ``pretrain=True`` is the optional first phase: the model is the fxnorm :class:`FilterBank` alone
    (``net`` then holds only its widths), trained as an autoencoder of the stems (waveform L1), so
    every parameter it has is trained. ``init_from=CKPT`` copies such a checkpoint's two front-end
    convolution weights into the mixer at the start of fitting (they keep training). ``features``
    records the FxNorm feature file of the training set so that ``mix.py`` can normalise new stems
    the same way. The test stage takes whole songs (batch size 1) and mixes each in chunks of
    ``chunk_seconds`` overlapping by ``overlap_seconds`` (:func:`mix_song`, as ``mix.py`` does).
    """

    def __init__(self, network: str = "fxnorm", net: dict | None = None, loss: str = "Lb",
                 pretrain: bool = False, init_from: str | None = None, lr: float = 1e-3,
                 lr_milestones: Sequence[int] = (150, 200, 250, 275, 300),
                 lr_values: Sequence[float] = (3.3e-4, 1e-4, 3.3e-5, 1e-5, 1e-6),
                 weight_decay: float = 1e-7, amsgrad: bool = True, sample_rate: int = 44100,
                 loss_n_fft: int = 4096, loss_hop_length: int = 1024, loss_edge_frames: int = 30,
                 features: str | None = None, chunk_seconds: float = 10.0, overlap_seconds: float = 1.0):
        super().__init__()
        self.save_hyperparameters()
        if network not in NETWORKS:
            raise ValueError(f"unknown network {network!r}; valid: {', '.join(NETWORKS)}")
        if (pretrain or init_from) and network != "fxnorm":
            raise ValueError("pretrain / init_from apply to the fxnorm front-end only, "
                             f"not network={network!r}")
        step_learning_rate(lr, lr_milestones, lr_values)
        self.net = (FilterBank if pretrain else NETWORKS[network])(**(net or {}))
        self.loss = StereoInvariantLoss(loss, sample_rate, loss_n_fft, loss_hop_length, loss_edge_frames)

    @property
    def length_multiple(self) -> int:
        """Input lengths the network processes without padding; chunked inference aligns to it."""
        return self.net.factor if isinstance(self.net, WaveUNet) else self.net.pool

    def forward(self, stems: torch.Tensor) -> torch.Tensor:
        return self.net(stems)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.init_from:
            self.load_front_end(self.hparams.init_from)

    def load_front_end(self, path: str) -> None:
        """Copy the pretrained front-end weights of checkpoint ``path`` into this model; an
        :class:`InputError` naming the file when it is missing, unreadable or does not fit."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=False).get("state_dict", {})
        except (OSError, RuntimeError, EOFError, KeyError, AttributeError, pickle.UnpicklingError) as error:
            raise InputError(f"model.init_from={path}: cannot be read as a checkpoint ({type(error).__name__})") from error
        target = self.net.front_end_state()
        for name, parameter in target.items():
            key = f"net.{name}"
            if key not in state:
                raise InputError(f"model.init_from={path}: checkpoint has no {key!r}; is it a pretraining checkpoint?")
            if state[key].shape != parameter.shape:
                raise InputError(f"model.init_from={path}: {key!r} has shape {tuple(state[key].shape)}, this "
                                 f"model needs {tuple(parameter.shape)} (net settings differ)")
            with torch.no_grad():
                parameter.copy_(state[key])

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        stems, mixture = batch
        output = self.net(stems)
        if self.hparams.pretrain:
            return F.l1_loss(output.float(), stems.float()), output
        return self.loss(output, mixture), output

    def training_step(self, batch, batch_idx):
        loss, _ = self._step(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True,
                 batch_size=batch[0].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        loss, output = self._step(batch)
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, prog_bar=True,
                 batch_size=batch[0].shape[0])
        return {"loss": loss, "mix": None if self.hparams.pretrain else output.detach()}

    def test_step(self, batch, batch_idx):
        """One whole song: mixed (or, pretraining, reconstructed) in chunks; returns the song's mix."""
        stems, mixture = batch
        if stems.shape[0] != 1:
            raise ValueError(f"the test stage takes one whole song per batch, got {stems.shape[0]}")
        hp = self.hparams
        output = process_in_chunks(self.net, stems[0], 8 if hp.pretrain else 2, self.length_multiple,
                                   round(hp.chunk_seconds * hp.sample_rate),
                                   round(hp.overlap_seconds * hp.sample_rate))[None]
        if hp.pretrain:
            loss = F.l1_loss(output, stems)
        elif output.shape[-1] >= self.loss.window.numel() + 2 * hp.loss_edge_frames * hp.loss_hop_length:
            loss = self.loss(output, mixture)
        else:
            loss = None
        if loss is not None:
            self.log("test/loss", loss, on_epoch=True, sync_dist=True, batch_size=1)
        return {"loss": loss, "mix": None if hp.pretrain else output}

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay,
                                     amsgrad=hp.amsgrad)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, step_learning_rate(hp.lr, list(hp.lr_milestones), list(hp.lr_values)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}


def chunk_starts(length: int, chunk: int, overlap: int, multiple: int = 1) -> list[int]:
    """Start samples of the chunks that cover ``length`` samples; every chunk is real audio.

    Chunks of ``chunk`` samples start at multiples of ``chunk - overlap`` (multiples of
    ``multiple``, the network's pooling grid) while they end inside the song; one last chunk starts
    at the first multiple of ``multiple`` from which the song's end is less than ``chunk`` away, so
    it holds the song's last samples, is short of ``chunk`` by less than ``multiple``, and overlaps
    the chunk before by at least ``overlap``. A song no longer than ``chunk`` is one chunk.
    """
    if length <= chunk:
        return [0]
    return list(range(0, length - chunk, chunk - overlap)) + [math.ceil((length - chunk) / multiple) * multiple]


def crossfade_weights(length: int, fade_in: int, fade_out: int) -> np.ndarray:
    """Per-sample weight of a chunk of ``length`` samples that fades in over its first ``fade_in``
    and out over its last ``fade_out`` samples: the outer quarter of a fade, next to the chunk's
    edge (where a network sees the edge), gets weight 0 and the middle half a linear ramp, so the
    fade-out and fade-in of two chunks overlapping by exactly the fade length sum to 1."""

    def rise(size: int) -> np.ndarray:
        position = np.arange(size, dtype=np.float64)
        return np.clip((position + 0.5 - size / 4) / (size / 2), 0.0, 1.0).astype(np.float32)

    weights = np.ones(length, dtype=np.float32)
    if fade_in:
        weights[:fade_in] = rise(fade_in)
    if fade_out:
        weights[length - fade_out:] *= rise(fade_out)[::-1]
    return weights


def process_in_chunks(network: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
                      out_channels: int, multiple: int, chunk: int, overlap: int,
                      progress: bool = False) -> torch.Tensor:
    """``network`` applied to ``(C, n)`` ``inputs`` chunk by chunk (:func:`chunk_starts`) into an
    ``(out_channels, n)`` float32 tensor on the inputs' device; the network only ever sees
    ``(1, C, <= chunk)`` slices of the input. Outputs are averaged with :func:`crossfade_weights`
    (fades of ``overlap`` samples at every inner chunk edge), normalised by the summed weights:
    a plain cross-fade at the regular seams, and where the last chunk overlaps more, an even blend
    between the fades."""
    length = inputs.shape[-1]
    chunk = math.ceil(chunk / multiple) * multiple
    overlap = math.ceil(overlap / multiple) * multiple
    if not 0 <= 2 * overlap <= chunk:
        raise ValueError(f"overlap ({overlap} samples) must be between 0 and half the chunk ({chunk} samples)")
    starts = chunk_starts(length, chunk, overlap, multiple)
    output = torch.zeros(out_channels, length, device=inputs.device)
    total = torch.zeros(length, device=inputs.device)
    for index in tqdm(range(len(starts)), desc="mixing", unit="chunk", disable=not progress):
        start = starts[index]
        end = min(start + chunk, length)
        weights = crossfade_weights(end - start, overlap if index else 0, overlap if index + 1 < len(starts) else 0)
        weights = torch.from_numpy(weights).to(inputs.device)
        output[:, start:end] += network(inputs[None, :, start:end])[0].float() * weights
        total[start:end] += weights
    return output.div_(total)


@torch.inference_mode()
def mix_song(model: nn.Module, stems: np.ndarray | torch.Tensor, sample_rate: int,
             chunk_seconds: float = 10.0, overlap_seconds: float = 1.0, progress: bool = True
             ) -> np.ndarray | torch.Tensor:
    """Mix ``(8, n)`` normalised stems of any length into a ``(2, n)`` float32 mix (a numpy array for
    numpy input, else a tensor on the stems' device).

    The model only ever sees real audio: a song no longer than ``chunk_seconds`` in one pass at its
    own length, a longer one in chunks of ``chunk_seconds`` overlapping by at least
    ``overlap_seconds``, cross-faded, the last one ending at the song's end (:func:`chunk_starts`),
    so memory is bounded by the chunk size. Chunk starts are multiples of the model's
    ``length_multiple`` (when it has one), the pooling/decimation grid a single pass would use.
    """
    tensor = torch.as_tensor(stems, dtype=torch.float32)
    if tensor.ndim != 2:
        raise ValueError(f"stems must be (channels, samples), got shape {tuple(tensor.shape)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        mix = process_in_chunks(model, tensor.to(device), 2, getattr(model, "length_multiple", 1),
                                math.ceil(chunk_seconds * sample_rate), math.ceil(overlap_seconds * sample_rate),
                                progress)
    finally:
        model.train(was_training)
    return mix.to(tensor.device) if isinstance(stems, torch.Tensor) else mix.cpu().numpy()
