"""Statistics of listening-test ratings.

- Descriptive: count, mean, standard deviation (sample, ddof = 1) and median per system.
- Kruskal-Wallis H over all ratings grouped by system, as the loop paper tested its groups.
- Friedman's test for repeated measures: every listener rates every system, so the ratings form
  blocks (one per listener and song; the loop test has one per listener), and a listener's
  several ratings of one system within a block (the loop test's samples) are averaged first.
  Blocks that lack a system are left out and counted.
- Wilcoxon signed-rank tests between every pair of systems on the same blocks, their p-values
  corrected for the number of pairs with Holm's step-down method.
- Listener post-screening on a hidden reference, as ITU-R BS.1534 (MUSHRA) does it: a listener
  who rates the reference below a level on more than a share of the pages fails.
"""
from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.stats

from listening.analysis.results import Rating


@dataclass(frozen=True)
class Description:
    count: int
    mean: float
    std: float
    median: float


def describe(scores: Sequence[float]) -> Description:
    scores = np.asarray(scores, dtype=float)
    std = float(np.std(scores, ddof=1)) if len(scores) > 1 else float("nan")
    return Description(len(scores), float(np.mean(scores)), std, float(np.median(scores)))


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values: the i-th smallest is multiplied by (m - i), made
    monotone from the smallest up, and capped at 1 (compare each with the family-wise alpha)."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p, kind="stable")
    steps = len(p) - np.arange(len(p))
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(np.maximum.accumulate(steps * p[order]), 1.0)
    return adjusted


@dataclass(frozen=True)
class TestResult:
    """A test's statistic and p-value; ``note`` says why the test could not be run (both NaN then)."""

    statistic: float
    p: float
    note: str = ""


def kruskal_wallis(groups: Sequence[Sequence[float]]) -> TestResult:
    """Kruskal-Wallis H over independent groups of ratings (``scipy.stats.kruskal``)."""
    groups = [list(g) for g in groups if len(g)]
    if len(groups) < 2:
        return TestResult(float("nan"), float("nan"), "needs at least two systems with ratings")
    if len({score for g in groups for score in g}) < 2:
        return TestResult(float("nan"), float("nan"), "every rating is the same")
    result = scipy.stats.kruskal(*groups)
    return TestResult(float(result.statistic), float(result.pvalue))


@dataclass
class BlockTable:
    """Repeated-measures table: one row per complete block, one column per system."""

    systems: list[str]
    blocks: list[tuple[str, str, str]]  # (participant, session, song)
    values: np.ndarray  # (blocks, systems) mean rating
    incomplete: int  # blocks left out because they lack a system


def block_table(ratings: Sequence[Rating], systems: Sequence[str]) -> BlockTable:
    """Each listener's mean rating of each system per song (one attribute's ratings)."""
    cells: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for rating in ratings:
        if rating.system in systems:
            cells[rating.participant, rating.session, rating.song][rating.system].append(rating.score)
    complete = [block for block, by_system in cells.items() if all(s in by_system for s in systems)]
    values = np.array([[np.mean(cells[block][s]) for s in systems] for block in complete]).reshape(len(complete), len(systems))
    return BlockTable(list(systems), complete, values, len(cells) - len(complete))


def friedman(table: BlockTable) -> TestResult:
    """Friedman's chi-square over the table's blocks (``scipy.stats.friedmanchisquare``)."""
    if len(table.systems) < 3:
        return TestResult(float("nan"), float("nan"), "needs at least three systems (use the pairwise test)")
    if len(table.blocks) < 2:
        return TestResult(float("nan"), float("nan"), f"needs at least two complete blocks, has {len(table.blocks)}")
    if np.all(table.values == table.values[:, :1]):
        return TestResult(float("nan"), float("nan"), "every block rates all systems alike")
    result = scipy.stats.friedmanchisquare(*table.values.T)
    return TestResult(float(result.statistic), float(result.pvalue))


@dataclass(frozen=True)
class Comparison:
    """A Wilcoxon signed-rank test of system ``a`` against ``b`` over ``blocks`` paired blocks."""

    a: str
    b: str
    blocks: int
    median_difference: float  # median over blocks of a - b
    statistic: float
    p: float
    p_holm: float


def pairwise_wilcoxon(table: BlockTable) -> list[Comparison]:
    """Every pair of systems, two-sided (``scipy.stats.wilcoxon``), with Holm-adjusted p-values.

    A pair whose differences are all zero gets p = 1 (no evidence of a difference); scipy leaves
    that case undefined.
    """
    pairs = list(itertools.combinations(range(len(table.systems)), 2))
    tests = []
    for i, j in pairs:
        difference = table.values[:, i] - table.values[:, j]
        if not len(difference):
            tests.append((float("nan"), float("nan")))
        elif np.all(difference == 0):
            tests.append((0.0, 1.0))
        else:
            result = scipy.stats.wilcoxon(table.values[:, i], table.values[:, j])
            tests.append((float(result.statistic), float(result.pvalue)))
    p = np.array([test[1] for test in tests])
    adjusted = np.full_like(p, np.nan)
    finite = np.isfinite(p)
    adjusted[finite] = holm(p[finite])
    return [
        Comparison(table.systems[i], table.systems[j], len(table.blocks),
                   float(np.median(table.values[:, i] - table.values[:, j])) if len(table.blocks) else float("nan"),
                   statistic, p_value, float(p_holm))
        for (i, j), (statistic, p_value), p_holm in zip(pairs, tests, adjusted)
    ]


@dataclass(frozen=True)
class ListenerScreening:
    participant: str
    pages: int  # pages on which the listener rated the reference
    low_pages: int  # ... of them rating it below the level
    share: float
    fails: bool


def screen_listeners(ratings: Sequence[Rating], reference: str, below: float, max_share: float) -> list[ListenerScreening]:
    """Per listener: the pages where the hidden ``reference`` is rated below ``below``; a listener
    fails when their share exceeds ``max_share``. Listeners who never rated the reference are not listed."""
    pages: dict[str, dict[tuple, float]] = defaultdict(dict)
    for rating in ratings:
        if rating.system == reference:
            pages[rating.participant][rating.session, rating.page, rating.attribute] = rating.score
    screened = []
    for participant, scores in sorted(pages.items()):
        low = sum(score < below for score in scores.values())
        share = low / len(scores)
        screened.append(ListenerScreening(participant, len(scores), low, share, share > max_share))
    return screened
