"""The bit-packed phrase cache: shards of (N, 912) uint8 phrases with their source file and start bar."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from datamodules.pianoroll.layout import N_COLUMNS, PACKED_BYTES, PHRASE_STEPS
from framework.io import atomic_path

if TYPE_CHECKING:
    import torch

REPORT_NAME = "report.json"
SHARD_PATTERN = "shard-{:06d}.npz"
FIRST_STEP_BYTES = -(-N_COLUMNS // 8)  # packed bytes that hold step 0 of a phrase


def pack_phrases(phrases: np.ndarray) -> np.ndarray:
    """(N, 128, 57) bool -> (N, 912) uint8, the cells of each phrase in row-major order, 8 to a byte."""
    phrases = np.asarray(phrases, dtype=bool)
    return np.packbits(phrases.reshape(len(phrases), PHRASE_STEPS * N_COLUMNS), axis=1)


def _bits(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (..., B) -> bool (..., 8 B), most significant bit first (``np.packbits`` order)."""
    import torch  # here, not at the top: ingest worker processes start much faster without torch

    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).flatten(-2).bool()


def unpack_phrases(packed: torch.Tensor) -> torch.Tensor:
    """(N, 912) uint8 -> (N, 128, 57) bool, with torch ops on the tensor's own device."""
    import torch

    if packed.dtype != torch.uint8 or packed.shape[-1] != PACKED_BYTES:
        raise ValueError(f"expected uint8 (N, {PACKED_BYTES}), got {packed.dtype} {tuple(packed.shape)}")
    return _bits(packed).reshape(*packed.shape[:-1], PHRASE_STEPS, N_COLUMNS)


def unpack_first_steps(packed, index=None) -> torch.Tensor:
    """Step 0 of packed phrases (N, 912) uint8 (only rows ``index``, when given) -> (N, 57) bool.

    Reads only the first bytes of each row, so a large (or memory-mapped) cache is never unpacked whole.
    """
    import torch

    head = torch.as_tensor(packed[:, :FIRST_STEP_BYTES])
    if index is not None:
        head = head[torch.as_tensor(index, dtype=torch.long)]
    return _bits(head)[:, :N_COLUMNS]


@dataclass
class PhraseCache:
    """A phrase cache in memory: packed phrases with the source file (relative path) and start bar of each."""

    packed: np.ndarray  # (N, 912) uint8
    sources: np.ndarray  # (N,) str (object array sharing one string per file)
    start_bars: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.packed)

    def subset(self, index: np.ndarray) -> "PhraseCache":
        """The phrases selected by an index or boolean mask."""
        return PhraseCache(self.packed[index], self.sources[index], self.start_bars[index])


def write_shard(path: Path, packed, phrase_file, start_bars, files, file_phrases, file_reasons) -> None:
    """One shard: phrases (packed, index into ``files``, start bar) and the outcome of each file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(
            handle,
            packed=np.asarray(packed, dtype=np.uint8).reshape(-1, PACKED_BYTES),
            phrase_file=np.asarray(phrase_file, dtype=np.int64),
            start_bars=np.asarray(start_bars, dtype=np.int64),
            files=np.asarray(files, dtype=str),
            file_phrases=np.asarray(file_phrases, dtype=np.int64),
            file_reasons=np.asarray(file_reasons, dtype=str),
        )


def write_report(out: Path, report: dict) -> None:
    with atomic_path(out / REPORT_NAME) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")


def write_phrase_cache(out: str | Path, packed: np.ndarray, sources, start_bars, report: dict | None = None) -> None:
    """Write phrases (e.g. a subset of another cache) as a phrase cache folder, atomically.

    ``report`` (optional) is stored in report.json alongside the phrase count and shard list.
    """
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.ndim != 2 or packed.shape[1] != PACKED_BYTES:
        raise ValueError(f"packed must be (N, {PACKED_BYTES}) uint8, got {packed.shape}")
    sources = np.asarray(sources, dtype=str)
    start_bars = np.asarray(start_bars)
    if not len(sources) == len(start_bars) == len(packed):
        raise ValueError(f"{len(packed)} phrases but {len(sources)} sources and {len(start_bars)} start bars")
    files, phrase_file, file_phrases = np.unique(sources, return_inverse=True, return_counts=True)
    shard = SHARD_PATTERN.format(0)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        write_shard(tmp / shard, packed, phrase_file, start_bars, files, file_phrases, [""] * len(files))
        write_report(tmp, {**(report or {}), "phrases": len(packed), "shards": [shard]})


def _read_report(cache: Path) -> dict:
    report_path = Path(cache) / REPORT_NAME
    if not report_path.is_file():
        raise FileNotFoundError(
            f"no phrase cache at {cache} ({REPORT_NAME} missing): build one with "
            f"`python -m datamodules.pianoroll MIDI_FOLDER {cache}`"
        )
    return json.loads(report_path.read_text())


def load_phrase_cache(cache: str | Path) -> PhraseCache:
    """All phrases of a cache folder written by ``ingest`` or ``write_phrase_cache``, in shard order."""
    cache = Path(cache)
    packed, sources, start_bars = [np.zeros((0, PACKED_BYTES), np.uint8)], [np.zeros(0, object)], [np.zeros(0, np.int64)]
    for shard in _read_report(cache)["shards"]:
        with np.load(cache / shard) as arrays:
            if arrays["packed"].shape[1:] != (PACKED_BYTES,):
                raise ValueError(f"{cache / shard}: packed phrases have shape {arrays['packed'].shape}")
            packed.append(arrays["packed"])
            sources.append(arrays["files"].astype(object)[arrays["phrase_file"]])
            start_bars.append(arrays["start_bars"])
    return PhraseCache(np.concatenate(packed), np.concatenate(sources), np.concatenate(start_bars))


def load_phrases(cache: str | Path) -> np.ndarray:
    """All phrases of a cache folder, unpacked to (N, 128, 57) bool."""
    packed = load_phrase_cache(cache).packed
    return np.unpackbits(packed, axis=1).reshape(len(packed), PHRASE_STEPS, N_COLUMNS).astype(bool)
