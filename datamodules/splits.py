"""Song-level splits: every item (phrase, loop, code sequence) of one source file lies in one split.

Phrases are 8-bar windows at a 1-bar stride, so a phrase shares 7 of its 8 bars with its
neighbours; a split by phrase puts near-copies of most validation phrases into the training set,
and validation then measures memorisation. These splits deal out whole source files instead.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

TRAIN = "train"


def song_split(source_index: np.ndarray, held_out: Mapping[str, float], seed: int) -> dict[str, np.ndarray]:
    """Item indices (ascending) of ``"train"`` and of each held-out split, by source file.

    ``source_index`` gives each item's source file as an integer (e.g. ``PhraseCache.file_index``);
    ``held_out`` maps split names to fractions of the items. The source files are shuffled by a
    NumPy generator seeded with ``seed``; each held-out split, in the order given, takes the next
    files of that order until it holds at least ``round(fraction * N)`` items (so its share is met
    to within one file), and the remaining files train. The result depends only on the items'
    sources and the seed: the same on every rank and in every run.
    """
    source_index = np.asarray(source_index, dtype=np.int64)
    n_sources = int(source_index.max()) + 1 if len(source_index) else 0
    order = np.random.default_rng(seed).permutation(n_sources)
    cumulative = np.cumsum(np.bincount(source_index, minlength=n_sources)[order])
    split_of_source = np.full(n_sources, -1, dtype=np.int64)
    dealt = taken = 0
    for number, fraction in enumerate(held_out.values()):
        target = round(len(source_index) * fraction)
        if target <= 0 or dealt == n_sources:
            continue
        end = min(int(np.searchsorted(cumulative, taken + target)) + 1, n_sources)
        split_of_source[order[dealt:end]] = number
        dealt, taken = end, int(cumulative[end - 1])
    split_of_item = split_of_source[source_index]
    splits = {TRAIN: np.flatnonzero(split_of_item == -1)}
    splits.update({name: np.flatnonzero(split_of_item == number) for number, name in enumerate(held_out)})
    return splits


def describe_split(splits: Mapping[str, np.ndarray], source_index: np.ndarray) -> str:
    """E.g. ``train 3,520 of 160 files, val 901 of 40 files``: items and source files per split."""
    parts = [f"{name} {len(index):,} of {len(np.unique(source_index[index])):,} files" for name, index in splits.items()]
    return ", ".join(parts)
