"""Demo audio loops: loop patterns of the MIDI songs' family, synthesised, with ``metadata.csv``."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from datamodules.demo import patterns
from datamodules.pianoroll.synth import render_phrases

LOOP_SR = 22050


def demo_loop(style: patterns.Style, rng: np.random.Generator, n_bars: int) -> list[patterns.Bar]:
    """A loop of 1, 2, 4 or 8 bars; 8-bar loops repeat a 2- or 4-bar pattern and end with a fill."""
    if n_bars <= 4:
        return patterns.loop_pattern(style, rng, n_bars)
    base = patterns.loop_pattern(style, rng, int(rng.choice([2, 4])))
    bars = [base[index % len(base)] for index in range(n_bars)]
    bars[-1] = patterns.Bar(style.steps, patterns.drum_bar(style, rng, variation=0.5, fill=True), bars[-1].bass)
    return bars


def build_loops(stage: Path, seed: int, n_loops: int = 300) -> None:
    """Write ``stage/loops/loop_<i>.wav`` and ``stage/loops/metadata.csv``."""
    rng = np.random.default_rng([seed, 2])
    folder = stage / "loops"
    folder.mkdir(parents=True)
    rows = []
    for index in tqdm(range(n_loops), desc="demo audio loops", unit="loop"):
        n_bars = int(rng.choice([1, 2, 4, 8], p=[0.3, 0.3, 0.25, 0.15]))
        bpm = int(rng.integers(80, 161))
        bars = demo_loop(patterns.random_style(rng), rng, n_bars)
        audio = render_phrases(patterns.song_roll(bars), bpm, sr=LOOP_SR)
        name = f"loop_{index:03d}.wav"
        sf.write(folder / name, audio, LOOP_SR, subtype="PCM_16")
        rows.append((name, bpm, n_bars))
    with open(folder / "metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("file", "bpm", "bars"))
        writer.writerows(rows)
