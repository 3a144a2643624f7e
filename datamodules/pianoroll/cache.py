"""The bit-packed phrase cache: shards of (N, 912) uint8 phrases with their source file and start bar.

A cache folder holds ``report.json`` (phrase count, shard list, the ingest or extraction report)
and shards ``shard-NNNNNN.npz``: uncompressed NumPy archives of ``packed`` (N, 912) uint8,
``phrase_file`` (N,) (index into ``files``) and ``start_bars`` (N,), and per source file
``files``, ``file_phrases`` and ``file_reasons`` (why a file gave no phrases, "" if it did).

Reading is lazy. :func:`load_phrase_cache` reads the per-phrase metadata (12 bytes a phrase) and
where each shard's packed rows lie in its file; :class:`PackedShards` then reads only the rows
asked for, with positional file reads, so a process holds the rows in hand and never the whole
cache (5.2 GB for Lakh MIDI). Memory maps would not bound memory: every page a map touches
counts in the process's resident set until it is unmapped. Writing streams too: a cache subset
is copied shard file to shard file in chunks.
"""
from __future__ import annotations

import json
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from datamodules.pianoroll.layout import N_COLUMNS, PACKED_BYTES, PHRASE_STEPS
from framework.errors import InputError, MissingInput
from framework.io import atomic_path

if TYPE_CHECKING:
    import torch

REPORT_NAME = "report.json"
SHARD_PATTERN = "shard-{:06d}.npz"
FIRST_STEP_BYTES = -(-N_COLUMNS // 8)  # packed bytes that hold step 0 of a phrase
PACKED_MEMBER = "packed.npy"
# Rows copied per read/write when a shard is written from another cache (7 MiB): small enough that
# the buffer does not show in the peak memory of extraction, large enough for sequential writes.
WRITE_CHUNK_ROWS = 1 << 13
_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, then the name and extra-field lengths


def pack_phrases(phrases):
    """(N, 128, 57) bool -> (N, 912) uint8, the cells of each phrase in row-major order, 8 to a byte.

    NumPy arrays are packed with NumPy; torch tensors with torch ops on their own device.
    """
    if isinstance(phrases, np.ndarray) or not hasattr(phrases, "device"):
        phrases = np.asarray(phrases, dtype=bool)
        return np.packbits(phrases.reshape(len(phrases), PHRASE_STEPS * N_COLUMNS), axis=1)
    import torch

    bits = phrases.bool().reshape(len(phrases), PACKED_BYTES, 8).to(torch.uint8)
    weights = 2 ** torch.arange(7, -1, -1, dtype=torch.uint8, device=bits.device)
    return (bits * weights).sum(dim=2, dtype=torch.uint8)


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

    ``packed`` may be an array, a tensor or a cache's :class:`PackedShards`; rows are read in chunks
    of ``WRITE_CHUNK_ROWS`` and only their first bytes kept, so a large cache is never held whole.
    """
    import torch

    rows = np.arange(len(packed)) if index is None else np.asarray(index, dtype=np.int64)
    heads = [np.asarray(packed[rows[start:start + WRITE_CHUNK_ROWS]])[:, :FIRST_STEP_BYTES]
             for start in range(0, len(rows), WRITE_CHUNK_ROWS)]
    head = np.concatenate([np.zeros((0, FIRST_STEP_BYTES), np.uint8), *heads])
    return _bits(torch.from_numpy(head))[:, :N_COLUMNS]


# ------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class ShardRows:
    """Where a shard's packed phrases lie: ``rows`` rows of 912 bytes from byte ``offset`` of ``path``."""

    path: Path
    offset: int
    rows: int


class PackedShards:
    """The packed phrases of a cache's shards as one read-only (N, 912) uint8 array, read on demand.

    Indexing (an integer, a slice, an integer or boolean array) returns a new NumPy array read
    from the shard files: one positional read per run of consecutive rows, so a contiguous range
    costs one read per shard and memory holds only the rows returned. ``np.asarray`` reads all
    rows. :meth:`select` gives a lazy view of some rows (e.g. the loops kept by extraction).
    """

    def __init__(self, shards: Sequence[ShardRows], rows: np.ndarray | None = None):
        self.shards = list(shards)
        self._starts = np.cumsum([0, *(shard.rows for shard in self.shards)], dtype=np.int64)
        self._rows = None if rows is None else np.asarray(rows, dtype=np.int64)

    dtype = np.dtype(np.uint8)
    ndim = 2

    def __len__(self) -> int:
        return int(self._starts[-1]) if self._rows is None else len(self._rows)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), PACKED_BYTES

    @property
    def nbytes(self) -> int:
        return len(self) * PACKED_BYTES

    def __repr__(self) -> str:
        return f"PackedShards({len(self)} phrases in {len(self.shards)} shards)"

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        rows = self[:]
        return rows if dtype is None else rows.astype(dtype, copy=False)

    def select(self, index) -> PackedShards:
        """A lazy view of the rows ``index`` (integer or boolean array) selects, in that order."""
        return PackedShards(self.shards, self._physical(self._positions(index)))

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self[np.array([key])][0]
        if isinstance(key, slice) and key.step in (None, 1) and self._rows is None:
            start, stop, _ = key.indices(len(self))
            return self._read_sorted(np.arange(start, max(start, stop), dtype=np.int64))
        if isinstance(key, tuple):
            raise IndexError("PackedShards takes one index (rows); index the returned array for columns")
        return self._read(self._physical(self._positions(key)))

    def _positions(self, key) -> np.ndarray:
        """Row positions (int64, in this view) of an index, slice or boolean mask; bounds checked."""
        n = len(self)
        if isinstance(key, slice):
            return np.arange(n, dtype=np.int64)[key]
        index = np.asarray(key)
        if index.dtype == bool:
            if index.shape != (n,):
                raise IndexError(f"boolean index of shape {index.shape} for {n} rows")
            return np.flatnonzero(index)
        if index.size == 0:
            return np.zeros(0, dtype=np.int64)
        if not np.issubdtype(index.dtype, np.integer) or index.ndim != 1:
            raise IndexError(f"rows must be a slice or a 1-D integer or boolean array, got {index.dtype} {index.shape}")
        index = index.astype(np.int64)
        if index.min() < -n or index.max() >= n:
            raise IndexError(f"row index out of range for {n} rows")
        return np.where(index < 0, index + n, index)

    def _physical(self, positions: np.ndarray) -> np.ndarray:
        return positions if self._rows is None else self._rows[positions]

    def _read(self, rows: np.ndarray) -> np.ndarray:
        """Physical rows in the order given (any order, repeats allowed)."""
        if len(rows) < 2 or np.all(rows[1:] >= rows[:-1]):
            return self._read_sorted(rows)
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), PACKED_BYTES), dtype=np.uint8)
        out[order] = self._read_sorted(rows[order])
        return out

    def _read_sorted(self, rows: np.ndarray) -> np.ndarray:
        """Physical rows in ascending order: one ``preadv`` per run of consecutive rows of a shard."""
        out = np.empty((len(rows), PACKED_BYTES), dtype=np.uint8)
        if not len(rows):
            return out
        shard_of = np.searchsorted(self._starts, rows, side="right") - 1
        breaks = np.flatnonzero((np.diff(rows) != 1) | (np.diff(shard_of) != 0)) + 1
        run_starts, run_stops = np.r_[0, breaks], np.r_[breaks, len(rows)]
        shard_breaks = np.flatnonzero(np.diff(shard_of[run_starts])) + 1
        for first, last in zip(np.r_[0, shard_breaks], np.r_[shard_breaks, len(run_starts)]):
            shard = self.shards[shard_of[run_starts[first]]]
            base = shard.offset - int(self._starts[shard_of[run_starts[first]]]) * PACKED_BYTES
            descriptor = os.open(shard.path, os.O_RDONLY)
            try:
                for start, stop in zip(run_starts[first:last], run_stops[first:last]):
                    _read_exactly(descriptor, out[start:stop], base + int(rows[start]) * PACKED_BYTES, shard.path)
            finally:
                os.close(descriptor)
        return out


def _read_exactly(descriptor: int, buffer: np.ndarray, offset: int, path: Path) -> None:
    view = memoryview(buffer).cast("B")
    while len(view):
        count = os.preadv(descriptor, [view], offset)
        if count == 0:
            raise InputError(f"{path}: the file ends inside its packed phrases (truncated shard)")
        view, offset = view[count:], offset + count


@dataclass
class PhraseCache:
    """A phrase cache: packed phrases (read on demand) with the source file and start bar of each.

    ``files`` lists the cache's source files (relative paths, sorted) and ``file_index`` the
    position in ``files`` of each phrase's source; ``sources`` spells them out per phrase.
    """

    packed: PackedShards
    files: np.ndarray  # (F,) str
    file_index: np.ndarray  # (N,) int32
    start_bars: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.file_index)

    @property
    def sources(self) -> np.ndarray:
        """(N,) object array: the source file of each phrase (one string object per file)."""
        return self.files.astype(object)[self.file_index]

    def subset(self, index) -> PhraseCache:
        """The phrases selected by an index or boolean mask; the packed rows stay on disk until read."""
        positions = self.packed._positions(index)
        return PhraseCache(self.packed.select(positions), self.files, self.file_index[positions], self.start_bars[positions])

    def save(self, out: str | Path, report: dict | None = None) -> None:
        """Write these phrases as a phrase cache folder (one shard), atomically; see :func:`write_phrase_cache`."""
        used, file_index = np.unique(self.file_index, return_inverse=True)
        _write_cache(Path(out), self.packed, self.files[used], file_index, self.start_bars, report)


def _packed_location(path: Path, archive: zipfile.ZipFile) -> tuple[int, int]:
    """(byte offset of row 0, rows) of a shard's ``packed`` member, which must be stored uncompressed."""
    info = archive.getinfo(PACKED_MEMBER)
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError("its packed phrases are compressed; phrase caches store them uncompressed")
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        signature, name_length, extra_length = _ZIP_LOCAL_HEADER.unpack(handle.read(_ZIP_LOCAL_HEADER.size))
        if signature != b"PK\x03\x04":
            raise ValueError("bad zip entry for the packed phrases")
        handle.seek(info.header_offset + _ZIP_LOCAL_HEADER.size + name_length + extra_length)
        version = np.lib.format.read_magic(handle)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f"unsupported .npy version {version} for the packed phrases")
        shape, fortran_order, dtype = readers[version](handle)
        if dtype != np.uint8 or fortran_order or len(shape) != 2 or shape[1] != PACKED_BYTES:
            raise ValueError(f"packed phrases have shape {shape} and dtype {dtype}, expected (N, {PACKED_BYTES}) uint8")
        return handle.tell(), int(shape[0])


def _read_report(cache: Path) -> dict:
    report_path = Path(cache) / REPORT_NAME
    if not report_path.is_file():
        raise MissingInput(
            f"no phrase cache at {cache} ({REPORT_NAME} missing): build one with "
            f"`python -m datamodules.pianoroll MIDI_FOLDER {cache}`"
        )
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"{report_path}: not a readable phrase cache report ({type(error).__name__}: {error})") from error
    if not isinstance(report, dict) or not isinstance(report.get("shards"), list):
        raise InputError(f"{report_path}: not a phrase cache report (it lists no shards)")
    return report


def load_phrase_cache(cache: str | Path) -> PhraseCache:
    """The phrases of a cache folder written by ``ingest`` or ``write_phrase_cache``, in shard order.

    Reads the metadata of every phrase now and the packed phrases only when indexed
    (:class:`PackedShards`); a missing cache or a shard that cannot be read is an
    :class:`~framework.errors.InputError` naming it, which the scripts report in one line.
    """
    cache = Path(cache)
    shards, files, file_index, start_bars = [], [], [], []
    files_before = 0
    for name in _read_report(cache)["shards"]:
        path = cache / name
        try:
            with np.load(path) as arrays:
                offset, rows = _packed_location(path, arrays.zip)
                phrase_file, bars, shard_files = arrays["phrase_file"], arrays["start_bars"], arrays["files"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            raise InputError(f"{path}: not a readable phrase shard ({error})") from error
        if len(phrase_file) != rows or len(bars) != rows or (rows and not 0 <= phrase_file.min() <= phrase_file.max() < len(shard_files)):
            raise InputError(f"{path}: its phrase metadata does not match its {rows} packed phrases")
        shards.append(ShardRows(path, offset, rows))
        files.append(shard_files.astype(str))
        file_index.append(phrase_file.astype(np.int64) + files_before)
        start_bars.append(bars.astype(np.int64))
        files_before += len(shard_files)
    unique, inverse = np.unique(np.concatenate([np.zeros(0, str), *files]), return_inverse=True)
    file_index = inverse.astype(np.int32)[np.concatenate([np.zeros(0, np.int64), *file_index])]
    return PhraseCache(PackedShards(shards), unique, file_index, np.concatenate([np.zeros(0, np.int64), *start_bars]))


def load_phrases(cache: str | Path) -> np.ndarray:
    """All phrases of a cache folder, unpacked to (N, 128, 57) bool (7,296 bytes a phrase: small caches only)."""
    packed = np.asarray(load_phrase_cache(cache).packed)
    return np.unpackbits(packed, axis=1).reshape(len(packed), PHRASE_STEPS, N_COLUMNS).astype(bool)


# ------------------------------------------------------------------------------------ writing


def _write_member(archive: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
    with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)


def _write_rows(archive: zipfile.ZipFile, packed) -> None:
    """``packed`` (an array, or anything whose row ranges read as arrays) as the ``packed`` member, in chunks."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": (len(packed), PACKED_BYTES)}
    with archive.open(PACKED_MEMBER, "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, header)
        for start in range(0, len(packed), WRITE_CHUNK_ROWS):
            member.write(np.ascontiguousarray(packed[start : start + WRITE_CHUNK_ROWS], dtype=np.uint8).data)


def write_shard(path: Path, packed, phrase_file, start_bars, files, file_phrases, file_reasons) -> None:
    """One shard, atomically: phrases (packed, index into ``files``, start bar) and the outcome of each file.

    ``packed`` is an (N, 912) uint8 array or a :class:`PackedShards`, copied in chunks.
    """
    if tuple(packed.shape[1:]) != (PACKED_BYTES,) and len(packed):
        raise ValueError(f"packed must be (N, {PACKED_BYTES}) uint8, got {packed.shape}")
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        _write_rows(archive, packed)
        _write_member(archive, "phrase_file", np.asarray(phrase_file, dtype=np.int64))
        _write_member(archive, "start_bars", np.asarray(start_bars, dtype=np.int64))
        _write_member(archive, "files", np.asarray(files, dtype=str))
        _write_member(archive, "file_phrases", np.asarray(file_phrases, dtype=np.int64))
        _write_member(archive, "file_reasons", np.asarray(file_reasons, dtype=str))


def write_report(out: Path, report: dict) -> None:
    with atomic_path(out / REPORT_NAME) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")


def _write_cache(out: Path, packed, files: np.ndarray, file_index: np.ndarray, start_bars, report: dict | None) -> None:
    start_bars = np.asarray(start_bars)
    if not len(file_index) == len(start_bars) == len(packed):
        raise ValueError(f"{len(packed)} phrases but {len(file_index)} sources and {len(start_bars)} start bars")
    shard = SHARD_PATTERN.format(0)
    file_phrases = np.bincount(np.asarray(file_index, dtype=np.int64), minlength=len(files))
    with atomic_path(out) as tmp:
        tmp.mkdir()
        write_shard(tmp / shard, packed, file_index, start_bars, files, file_phrases, [""] * len(files))
        write_report(tmp, {**(report or {}), "phrases": len(packed), "shards": [shard]})


def write_phrase_cache(out: str | Path, packed: Any, sources, start_bars, report: dict | None = None) -> None:
    """Write phrases (e.g. a subset of another cache) as a phrase cache folder, atomically.

    ``packed``: (N, 912) uint8, an array or a :class:`PackedShards` (copied in chunks);
    ``sources``: the source file of each phrase. ``report`` (optional) is stored in report.json
    alongside the phrase count and shard list.
    """
    if not isinstance(packed, PackedShards):
        packed = np.asarray(packed)
    if packed.ndim != 2 or packed.shape[1] != PACKED_BYTES or packed.dtype != np.uint8:
        raise ValueError(f"packed must be (N, {PACKED_BYTES}) uint8, got {packed.dtype} {packed.shape}")
    files, file_index = np.unique(np.asarray(sources, dtype=str), return_inverse=True)
    _write_cache(Path(out), packed, files, file_index, start_bars, report)
