"""Built-in demo data, so that every experiment runs without a download.

``python -m datamodules.demo OUT [--seed 0] [--parts midi,loops,multitrack]`` or :func:`make_demo`
writes, deterministically for a seed, any of three parts:

``midi``
    ``OUT/midi/<group>/song_<i>.mid``: ~200 songs of 16-48 bars with a drum track (channel 10), a
    bass track (GM program 32-39) and a distractor (piano, guitar or strings). Most are 4/4; about 6%
    are 3/4 and about 3% have no bass track (both kinds are for the phrase ingest to skip); about
    20% change tempo (a jump or a closing ritardando). Songs are loop sections and through-composed
    sections (see :mod:`datamodules.demo.patterns`) followed by one closing bar (crash, held root).

    ``OUT/labels.json`` maps each file's path relative to ``OUT/midi`` to
    ``{"loop": [start bars], "non_loop": [start bars]}`` of 8-bar windows (bars s .. s+7):

    - *loop*: the window lies entirely inside one loop section, i.e. it repeats one 1-, 2- or 4-bar
      pattern exactly;
    - *non_loop*: every bar of the window is through-composed material (possibly from two adjacent
      through-composed sections);
    - anything else (a window straddling a section boundary, touching the closing bar, or in a 3/4 or
      bass-less file) is left unlabelled. Window start bars are the phrase pipeline's: beat 0 is the
      start of the file and a 4/4 bar is 16 sixteenth-note steps, so ``(path, start bar)`` joins with
      the output of :func:`datamodules.pianoroll.midi_to_windows`. Every bar holds at least 4 drum
      onsets and 4 bass cells, so every labelled window passes the phrase density rules.

``loops``
    ``OUT/loops/loop_<i>.wav``: ~300 mono 16-bit loops at 22,050 Hz, rendered by
    :mod:`datamodules.pianoroll.synth` from loop patterns of the MIDI songs' family at 80-160 BPM: 1-, 2- and
    4-bar patterns, and 8-bar loops (a 2- or 4-bar pattern with a fill in bar 8). ``OUT/loops/metadata.csv``
    has columns ``file,bpm,bars``.

``multitrack``
    ``OUT/multitrack/{train,test}/<song>/*.wav`` and ``OUT/dry/<song>/*.wav`` from
    :func:`datamodules.demo.multitrack.write_multitrack_demo`, which is called with a fresh staging
    folder standing in for ``OUT`` and must create ``multitrack/`` and ``dry/`` inside it.

Each part is built in a temporary folder inside ``OUT`` and moved into place only when complete;
then a marker file ``OUT/.demo-<part>.json`` is written. :func:`ensure_demo_data` builds only the
parts whose marker is absent, so a killed run leaves at most a ``.tmp-*`` folder that is ignored.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from datamodules.demo.audio_loops import build_loops
from datamodules.demo.midi_songs import build_midi
from framework.io import atomic_path

ALL_PARTS = ("midi", "loops", "multitrack")
PART_OUTPUTS = {"midi": ("midi", "labels.json"), "loops": ("loops",), "multitrack": ("multitrack", "dry")}


def marker_path(root: str | os.PathLike, part: str) -> Path:
    return Path(root) / f".demo-{part}.json"


def build_multitrack(stage: Path, seed: int) -> None:
    """Write ``stage/multitrack/`` and ``stage/dry/`` with the multitrack demo writer."""
    from datamodules.demo.multitrack import write_multitrack_demo

    write_multitrack_demo(stage, seed)


def _build_part(root: Path, part: str, seed: int, builder: Callable[[Path, int], None]) -> None:
    """Run ``builder`` in a staging folder inside ``root``, move its outputs into place, then mark the part done."""
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".tmp-demo-{part}-", dir=root) as staging:
        stage = Path(staging)
        builder(stage, seed)
        missing = [name for name in PART_OUTPUTS[part] if not (stage / name).exists()]
        if missing:
            raise RuntimeError(f"demo part {part!r} did not produce {missing} in {stage}")
        for name in PART_OUTPUTS[part]:
            with atomic_path(root / name) as target:
                os.replace(stage / name, target)
    with atomic_path(marker_path(root, part)) as marker:
        marker.write_text(json.dumps({"part": part, "seed": seed}) + "\n")


def _check_parts(parts: Iterable[str]) -> tuple[str, ...]:
    parts = tuple(parts)
    unknown = sorted(set(parts) - set(ALL_PARTS))
    if unknown:
        raise ValueError(f"unknown demo parts {unknown}; choose from {list(ALL_PARTS)}")
    return parts


def make_demo(out: str | os.PathLike, seed: int = 0, parts: Iterable[str] = ALL_PARTS, *,
              n_songs: int = 200, n_loops: int = 300) -> Path:
    """Build (or rebuild) the requested demo parts under ``out``; returns ``out`` as a Path."""
    root = Path(out)
    builders = {
        "midi": lambda stage, seed: build_midi(stage, seed, n_songs=n_songs),
        "loops": lambda stage, seed: build_loops(stage, seed, n_loops=n_loops),
        "multitrack": build_multitrack,
    }
    for part in _check_parts(parts):
        _build_part(root, part, seed, builders[part])
    return root


def part_is_complete(root: str | os.PathLike, part: str) -> bool:
    """Whether ``part`` has its completion marker and all its outputs under ``root``."""
    root = Path(root)
    return marker_path(root, part).exists() and all((root / name).exists() for name in PART_OUTPUTS[part])


def ensure_demo_data(root: str | os.PathLike, parts: Iterable[str] = ("midi", "loops"), seed: int = 0) -> Path:
    """Build each requested part that is not complete under ``root`` (marker or an output absent); returns ``root``."""
    root = Path(root)
    missing = [part for part in _check_parts(parts) if not part_is_complete(root, part)]
    if missing:
        make_demo(root, seed=seed, parts=missing)
    return root


def ensure_demo_input(path: str | os.PathLike, demo_root: str | os.PathLike | None, part: str) -> Path:
    """Make sure an input folder exists, creating demo ``part`` when ``path`` lies under ``demo_root``.

    For DataModules' ``prepare_data``: a missing folder inside the demo root is created with
    :func:`ensure_demo_data`; any other missing folder is an error naming it.
    """
    path = Path(path)
    if not path.exists() and demo_root is not None and path.resolve().is_relative_to(Path(demo_root).resolve()):
        ensure_demo_data(demo_root, parts=(part,))
    if not path.exists():
        raise FileNotFoundError(f"input folder {path} does not exist"
                                + (f" (and is not inside the demo root {demo_root})" if demo_root is not None else ""))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m datamodules.demo", description="Write the built-in demo data set.")
    parser.add_argument("out", help="output folder (the demo root)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", default=",".join(ALL_PARTS), help=f"comma-separated subset of {','.join(ALL_PARTS)}")
    args = parser.parse_args(argv)
    root = make_demo(args.out, seed=args.seed, parts=[part for part in args.parts.split(",") if part])
    print(f"demo data written to {root}")
