"""Bulk ingest: a folder of MIDI files -> a resumable phrase cache, with every skipped file counted.

``python -m datamodules.pianoroll SRC OUT [--workers N] [--chunk-size N]``
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from datamodules.pianoroll.cache import REPORT_NAME, SHARD_PATTERN, write_report, write_shard
from datamodules.pianoroll.layout import PACKED_BYTES
from datamodules.pianoroll.midi_reader import SkipFile, compile_kernels, midi_to_packed_windows

NO_PHRASES = "no_phrases"
PARSE_ERROR = "parse_error"
_REPORT_EXAMPLES = 5
_NO_PACKED, _NO_STARTS = np.zeros((0, PACKED_BYTES), dtype=np.uint8), np.zeros(0, dtype=np.int64)


def _ingest_chunk(job: tuple[str, str, list[str]]) -> int:
    """Convert one chunk of files into one shard; returns the number of files processed."""
    src, shard, files = job
    packed, phrase_file, start_bars, file_phrases, file_reasons = [], [], [], [], []
    for index, name in enumerate(files):
        phrases, starts, reason = _NO_PACKED, _NO_STARTS, ""
        try:
            phrases, starts = midi_to_packed_windows(os.path.join(src, name))
            reason = "" if len(phrases) else NO_PHRASES
        except SkipFile as skip:
            reason = skip.reason
        except Exception as error:  # a defect met in one file must not stop a run over 100,000s of them
            reason = f"{PARSE_ERROR}:{type(error).__name__}"
        packed.append(phrases)
        phrase_file.append(np.full(len(phrases), index))
        start_bars.append(starts)
        file_phrases.append(len(phrases))
        file_reasons.append(reason)
    write_shard(
        Path(shard),
        np.concatenate(packed),
        np.concatenate(phrase_file),
        np.concatenate(start_bars),
        files,
        file_phrases,
        file_reasons,
    )
    return len(files)


def _shard_is_current(shard: Path, files: list[str]) -> bool:
    """True when a shard exists and was made from exactly these files (so a re-run may skip it);
    a damaged shard (empty, cut short, not an archive) is not current and is made again."""
    if not shard.is_file():
        return False
    try:
        with np.load(shard) as arrays:
            return arrays["files"].tolist() == files
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return False


def _midi_files(src: Path) -> list[str]:
    """Relative paths (with "/") of the .mid/.midi files under ``src``, sorted; linked folders are followed."""
    found = []
    for folder, _, names in os.walk(src, followlinks=True):
        relative = Path(folder).relative_to(src).as_posix()
        for name in names:
            if os.path.splitext(name)[1].lower() in (".mid", ".midi") and os.path.isfile(os.path.join(folder, name)):
                found.append(name if relative == "." else f"{relative}/{name}")
    return sorted(found)


def ingest(src: str | Path, out: str | Path, workers: int = 1, chunk_size: int = 256, progress: bool = True) -> dict:
    """Convert every MIDI file under ``src`` into a phrase cache at ``out``; returns the report.

    Files are taken in sorted relative-path order, ``chunk_size`` to a shard; each shard is written
    atomically and a re-run skips the shards that already hold their chunk, so an interrupted run
    resumes. ``workers`` > 1 converts chunks in that many spawned processes; the cache is the same.
    ``out/report.json`` (written last) counts files seen, files used, phrases and skip reasons.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"MIDI folder not found: {src}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    files = _midi_files(src)
    chunks = [files[i : i + chunk_size] for i in range(0, len(files), chunk_size)]
    shards = [out / SHARD_PATTERN.format(i) for i in range(len(chunks))]
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(str(src), str(shard), chunk) for shard, chunk in zip(shards, chunks) if not _shard_is_current(shard, chunk)]
    compile_kernels()  # before any worker starts: they then share one compiled cache
    with tqdm(total=len(files), initial=len(files) - sum(len(job[2]) for job in jobs), unit="file", desc="ingest", disable=not progress) as bar:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                bar.update(_ingest_chunk(job))
        else:
            with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
                for done in pool.imap_unordered(_ingest_chunk, jobs):
                    bar.update(done)
    report = _summarise(shards)
    report["source"] = str(src)
    report["chunk_size"] = chunk_size
    write_report(out, report)
    return report


def _summarise(shards: list[Path]) -> dict:
    """The ingest report, rebuilt from the per-file outcomes stored in the shards."""
    skipped: Counter = Counter()
    examples: dict[str, list[str]] = {}
    files_seen = files_used = phrases = 0
    for shard in shards:
        with np.load(shard) as arrays:
            files, counts, reasons = arrays["files"], arrays["file_phrases"], arrays["file_reasons"]
        files_seen += len(files)
        files_used += int(np.count_nonzero(counts))
        phrases += int(counts.sum())
        for name, reason in zip(files[reasons != ""], reasons[reasons != ""]):
            skipped[str(reason)] += 1
            if len(examples.setdefault(str(reason), [])) < _REPORT_EXAMPLES:
                examples[str(reason)].append(str(name))
    return {
        "files_seen": files_seen,
        "files_used": files_used,
        "phrases": phrases,
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": dict(sorted(examples.items())),
        "shards": [shard.name for shard in shards],
    }


def main(argv: list[str] | None = None) -> dict:
    """The command line; a missing MIDI folder or unusable output path ends it with one line (exit code 2)."""
    parser = argparse.ArgumentParser(prog="python -m datamodules.pianoroll", description="Convert a folder of MIDI files into a bass+drum phrase cache.")
    parser.add_argument("src", type=Path, help="folder searched recursively for .mid/.midi files")
    parser.add_argument("out", type=Path, help="cache folder (shards + report.json); an existing one is resumed")
    parser.add_argument("--workers", type=int, default=1, help="processes converting chunks in parallel")
    parser.add_argument("--chunk-size", type=int, default=256, help="files per shard")
    args = parser.parse_args(argv)
    try:
        report = ingest(args.src, args.out, workers=args.workers, chunk_size=args.chunk_size)
    except (OSError, ValueError) as error:  # a missing folder, an output path that is a file, a bad --chunk-size
        parser.exit(2, f"{parser.prog}: {error}\n")
    print(
        f"{report['files_seen']} files, {report['files_used']} used, {report['phrases']} phrases; "
        f"skipped: {json.dumps(report['skipped'])}; report: {args.out / REPORT_NAME}"
    )
    return report

