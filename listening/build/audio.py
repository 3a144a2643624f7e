"""Stimulus audio: one loudness for every stimulus of a test, edge fades, and FLAC bytes for the page.

Loudness is the integrated loudness of ITU-R BS.1770 as pyloudnorm measures it (the project's
vectorised meter, tested equal to ``pyloudnorm.Meter``). Matching raises or lowers each stimulus to
one target; when that would push any stimulus's sample peak above the ceiling, the target is lowered
for *all* of them, so they stay matched instead of one being limited.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import soundfile as sf

from datamodules.fxnorm.audio import as_audio, peak
from datamodules.fxnorm.loudness import integrated_loudness


@dataclass(frozen=True)
class LoudnessMatch:
    """Gains that bring stimuli to one loudness, and the loudness they land on."""

    gains: np.ndarray  # linear gain per stimulus
    measured_lufs: np.ndarray  # each stimulus's loudness before its gain
    target_lufs: float  # the loudness asked for
    matched_lufs: float  # the loudness every stimulus has after its gain (target or lower)


def measure(audio: np.ndarray, sr: int) -> tuple[float, float]:
    """Integrated loudness (LUFS; ``-inf`` for silence) and sample peak of (channels, samples) audio."""
    audio = as_audio(audio)
    return integrated_loudness(audio, sr), peak(audio)


def match_loudness(loudness: Sequence[float], peaks: Sequence[float], target_lufs: float,
                   ceiling_db: float) -> LoudnessMatch:
    """Gains that give every stimulus the loudness ``target_lufs``, or one common lower loudness.

    ``loudness`` and ``peaks`` are each stimulus's measurements before any gain. If some stimulus
    would peak above ``ceiling_db`` dBFS at the target, every stimulus is brought to the highest
    loudness at which none does.
    """
    loudness = np.asarray(loudness, dtype=float)
    peaks = np.asarray(peaks, dtype=float)
    if loudness.shape != peaks.shape or loudness.ndim != 1 or not len(loudness):
        raise ValueError(f"need one loudness and one peak per stimulus, got {loudness.shape} and {peaks.shape}")
    if not np.all(np.isfinite(loudness)) or not np.all(peaks > 0):
        raise ValueError("every stimulus must be audible (finite loudness, non-zero peak) to be loudness-matched")
    peak_at_target_db = 20.0 * np.log10(peaks) + (target_lufs - loudness)
    matched = target_lufs + min(0.0, ceiling_db - float(peak_at_target_db.max()))
    return LoudnessMatch(10.0 ** ((matched - loudness) / 20.0), loudness, float(target_lufs), float(matched))


def fade_edges(audio: np.ndarray, sr: int, seconds: float) -> np.ndarray:
    """A copy of (channels, samples) audio with raised-cosine fades of ``seconds`` at both ends."""
    out = np.array(audio, dtype=np.float32)
    length = min(int(round(seconds * sr)), out.shape[-1] // 2)
    if length > 0:
        ramp = (0.5 - 0.5 * np.cos(np.pi * (np.arange(length) + 0.5) / length)).astype(np.float32)
        out[..., :length] *= ramp
        out[..., -length:] *= ramp[::-1]
    return out


def flac_bytes(audio: np.ndarray, sr: int) -> bytes:
    """(channels, samples) float audio as a 16-bit FLAC file (CD resolution; every current browser decodes it)."""
    buffer = io.BytesIO()
    sf.write(buffer, np.asarray(audio, dtype=np.float32).T, sr, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()
