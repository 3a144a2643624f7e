"""MIDI -> phrase ingest: our bulk path against the authors' tool chain, on the demo MIDI songs.

Reference: pretty_midi parsing, ``pypianoroll.from_pretty_midi`` at 24 ticks per beat, then
floor-resampling to sixteenths (a step is active when any of its six sub-steps is) and the same
track choice, bass range, lowest-note and window rules. Both must give the same phrases on every file
where the two definitions agree: pypianoroll's rounding to 1/24 beat puts every chosen note on the
same sixteenths as our floor/ceil, and the time signatures all sit on the first track (pretty_midi
reads no others). Then ingest is timed with 1..N
worker processes on a larger copy of the set. The ours/reference speed ratio is printed last.

    python benchmarks/ingest.py [--demo-root data/demo] [--copies 10]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pretty_midi  # noqa: E402
import pypianoroll  # noqa: E402

from datamodules.demo import ensure_demo_data  # noqa: E402
from datamodules.pianoroll import (  # noqa: E402
    BASS_HIGHEST,
    BASS_LOWEST,
    DRUM_CLASS_NOTES,
    N_COLUMNS,
    N_DRUM_CLASSES,
    _midi_files,
    ingest,
    load_phrase_cache,
    midi_to_windows,
    window_phrases,
)

RESOLUTION = 24
SUBSTEPS = RESOLUTION // 4
CLASS_OF_NOTE = {note: column for column, notes in enumerate(DRUM_CLASS_NOTES) for note in notes}


def reference_windows(path: Path) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """The authors' chain for one file: (phrases, start bars, definitions agree) or None if skipped."""
    midi = pretty_midi.PrettyMIDI(str(path))
    signatures = midi.time_signature_changes
    if not signatures or any((s.numerator, s.denominator) != (4, 4) for s in signatures):
        return None
    drums = next((i for i, inst in enumerate(midi.instruments) if inst.is_drum), None)
    bass = next((i for i, inst in enumerate(midi.instruments) if not inst.is_drum and 32 <= inst.program <= 39), None)
    if drums is None or bass is None:
        return None
    multitrack = pypianoroll.from_pretty_midi(midi, resolution=RESOLUTION)
    drum_roll = multitrack.tracks[drums].pianoroll > 0
    bass_roll = multitrack.tracks[bass].pianoroll[:, BASS_LOWEST : BASS_HIGHEST + 1] > 0

    steps = -(-max(len(drum_roll), len(bass_roll)) // SUBSTEPS)
    grid = np.zeros((steps, N_COLUMNS), dtype=bool)
    for substep, note in zip(*np.nonzero(drum_roll)):
        if note in CLASS_OF_NOTE:
            grid[substep // SUBSTEPS, CLASS_OF_NOTE[note]] = True
    padded = np.zeros((steps * SUBSTEPS, bass_roll.shape[1]), dtype=bool)
    padded[: len(bass_roll)] = bass_roll
    sounding = padded.reshape(steps, SUBSTEPS, -1).any(axis=1)
    rows = np.flatnonzero(sounding.any(axis=1))
    grid[rows, N_DRUM_CLASSES + sounding[rows].argmax(axis=1)] = True
    active = np.flatnonzero(grid.any(axis=1))
    grid = grid[: active[-1] + 1 if len(active) else 0]

    return *window_phrases(grid), quantisations_agree(midi, drums, bass)


def quantisations_agree(midi: pretty_midi.PrettyMIDI, drums: int, bass: int) -> bool:
    """Whether pypianoroll's quantisation (onsets rounded, offsets truncated to 1/24 beat, then floored
    to sixteenths) puts every chosen note on the same sixteenths as ours (floor onset, ceil offset)."""
    def beats(notes, attribute):
        return np.array([midi.time_to_tick(getattr(n, attribute)) for n in notes], dtype=float) / midi.resolution

    for index in (drums, bass):
        notes = midi.instruments[index].notes
        on = beats(notes, "start")
        on_substep = np.round(on * RESOLUTION)
        if np.any(on_substep // SUBSTEPS != np.floor(on * 4)):
            return False
        if index == bass:
            off = beats(notes, "end")
            off_substep = np.trunc(off * RESOLUTION)
            if np.any(off_substep - on_substep < 2) or np.any((off_substep - 1) // SUBSTEPS != np.ceil(off * 4) - 1):
                return False
    return True


def signatures_only_on_first_track(path: Path) -> bool:
    import mido

    return not any(m.type == "time_signature" for track in mido.MidiFile(path).tracks[1:] for m in track)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-root", type=Path, default=Path("data/demo"))
    parser.add_argument("--copies", type=int, default=10, help="copies of the demo set for the worker scaling run")
    parser.add_argument("--max-workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    src = ensure_demo_data(args.demo_root, parts=("midi",)) / "midi"
    files = _midi_files(src)
    midi_to_windows(src / files[0])  # load the compiled event scanner before timing
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        report = ingest(src, tmp / "ours", workers=1, progress=False)
        ours_seconds = time.perf_counter() - start
        cache = load_phrase_cache(tmp / "ours")

        start = time.perf_counter()
        reference = {name: reference_windows(src / name) for name in files}
        reference_seconds = time.perf_counter() - start

        compared = agreeing = 0
        differing = []
        for name in files:
            mine = cache.sources == name
            ref = reference[name]
            ref_phrases = ref[0] if ref is not None else np.zeros((0, 128, N_COLUMNS), bool)
            ours_phrases = np.unpackbits(cache.packed[mine], axis=1).reshape(-1, 128, N_COLUMNS).astype(bool)
            definitions_agree = (ref is None or ref[2]) and signatures_only_on_first_track(src / name)
            if not definitions_agree:
                differing.append(name)
                continue
            compared += 1
            assert np.array_equal(ours_phrases, ref_phrases), f"{name}: phrases differ from the reference chain"
            if ref is not None:
                assert np.array_equal(cache.start_bars[mine], ref[1]), f"{name}: start bars differ"
            agreeing += 1
        ref_phrase_count = sum(len(r[0]) for r in reference.values() if r is not None)
        print(f"{len(files)} demo files; {report['phrases']} phrases (reference: {ref_phrase_count}); skipped {report['skipped']}")
        print(f"same phrases on all {agreeing} of {compared} files where the definitions agree "
              f"({len(differing)} files excluded: notes quantised differently or time signatures beyond track 0)")
        ours_rate = report["phrases"] / ours_seconds
        reference_rate = ref_phrase_count / reference_seconds
        print(f"ours (ingest, 1 process):        {ours_seconds:7.3f} s  {len(files) / ours_seconds:8.1f} files/s  {ours_rate:9.1f} phrases/s")
        print(f"pretty_midi + pypianoroll chain: {reference_seconds:7.3f} s  {len(files) / reference_seconds:8.1f} files/s  {reference_rate:9.1f} phrases/s")

        big = tmp / "copies"
        for copy in range(args.copies):
            shutil.copytree(src, big / f"{copy:03d}")
        n_big = len(files) * args.copies
        print(f"`python -m datamodules.pianoroll` on {n_big} files ({args.copies} copies; process start-up included):")
        for workers in range(1, args.max_workers + 1):
            command = [sys.executable, "-m", "datamodules.pianoroll", str(big), str(tmp / f"w{workers}"), "--workers", str(workers), "--chunk-size", "64"]
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True, cwd=Path(__file__).resolve().parents[1])
            seconds = time.perf_counter() - start
            print(f"  {workers} worker(s): {seconds:7.3f} s  {n_big / seconds:8.1f} files/s")
    print(f"speed ratio ours/reference (files/s, one process): {reference_seconds / ours_seconds:.1f}x")


if __name__ == "__main__":
    main()
