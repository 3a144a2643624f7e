"""Loudness normalisation: integrated loudness (ITU-R BS.1770-4) to a per-stem-type target."""
from __future__ import annotations

import functools

import numpy as np
import pyloudnorm

from datamodules.fxnorm.audio import as_audio, is_silent

#: Mean integrated loudness (LUFS) of the MUSDB18 training stems, per stem type.
MUSDB18_LOUDNESS = {"vocals": -30.73, "drums": -34.18, "bass": -29.73, "other": -31.17}

_BLOCK_SECONDS = 0.4


@functools.lru_cache(maxsize=8)
def _meter(sr: int) -> pyloudnorm.Meter:
    return pyloudnorm.Meter(sr, block_size=_BLOCK_SECONDS)


def integrated_loudness(audio: np.ndarray, sr: int) -> float:
    """Integrated gated loudness (LUFS) of (channels, samples) audio, measured by pyloudnorm.

    Channel weights are 1 (mono and stereo). ``-inf`` when every block is below -70 LUFS; audio
    no longer than one 0.4 s gating block is rejected.
    """
    audio = as_audio(audio)
    if audio.shape[1] / sr <= _BLOCK_SECONDS:
        raise ValueError(f"loudness needs more than {_BLOCK_SECONDS} s of audio, got {audio.shape[1] / sr:.3f} s")
    with np.errstate(divide="ignore"):
        return float(_meter(int(sr)).integrated_loudness(audio.T))


def normalize_loudness(audio: np.ndarray, sr: int, target_lufs: float) -> np.ndarray:
    """Scale ``audio`` to ``target_lufs`` integrated loudness, then down if its peak would exceed 1.

    Silent stems (peak <= -50 dBFS) and stems with no block above the absolute gate are returned
    unchanged.
    """
    audio = as_audio(audio)
    if is_silent(audio):
        return audio.copy()
    loudness = integrated_loudness(audio, sr)
    if not np.isfinite(loudness):
        return audio.copy()
    out = audio * 10.0 ** ((target_lufs - loudness) / 20.0)
    peak = np.max(np.abs(out))
    return out / peak if peak > 1.0 else out
