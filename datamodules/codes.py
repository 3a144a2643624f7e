"""Code cache: every phrase of a phrase cache encoded by a trained VQ-VAE, and its DataModule.

Layout of a code cache folder (written atomically, all or nothing)::

    codes.npy                       (N, S) int16   code indices per phrase (S = 32)
    first_index_distribution.npy    (K,)   float64 empirical distribution of codes[:, 0]
    sources.npz                     the phrase behind each row: ``files`` (F,) str, ``file_index`` (N,)
                                    int32, ``start_bars`` (N,) int64 (the song-level split reads them)
    meta.json                       {"vqvae_ckpt", "phrases", "num_phrases", "num_codes", "code_steps"}

Build one with::

    python -m datamodules.codes encode --ckpt VQVAE.ckpt --phrases PHRASE_CACHE --out CODE_CACHE

``CodeDataModule`` serves (B, S) LongTensor batches of it to the autoregressive prior, split by
song as the phrase DataModule splits phrases.
"""
from __future__ import annotations

import argparse
import json
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from datamodules.pianoroll import load_phrase_cache, unpack_phrases
from datamodules.sharding import UnpaddedShardSampler
from datamodules.splits import describe_split, song_split
from framework.errors import InputError
from framework.io import atomic_path
from lightning_modules.vqvae import VQVAE

CODES_FILE = "codes.npy"
FIRST_INDEX_FILE = "first_index_distribution.npy"
SOURCES_FILE = "sources.npz"
META_FILE = "meta.json"
CODE_DTYPE = np.int16


@torch.no_grad()
def encode_phrases(vqvae: VQVAE, packed: np.ndarray | Tensor, batch_size: int = 4096, device: str | torch.device = "cpu") -> np.ndarray:
    """Code indices (N, S) int16 for bit-packed phrases ``packed`` (N, 912) uint8, ``batch_size`` at a time.

    Each batch is moved to ``device`` packed and unpacked there; ``vqvae`` is put in eval mode on ``device``.
    """
    if vqvae.num_codes > np.iinfo(CODE_DTYPE).max + 1:
        raise ValueError(f"a codebook of {vqvae.num_codes} entries does not fit the cache's {CODE_DTYPE.__name__} codes.")
    vqvae = vqvae.to(device).eval()
    chunks = []
    with tqdm(total=len(packed), desc="encoding phrases", unit="phrase", unit_scale=True) as progress:
        for start in range(0, len(packed), batch_size):
            batch = unpack_phrases(torch.as_tensor(packed[start:start + batch_size]).to(device))
            chunks.append(vqvae.encode(batch.float()).to(torch.int16).cpu())
            progress.update(batch.shape[0])
    if not chunks:
        raise ValueError("encode_phrases: there are no phrases to encode.")
    return torch.cat(chunks).numpy()


def empirical_first_index_distribution(codes: np.ndarray | Tensor, num_codes: int) -> np.ndarray:
    """Empirical distribution (K,) float64 of the first index of each code sequence (N, S)."""
    first = np.asarray(codes[:, 0], dtype=np.int64)
    return np.bincount(first, minlength=num_codes).astype(np.float64) / len(first)


def encode_phrase_cache(
    vqvae: VQVAE,
    cache_dir: str | Path,
    out_dir: str | Path,
    batch_size: int = 4096,
    device: str | torch.device = "cpu",
    vqvae_ckpt: str | Path | None = None,
) -> Path:
    """Encode every phrase of the phrase cache ``cache_dir`` into the code cache ``out_dir``; return ``out_dir``.

    ``vqvae_ckpt`` is recorded in meta.json so the prior can decode with the same VQ-VAE.
    """
    cache = load_phrase_cache(cache_dir)
    codes = encode_phrases(vqvae, cache.packed, batch_size, device)
    out_dir = Path(out_dir)
    meta = {
        "vqvae_ckpt": None if vqvae_ckpt is None else str(Path(vqvae_ckpt).resolve()),
        "phrases": str(Path(cache_dir).resolve()),
        "num_phrases": int(codes.shape[0]),
        "num_codes": int(vqvae.num_codes),
        "code_steps": int(codes.shape[1]),
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        np.save(tmp / CODES_FILE, codes)
        np.save(tmp / FIRST_INDEX_FILE, empirical_first_index_distribution(codes, vqvae.num_codes))
        np.savez(tmp / SOURCES_FILE, files=cache.files, file_index=cache.file_index, start_bars=cache.start_bars)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return out_dir


def load_meta(codes_dir: str | Path) -> dict:
    """meta.json of a code cache (FileNotFoundError naming the folder and how to make it)."""
    path = Path(codes_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {codes_dir} is not a code cache. Make one with "
            f"`python -m datamodules.codes encode --ckpt VQVAE.ckpt --phrases PHRASE_CACHE --out {codes_dir}`."
        )
    return json.loads(path.read_text())


def load_codes(codes_dir: str | Path) -> tuple[Tensor, Tensor]:
    """Codes (N, S) LongTensor and first-index distribution (K,) float64 Tensor of a code cache, checked against meta.json."""
    codes_dir = Path(codes_dir)
    meta = load_meta(codes_dir)
    codes = np.load(codes_dir / CODES_FILE)
    distribution = np.load(codes_dir / FIRST_INDEX_FILE)
    expected = (meta["num_phrases"], meta["code_steps"])
    if codes.shape != expected:
        raise ValueError(f"{codes_dir / CODES_FILE}: shape {codes.shape}, meta.json says {expected}.")
    if codes.size and (codes.min() < 0 or codes.max() >= meta["num_codes"]):
        raise ValueError(f"{codes_dir / CODES_FILE}: indices outside [0, {meta['num_codes']}).")
    if distribution.shape != (meta["num_codes"],):
        raise ValueError(f"{codes_dir / FIRST_INDEX_FILE}: shape {distribution.shape}, expected ({meta['num_codes']},).")
    return torch.from_numpy(codes.astype(np.int64)), torch.from_numpy(distribution)


def load_source_index(codes_dir: str | Path) -> np.ndarray:
    """(N,) int: the source file of each code sequence, as an index into the cache's ``files``."""
    path = Path(codes_dir) / SOURCES_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {codes_dir} does not say which song each code sequence comes from, so it "
            f"cannot be split by song. Encode the phrases again with `python -m datamodules.codes encode ...`."
        )
    with np.load(path) as sources:
        return sources["file_index"]


class _CodeRows(Dataset):
    """Rows of a (N, S) code tensor; ``__getitems__`` serves a whole batch with one indexing operation."""

    def __init__(self, codes: Tensor):
        self.codes = codes

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, index: int) -> Tensor:
        return self.codes[index]

    def __getitems__(self, indices: list[int]) -> Tensor:
        return self.codes[torch.as_tensor(indices)]


def _whole_batch(batch: Tensor) -> Tensor:
    """Collate function for ``_CodeRows``: the batch is already one tensor."""
    return batch


class CodeDataModule(pl.LightningDataModule):
    """(B, S) LongTensor batches of a code cache; ``val_fraction`` of them validate, as whole songs.

    Every code sequence of a source file lies in one split (:func:`datamodules.splits.song_split`,
    seeded with ``seed``), so the prior is validated on songs it never saw; ``splits`` holds the
    row indices of each split.

    ``num_codes`` and ``vqvae_ckpt`` come from meta.json; ``first_index_distribution`` is the
    empirical distribution of the first index over the training split (the prior's z_0);
    ``val_packed()`` serves the validation split, bit-packed, as the real phrases of the generation metrics.
    """

    def __init__(self, codes: str, batch_size: int = 2048, val_fraction: float = 0.05, seed: int = 0, num_workers: int = 0):
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"CodeDataModule: val_fraction must lie in [0, 1), got {val_fraction}.")
        self.codes_dir = Path(codes)
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.train_codes: Tensor | None = None
        self.val_codes: Tensor | None = None
        self.splits: dict[str, np.ndarray] = {}

    @cached_property
    def meta(self) -> dict:
        return load_meta(self.codes_dir)

    @property
    def num_codes(self) -> int:
        return int(self.meta["num_codes"])

    @property
    def vqvae_ckpt(self) -> str | None:
        return self.meta["vqvae_ckpt"]

    def _song_split(self, n_codes: int) -> dict[str, np.ndarray]:
        source_index = load_source_index(self.codes_dir)
        if len(source_index) != n_codes:
            raise ValueError(f"{self.codes_dir}: {n_codes} code sequences but {len(source_index)} sources.")
        splits = song_split(source_index, {"val": self.val_fraction}, self.seed)
        if len(splits["train"]) < 1 or (self.val_fraction > 0 and len(splits["val"]) < 1):
            raise InputError(
                f"{self.codes_dir}: {n_codes} code sequences are too few for val_fraction={self.val_fraction} "
                f"by song ({describe_split(splits, source_index)})."
            )
        return splits

    def prepare_data(self) -> None:
        load_meta(self.codes_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.train_codes is not None:
            return
        codes, _ = load_codes(self.codes_dir)
        self.splits = self._song_split(len(codes))
        self.train_codes, self.val_codes = (codes[torch.from_numpy(self.splits[name])] for name in ("train", "val"))

    def val_packed(self) -> Tensor:
        """The phrases the validation sequences were encoded from, bit-packed (N_val, 912) uint8: the
        real side of the generation metrics, read from the phrase cache that meta.json records."""
        self.setup()
        source = self.meta["phrases"]
        try:
            packed = load_phrase_cache(source).packed
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{self.codes_dir / META_FILE} names the phrase cache {source}: {err}") from err
        if len(packed) != self.meta["num_phrases"]:
            raise ValueError(f"phrase cache {source} holds {len(packed)} phrases, the code cache "
                             f"{self.meta['num_phrases']}: it changed after encoding.")
        return torch.from_numpy(np.asarray(packed[self.splits["val"]]))

    @cached_property
    def first_index_distribution(self) -> Tensor:
        self.setup()
        return torch.from_numpy(empirical_first_index_distribution(self.train_codes, self.num_codes))

    def _loader(self, codes: Tensor, shuffle: bool) -> DataLoader:
        """Training batches are shuffled (Lightning shards them under DDP); evaluation batches are
        sharded across ranks without padding, so no sequence is counted twice."""
        dataset = _CodeRows(codes)
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=shuffle if shuffle else None,
            sampler=None if shuffle else UnpaddedShardSampler(dataset), num_workers=self.num_workers,
            collate_fn=_whole_batch, drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_codes, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_codes, shuffle=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datamodules.codes", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    encode = commands.add_parser("encode", help="encode a phrase cache with a trained VQ-VAE")
    encode.add_argument("--ckpt", required=True, help="VQ-VAE checkpoint (.ckpt)")
    encode.add_argument("--phrases", required=True, help="phrase cache folder")
    encode.add_argument("--out", required=True, help="code cache folder to write")
    encode.add_argument("--batch-size", type=int, default=4096)
    encode.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    args = parser.parse_args(argv)

    if not Path(args.ckpt).is_file():
        parser.error(f"--ckpt {args.ckpt}: no such file")
    vqvae = VQVAE.load_from_checkpoint(args.ckpt, map_location=args.device)
    out = encode_phrase_cache(vqvae, args.phrases, args.out, args.batch_size, args.device, vqvae_ckpt=args.ckpt)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
