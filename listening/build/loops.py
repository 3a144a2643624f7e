"""The loop listening test (loop paper, Section 5.3 and Fig. 6): rendered loops rated on a 1-5 scale.

Each system gives ``samples`` loops drawn at random (seeded per system name, so adding a system
leaves the others' draws alone). The familiarisation loops come from one system (the first by
default) and are never among its rated loops. Every loop is rendered by the project's synth (bass
and drums at one tempo; the tail of the last bar wraps onto the first, so the audio repeats
seamlessly) and all are matched to one loudness. A loop that renders silent (a generator's empty
phrase) cannot be judged for loop-likeness: it is skipped, counted in the manifest and replaced by
the next one drawn.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from datamodules.pianoroll import PHRASE_STEPS, STEPS_PER_BEAT
from datamodules.pianoroll.synth import render_phrases
from framework.config import ConfigError
from listening.build.audio import match_loudness, measure
from listening.build.kit import Clip, clip_entry, write_kit
from listening.build.loop_sources import PhraseSource, resolve_source

#: Most loops drawn per loop needed, so that silent ones can be replaced (only those needed are rendered).
CANDIDATES_PER_LOOP = 8


@dataclass
class SystemLoops:
    """One system's audible rendered loops, with its loudness and peak measurements."""

    source: str
    audio: list[np.ndarray] = field(default_factory=list)
    loudness: list[float] = field(default_factory=list)
    peaks: list[float] = field(default_factory=list)
    drawn: int = 0  # candidates drawn from the source; the first audible ones are used
    silent: int = 0


def system_seed(seed: int, name: str) -> int:
    """A seed of its own for each system name."""
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])


def render_system(source: PhraseSource, needed: int, seed: int, tempo: float, sr: int) -> SystemLoops:
    """Draw and render loops until ``needed`` are audible (or the draw runs out)."""
    loops = SystemLoops(source.description)
    phrases = source.draw(CANDIDATES_PER_LOOP * needed, seed)
    loops.drawn = len(phrases)
    for phrase in phrases:
        if len(loops.audio) == needed:
            break
        audio = render_phrases(phrase, tempo, sr)[None]
        loudness, peak = measure(audio, sr)
        if not np.isfinite(loudness):
            loops.silent += 1
            continue
        loops.audio.append(audio)
        loops.loudness.append(loudness)
        loops.peaks.append(peak)
    return loops


def loop_seconds(tempo: float) -> float:
    return PHRASE_STEPS * 60.0 / (tempo * STEPS_PER_BEAT)


def check_config(cfg: DictConfig) -> None:
    if not isinstance(cfg.systems, DictConfig) or not cfg.systems:
        raise ConfigError("systems=... is required: a mapping {name: phrase cache | generate.py output | checkpoint}, "
                          f"got {cfg.systems!r}")
    if cfg.samples < 1 or cfg.familiarisation < 0:
        raise ConfigError(f"samples={cfg.samples} must be at least 1 and familiarisation={cfg.familiarisation} "
                          "at least 0")
    if cfg.familiarisation_from is not None and cfg.familiarisation_from not in cfg.systems:
        raise ConfigError(f"familiarisation_from={cfg.familiarisation_from!r} is not one of the systems: "
                          f"{', '.join(cfg.systems)}")
    if not cfg.tempo > 0 or cfg.sample_rate < 8000:
        raise ConfigError(f"tempo={cfg.tempo} must be positive and sample_rate={cfg.sample_rate} at least 8000")
    if len(cfg.scale) < 2:
        raise ConfigError(f"scale needs at least two labels, got {list(cfg.scale)}")
    try:
        device = torch.device(cfg.device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"device={cfg.device} is not a torch device (cpu, cuda, cuda:1, ...)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device} but CUDA is not available here; use device=cpu")


def build_loop_test(cfg: DictConfig) -> dict:
    """Render, match and write the loop test described by ``cfg``; return a summary."""
    check_config(cfg)
    systems = OmegaConf.to_container(cfg.systems)
    sources = {name: resolve_source(name, spec, cfg.device) for name, spec in systems.items()}
    familiar = cfg.familiarisation_from or next(iter(systems))
    rendered = {}
    for name, source in sources.items():
        needed = cfg.samples + (cfg.familiarisation if name == familiar else 0)
        print(f"{name}: drawing {needed} loops from {source.description}")
        rendered[name] = render_system(source, needed, system_seed(cfg.seed, name), cfg.tempo, cfg.sample_rate)
        if len(rendered[name].audio) < needed:
            loops = rendered[name]
            raise ConfigError(f"systems.{name}: only {len(loops.audio)} audible loops of {loops.drawn} drawn "
                              f"({loops.silent} silent), {needed} needed")

    # Rated loops get ids in a shuffled order, so neither ids nor file names reveal their system.
    rated = [(name, index) for name in systems for index in range(cfg.samples)]
    order = np.random.default_rng(cfg.seed).permutation(len(rated))
    rated = [rated[i] for i in order]
    familiar_indices = range(cfg.samples, cfg.samples + cfg.familiarisation)
    everything = [(familiar, i) for i in familiar_indices] + rated
    match = match_loudness([rendered[n].loudness[i] for n, i in everything],
                           [rendered[n].peaks[i] for n, i in everything], cfg.loudness_lufs, cfg.peak_ceiling_db)
    width = len(str(len(rated)))
    ids = [f"f{k + 1}" for k in range(cfg.familiarisation)] + [f"s{k + 1:0{width}d}" for k in range(len(rated))]
    clips = [Clip(clip_id, rendered[n].audio[i] * np.float32(gain)) for clip_id, (n, i), gain in zip(ids, everything, match.gains)]

    seconds = loop_seconds(cfg.tempo)
    definition = {
        "kind": "loops", "title": cfg.title, "instructions": list(cfg.instructions), "post_url": cfg.post_url,
        "question": cfg.question, "attribute": cfg.attribute,
        "scale": [[value, label] for value, label in enumerate(cfg.scale, 1)],
        "min_listen_seconds": seconds if cfg.min_listen_seconds is None else float(cfg.min_listen_seconds),
        "familiarisation": [clip_entry(clip_id, seconds=seconds) for clip_id in ids[:cfg.familiarisation]],
        "stimuli": [clip_entry(clip_id, system=name, seconds=seconds)
                    for clip_id, (name, _) in zip(ids[cfg.familiarisation:], rated)],
    }
    provenance = {
        "systems": {name: {"source": loops.source, "candidates": loops.drawn, "silent_skipped": loops.silent}
                    for name, loops in rendered.items()},
        "familiarisation_from": familiar,
        "tempo": cfg.tempo, "seed": cfg.seed,
        "loudness": {"target_lufs": match.target_lufs, "matched_lufs": match.matched_lufs,
                     "measured_lufs": dict(zip(ids, match.measured_lufs.round(2).tolist()))},
    }
    test_id = write_kit(cfg.out, definition, clips, cfg.sample_rate, provenance, total=len(clips))
    return {"kind": "loops", "out": str(cfg.out), "id": test_id, "rated": len(rated),
            "familiarisation": cfg.familiarisation, "matched_lufs": match.matched_lufs,
            "silent_skipped": {name: loops.silent for name, loops in rendered.items() if loops.silent}}
