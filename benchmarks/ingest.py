"""MIDI -> phrase ingest: our bulk path against the authors' tool chain, on the same files.

Reference: pretty_midi parsing, ``pypianoroll.from_pretty_midi`` at 24 ticks per beat, then
floor-resampling to sixteenths (a step is active when any of its six sub-steps is) and the same
track choice, bass range, lowest-note and window rules. Both must give the same phrases on every file
where the two definitions agree: pypianoroll's rounding to 1/24 beat puts every chosen note on the
same sixteenths as our floor/ceil, and the time signatures all sit on the first track (pretty_midi
reads no others). Ours is ``ingest`` (reading, phrases, packing, shard writing) in one process;
each chain runs ``--repeats`` times, alternately, and its fastest run counts.
Then ``python -m datamodules.pianoroll`` runs with 1..N worker processes on ``--copies`` and on
half as many copies of the set: the difference of the two runs is the rate without process
start-up, and the 2-worker rate gives the projected time for Lakh MIDI's 176,581 files. The
ours/reference speed ratio is printed last.

    python benchmarks/ingest.py [--demo-root data/demo] [--copies 10]
    python benchmarks/ingest.py --midi /data/lmd_full --limit 2000     # a sample of real files
"""
from __future__ import annotations

import argparse
import os
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
    ingest,
    load_phrase_cache,
    window_phrases,
)
from datamodules.pianoroll.ingestion import _midi_files  # noqa: E402
from datamodules.pianoroll.midi_reader import compile_kernels  # noqa: E402

LAKH_FILES = 176_581
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


def linked_copies(src: Path, files: list[str], out: Path, copies: int) -> Path:
    """``copies`` folders of symbolic links to ``files`` under ``out`` (a set to ingest, no bytes copied)."""
    for copy in range(copies):
        for name in files:
            link = out / f"{copy:03d}" / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((src / name).resolve())
    return out


def command_seconds(folder: Path, out: Path, workers: int) -> float:
    """Wall time of the ingest command line on ``folder``, process start-up included."""
    command = [sys.executable, "-m", "datamodules.pianoroll", str(folder), str(out), "--workers", str(workers), "--chunk-size", "64"]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=Path(__file__).resolve().parents[1])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-root", type=Path, default=Path("data/demo"))
    parser.add_argument("--midi", type=Path, default=None, help="a folder of MIDI files instead of the demo songs")
    parser.add_argument("--limit", type=int, default=None, help="use the first N files (sorted) of the folder")
    parser.add_argument("--copies", type=int, default=10, help="copies of the set for the worker scaling run")
    parser.add_argument("--max-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each chain (the fastest counts)")
    args = parser.parse_args()

    src = args.midi or ensure_demo_data(args.demo_root, parts=("midi",)) / "midi"
    files = _midi_files(src)[: args.limit]
    megabytes = sum((src / name).stat().st_size for name in files) / 1e6
    compile_kernels()  # load the compiled reader before timing
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        chosen = linked_copies(src, files, tmp / "set", 1) / "000"
        ours_times, reference_times = [], []
        for repeat in range(args.repeats):  # alternate, so that load on a shared machine hits both alike
            start = time.perf_counter()
            report = ingest(chosen, tmp / f"ours{repeat}", workers=1, progress=False)
            ours_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            reference = {name: reference_windows(src / name) for name in files}
            reference_times.append(time.perf_counter() - start)
        ours_seconds, reference_seconds = min(ours_times), min(reference_times)
        cache = load_phrase_cache(tmp / "ours0")
        sources = cache.sources
        packed = np.asarray(cache.packed)

        compared = 0
        differing = []
        for name in files:
            mine = sources == name
            ref = reference[name]
            ref_phrases = ref[0] if ref is not None else np.zeros((0, 128, N_COLUMNS), bool)
            ours_phrases = np.unpackbits(packed[mine], axis=1).reshape(-1, 128, N_COLUMNS).astype(bool)
            if not ((ref is None or ref[2]) and signatures_only_on_first_track(src / name)):
                differing.append(name)
                continue
            compared += 1
            assert np.array_equal(ours_phrases, ref_phrases), f"{name}: phrases differ from the reference chain"
            if ref is not None:
                assert np.array_equal(cache.start_bars[mine], ref[1]), f"{name}: start bars differ"
        ref_phrase_count = sum(len(r[0]) for r in reference.values() if r is not None)
        print(f"{len(files)} files ({megabytes / len(files) * 1e3:.1f} kB on average) from {src}; {report['phrases']} "
              f"phrases (reference: {ref_phrase_count}); skipped {report['skipped']}")
        print(f"same phrases and start bars on all {compared} files where the definitions agree "
              f"({len(differing)} files excluded: notes quantised differently or time signatures beyond track 0)")
        for name, seconds, phrases in (("ours (ingest, 1 process)", ours_seconds, report["phrases"]),
                                       ("pretty_midi + pypianoroll chain", reference_seconds, ref_phrase_count)):
            print(f"{name:32s} {seconds:7.3f} s  {len(files) / seconds:8.1f} files/s  {phrases / seconds:9.1f} phrases/s "
                  f"(fastest of {args.repeats})")

        sets = {copies: linked_copies(src, files, tmp / f"copies{copies}", copies) for copies in (args.copies // 2, args.copies)}
        print(f"`python -m datamodules.pianoroll` on {args.copies // 2} and {args.copies} copies of the set:")
        rates = {}
        for workers in range(1, args.max_workers + 1):
            seconds = {copies: command_seconds(folder, tmp / f"w{workers}-{copies}", workers) for copies, folder in sets.items()}
            rates[workers] = len(files) * (args.copies - args.copies // 2) / (seconds[args.copies] - seconds[args.copies // 2])
            print(f"  {workers} worker(s): {len(files) * args.copies} files in {seconds[args.copies]:7.3f} s "
                  f"(start-up included); {rates[workers]:8.1f} files/s without start-up")
    workers = min(2, args.max_workers)
    print(f"projected for Lakh MIDI's {LAKH_FILES:,} files at the {workers}-worker rate: "
          f"{LAKH_FILES / rates[workers] / 60:.1f} min (files of this set's size)")
    print(f"speed ratio ours/reference (files/s, one process): {reference_seconds / ours_seconds:.1f}x")


if __name__ == "__main__":
    main()
