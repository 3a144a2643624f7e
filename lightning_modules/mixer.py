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
from typing import Callable, Sequence

import numpy as np
import pytorch_lightning as pl
import scipy.signal
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lightning_modules.nets.fxnorm_mixer import FxNormMixer
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


def a_weighting_prefilter(x: torch.Tensor, sample_rate: int = 44100, taps: int = 101,
                          emphasis: float = 0.85) -> torch.Tensor:
    """Causal A-weighting FIR (``taps`` taps) then ``y[n] = x[n-1] + emphasis * x[n]``, per channel of
    ``x (..., T)``; same length, computed as one ``conv1d`` on ``x``'s device."""
    kernel = torch.from_numpy(_prefilter_kernel(int(sample_rate), taps, emphasis)).to(x)
    shape = x.shape
    flat = F.pad(x.reshape(-1, 1, shape[-1]), (kernel.numel() - 1, 0))
    return F.conv1d(flat, kernel.flip(0).view(1, 1, -1)).reshape(shape)


def sum_difference_spectrograms(x: torch.Tensor, n_fft: int = 4096, hop_length: int = 1024,
                                edge_frames: int = 30) -> torch.Tensor:
    """``(B, 2, T)`` stereo -> ``(B, 2, F, N)`` magnitudes of ``L + R`` and ``L - R`` (sqrt-Hann, no
    centring), with ``edge_frames`` frames dropped at each edge.

    Raises ``ValueError`` when ``T`` leaves no frame after the edge drop (fewer than
    ``n_fft + 2 * edge_frames * hop_length`` samples): shorten ``edge_frames`` or lengthen segments.
    """
    batch, channels, length = x.shape
    if channels != 2:
        raise ValueError(f"expected stereo (B, 2, T) audio, got shape {tuple(x.shape)}")
    minimum = n_fft + 2 * edge_frames * hop_length
    if length < minimum:
        raise ValueError(f"segment of {length} samples is too short for the stereo-invariant loss: it "
                         f"needs at least n_fft + 2 * edge_frames * hop_length = {minimum} samples "
                         f"(n_fft={n_fft}, hop_length={hop_length}, edge_frames={edge_frames})")
    sum_difference = torch.stack([x[:, 0] + x[:, 1], x[:, 0] - x[:, 1]], dim=1)
    window = torch.hann_window(n_fft, device=x.device, dtype=x.dtype).sqrt()
    spec = torch.stft(sum_difference.reshape(batch * 2, length), n_fft, hop_length, window=window,
                      center=False, return_complex=True).abs()
    spec = spec.reshape(batch, 2, *spec.shape[-2:])
    return spec[..., edge_frames:spec.shape[-1] - edge_frames]


def stereo_invariant_loss(prediction: torch.Tensor, target: torch.Tensor, variant: str = "Lb",
                          sample_rate: int = 44100, n_fft: int = 4096, hop_length: int = 1024,
                          edge_frames: int = 30, eps: float = 1e-7) -> torch.Tensor:
    """Stereo-invariant spectral loss between ``(B, 2, T)`` mixes, summed over {S, D}.

    ``La``: ``||Y - Y_hat||_F / ||Y||_F`` (per example, averaged over the batch) plus
    ``mean |log Y_hat - log Y|``; ``Lb``: ``MSE(Y_hat, Y)`` plus the same log term. Logs are taken of
    ``magnitude + eps``. Computed in float32 outside autocast.
    """
    if variant not in LOSS_VARIANTS:
        raise ValueError(f"unknown loss variant {variant!r}; valid: {', '.join(LOSS_VARIANTS)}")
    with torch.autocast(prediction.device.type, enabled=False):
        spectra = [sum_difference_spectrograms(a_weighting_prefilter(x.float(), sample_rate), n_fft,
                                               hop_length, edge_frames)
                   for x in (prediction, target)]
        y_hat, y = spectra
        log_term = (torch.log(y_hat + eps) - torch.log(y + eps)).abs().mean(dim=(0, 2, 3))
        if variant == "La":
            distance = torch.linalg.vector_norm(y - y_hat, dim=(2, 3))
            scale = torch.linalg.vector_norm(y, dim=(2, 3)) + eps
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

    ``pretrain=True`` trains only the fxnorm front-end as an autoencoder of the stems (waveform L1);
    ``init_from=CKPT`` copies such a checkpoint's two front-end convolution weights into the model
    at the start of fitting (they keep training). ``features`` records the FxNorm feature file of the
    training set so that ``mix.py`` can normalise new stems the same way.
    """

    def __init__(self, network: str = "fxnorm", net: dict | None = None, loss: str = "Lb",
                 pretrain: bool = False, init_from: str | None = None, lr: float = 1e-3,
                 lr_milestones: Sequence[int] = (40, 60, 80, 100, 120),
                 lr_values: Sequence[float] = (3.3e-4, 1e-4, 3.3e-5, 1e-5, 1e-6),
                 weight_decay: float = 1e-7, amsgrad: bool = True, sample_rate: int = 44100,
                 loss_n_fft: int = 4096, loss_hop_length: int = 1024, loss_edge_frames: int = 30,
                 features: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        if network not in NETWORKS:
            raise ValueError(f"unknown network {network!r}; valid: {', '.join(NETWORKS)}")
        if loss not in LOSS_VARIANTS:
            raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LOSS_VARIANTS)}")
        if (pretrain or init_from) and network != "fxnorm":
            raise ValueError("pretrain / init_from apply to the fxnorm front-end only, "
                             f"not network={network!r}")
        step_learning_rate(lr, lr_milestones, lr_values)
        self.net = NETWORKS[network](**(net or {}))

    @property
    def length_multiple(self) -> int:
        """Input lengths the network processes without padding; chunked inference aligns to it."""
        return self.net.pool if isinstance(self.net, FxNormMixer) else self.net.factor

    def forward(self, stems: torch.Tensor) -> torch.Tensor:
        return self.net(stems)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.init_from:
            self.load_front_end(self.hparams.init_from)

    def load_front_end(self, path: str) -> None:
        """Copy the pretrained front-end weights of checkpoint ``path`` into this model."""
        state = torch.load(path, map_location="cpu", weights_only=False).get("state_dict", {})
        target = self.net.front_end_state()
        for name, parameter in target.items():
            key = f"net.{name}"
            if key not in state:
                raise KeyError(f"{path}: checkpoint has no {key!r}; is it a pretraining checkpoint?")
            if state[key].shape != parameter.shape:
                raise ValueError(f"{path}: {key!r} has shape {tuple(state[key].shape)}, this model "
                                 f"needs {tuple(parameter.shape)} (net settings differ)")
            with torch.no_grad():
                parameter.copy_(state[key])

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        stems, mixture = batch
        if self.hparams.pretrain:
            reconstruction = self.net.autoencode(stems)
            return F.l1_loss(reconstruction.float(), stems.float()), reconstruction
        prediction = self.net(stems)
        loss = stereo_invariant_loss(prediction, mixture, self.hparams.loss, self.hparams.sample_rate,
                                     self.hparams.loss_n_fft, self.hparams.loss_hop_length,
                                     self.hparams.loss_edge_frames)
        return loss, prediction

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
        loss, _ = self._step(batch)
        self.log("test/loss", loss, on_epoch=True, sync_dist=True, batch_size=batch[0].shape[0])
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay,
                                     amsgrad=hp.amsgrad)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, step_learning_rate(hp.lr, list(hp.lr_milestones), list(hp.lr_values)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}


def crossfade_weights(chunk: int, overlap: int, first: bool, last: bool) -> np.ndarray:
    """Per-sample weight of one chunk. In each ``overlap`` region the outer quarter next to a chunk
    edge (where zero padding distorts the output) gets weight 0, the middle half a linear ramp, so
    that the weights of two neighbouring chunks sum to exactly 1 everywhere."""
    weights = np.ones(chunk, dtype=np.float32)
    if overlap:
        position = np.arange(overlap, dtype=np.float64)
        rise = np.clip((position + 0.5 - overlap / 4) / (overlap / 2), 0.0, 1.0).astype(np.float32)
        if not first:
            weights[:overlap] = rise
        if not last:
            weights[chunk - overlap:] *= rise[::-1]
    return weights


@torch.inference_mode()
def mix_song(model: nn.Module, stems: np.ndarray | torch.Tensor, sample_rate: int,
             chunk_seconds: float = 10.0, overlap_seconds: float = 1.0, progress: bool = True
             ) -> np.ndarray:
    """Mix ``(8, n)`` normalised stems of any length into a ``(2, n)`` float32 array.

    The model only ever sees ``(1, 8, chunk)`` inputs (the last chunk zero-padded), so memory is
    bounded by the chunk size; consecutive chunks overlap by ``overlap_seconds`` and are cross-faded
    (``crossfade_weights``). Chunk starts are multiples of the model's ``length_multiple`` (when it
    has one) so every chunk sees the same pooling/decimation grid as a single pass would.
    """
    stems = torch.as_tensor(stems, dtype=torch.float32)
    if stems.ndim != 2:
        raise ValueError(f"stems must be (channels, samples), got shape {tuple(stems.shape)}")
    multiple = getattr(model, "length_multiple", 1)
    chunk = math.ceil(chunk_seconds * sample_rate / multiple) * multiple
    overlap = math.ceil(overlap_seconds * sample_rate / multiple) * multiple
    if not 0 <= 2 * overlap <= chunk:
        raise ValueError(f"overlap ({overlap} samples) must be between 0 and half the chunk "
                         f"({chunk} samples): chunk_seconds={chunk_seconds}, "
                         f"overlap_seconds={overlap_seconds}")
    hop = chunk - overlap
    length = stems.shape[-1]
    n_chunks = 1 + math.ceil(max(length - chunk, 0) / hop)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    mix = np.zeros((2, length), dtype=np.float32)
    for index in tqdm(range(n_chunks), desc="mixing", unit="chunk", disable=not progress):
        start = index * hop
        piece = stems[:, start:start + chunk]
        valid = piece.shape[-1]
        piece = F.pad(piece, (0, chunk - valid)).unsqueeze(0).to(device)
        output = model(piece)[0, :, :valid].float().cpu().numpy()
        weights = crossfade_weights(chunk, overlap, first=index == 0, last=index == n_chunks - 1)
        mix[:, start:start + valid] += output * weights[:valid]
    model.train(was_training)
    return mix
