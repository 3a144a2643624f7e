"""The analysis of a listening test written out: box plots like the loop paper's Fig. 6 (PNG),
tables (CSV) and a Markdown report, from answers read by :func:`~listening.analysis.results.read_results`."""
from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from framework.io import atomic_path  # noqa: E402
from listening.analysis.results import Rating, Results  # noqa: E402
from listening.analysis.statistics import (  # noqa: E402
    Comparison, Description, ListenerScreening, TestResult, block_table, describe, friedman, kruskal_wallis,
    pairwise_wilcoxon, screen_listeners,
)

FIGURE = "ratings.png"


def system_order(ratings: Sequence[Rating], chosen: Sequence[str] | None) -> list[str]:
    """``chosen`` (those with ratings), or every rated system by descending mean rating."""
    scores = defaultdict(list)
    for rating in ratings:
        scores[rating.system].append(rating.score)
    if chosen:
        return [system for system in chosen if system in scores]
    return sorted(scores, key=lambda system: (-np.mean(scores[system]), system))


def plot_ratings(ratings: Sequence[Rating], attributes: Sequence[str], systems: Sequence[str], path: Path) -> None:
    """One box plot per attribute: a box per system, green median line, red triangle at the mean."""
    fig, axes = plt.subplots(1, len(attributes), figsize=(1.3 + 1.4 * len(systems) * len(attributes), 4.2),
                             squeeze=False)
    for ax, attribute in zip(axes[0], attributes):
        data = [[r.score for r in ratings if r.attribute == attribute and r.system == s] for s in systems]
        ax.boxplot(data, tick_labels=list(systems), showmeans=True, widths=0.55,
                   medianprops={"color": "green", "linewidth": 1.6},
                   meanprops={"marker": "^", "markerfacecolor": "red", "markeredgecolor": "red"})
        ax.set_title(attribute)
        ax.set_ylabel("rating")
        ax.tick_params(axis="x", labelrotation=20 if max(map(len, systems)) > 10 else 0)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def _number(value: float, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.2e}" if value != 0 and abs(value) < 10 ** -digits else f"{value:.{digits}f}"


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["attribute"])
        writer.writeheader()
        writer.writerows(rows)


def _test_line(name: str, result: TestResult, detail: str) -> str:
    if result.note:
        return f"- {name}: not computed, {result.note}."
    return f"- {name} = {_number(result.statistic)}, p = {_number(result.p)} ({detail})."


def _screening_section(screened: list[ListenerScreening], reference: str, below: float, max_share: float,
                       exclude: bool, present: bool) -> list[str]:
    lines = ["## Listener post-screening", ""]
    if not present:
        return lines + [f"Not applied: no ratings of the reference system `{reference}`.", ""]
    lines += [f"A page counts against a listener when the hidden reference `{reference}` is rated below "
              f"{below:g}; a listener with more than {max_share:.0%} such pages fails. Failing listeners are "
              f"{'left out of everything below' if exclude else 'reported only (screening.exclude=true leaves them out)'}.",
              "", "| listener | pages | reference below level | share | result |", "|---|---|---|---|---|"]
    lines += [f"| {s.participant} | {s.pages} | {s.low_pages} | {s.share:.0%} | {'fails' if s.fails else 'passes'} |"
              for s in screened]
    return lines + [""]


def analyse(results: Results, out: str | Path, systems: Sequence[str] | None = None, reference: str = "target",
            below: float = 90.0, max_share: float = 0.15, exclude: bool = False, other_tests: int = 0) -> dict:
    """Screen, summarise, test and plot the ratings; write the report folder ``out`` atomically.
    ``other_tests`` counts the ratings read but left out as answers of other tests."""
    screened = screen_listeners(results.ratings, reference, below, max_share)
    failed = {s.participant for s in screened if s.fails}
    ratings = [r for r in results.ratings if not (exclude and r.participant in failed)]
    attributes = list(dict.fromkeys(r.attribute for r in ratings))
    order = system_order(ratings, systems)
    listeners = sorted({r.participant for r in ratings})
    sessions = {r.session for r in ratings}

    summary_rows, test_rows, pair_rows = [], [], []
    sections = []
    for attribute in attributes:
        chosen = [r for r in ratings if r.attribute == attribute and r.system in order]
        present = [s for s in order if any(r.system == s for r in chosen)]
        descriptions: dict[str, Description] = {s: describe([r.score for r in chosen if r.system == s]) for s in present}
        kruskal = kruskal_wallis([[r.score for r in chosen if r.system == s] for s in present])
        table = block_table(chosen, present)
        friedman_result = friedman(table)
        pairs: list[Comparison] = pairwise_wilcoxon(table) if len(present) >= 2 and table.blocks else []
        summary_rows += [{"attribute": attribute, "system": s, **asdict(d)} for s, d in descriptions.items()]
        test_rows += [{"attribute": attribute, "test": "kruskal_wallis", "statistic": kruskal.statistic, "p": kruskal.p,
                       "blocks": "", "note": kruskal.note},
                      {"attribute": attribute, "test": "friedman", "statistic": friedman_result.statistic,
                       "p": friedman_result.p, "blocks": len(table.blocks), "note": friedman_result.note}]
        pair_rows += [{"attribute": attribute, **asdict(pair)} for pair in pairs]
        lines = [f"## {attribute}", "", "| system | count | mean | std | median |", "|---|---|---|---|---|"]
        lines += [f"| {s} | {d.count} | {_number(d.mean)} | {_number(d.std)} | {_number(d.median)} |"
                  for s, d in descriptions.items()]
        lines += ["", _test_line("Kruskal-Wallis H", kruskal, f"{len(present)} systems, all {len(chosen)} ratings as "
                                                                "independent groups, as in the loop paper"),
                  _test_line("Friedman chi-square", friedman_result,
                             f"{len(table.blocks)} complete blocks of listener x song, a listener's ratings of one "
                             f"system in a block averaged; {table.incomplete} incomplete blocks left out")]
        if pairs:
            lines += ["", "Wilcoxon signed-rank tests on the same blocks, two-sided, Holm-corrected over "
                          f"{len(pairs)} pairs:", "",
                      "| A | B | blocks | median A - B | W | p | p (Holm) |", "|---|---|---|---|---|---|---|"]
            lines += [f"| {p.a} | {p.b} | {p.blocks} | {_number(p.median_difference)} | {_number(p.statistic, 1)} | "
                      f"{_number(p.p)} | {_number(p.p_holm)} |" for p in pairs]
        sections += lines + [""]

    tests = f" of test{'s' if len(results.tests) > 1 else ''} {', '.join(sorted(results.tests))}" if results.tests else ""
    head = [
        "# Listening test analysis", "",
        f"{len(results.ratings)} ratings{tests} read from {len(results.files)} files; {len(ratings)} analysed, from "
        f"{len(listeners)} listeners in {len(sessions)} sessions. Std is the sample standard deviation.",
    ]
    if other_tests:
        head.append(f"{other_tests} ratings of other tests left out.")
    if results.repeated:
        head.append(f"{results.repeated} answers appeared in two files (a JSON and a CSV download) and count once.")
    if results.skipped:
        head += ["", f"Skipped ({len(results.skipped)}):", ""] + [f"- `{where}`: {why}" for where, why in results.skipped]
    if attributes:
        head += ["", f"![ratings]({FIGURE})", ""]
    elif results.ratings:
        head += ["", "Every listener failed the screening: no ratings left to analyse.", ""]
    reference_rated = any(r.system == reference for r in results.ratings)
    report = "\n".join(head + _screening_section(screened, reference, below, max_share, exclude, reference_rated)
                       + sections)
    with atomic_path(out) as folder:
        folder.mkdir()
        (folder / "report.md").write_text(report)
        _write_csv(folder / "summary.csv", summary_rows)
        _write_csv(folder / "tests.csv", test_rows)
        _write_csv(folder / "pairwise.csv", pair_rows)
        _write_csv(folder / "screening.csv", [asdict(s) for s in screened])
        if attributes:
            plot_ratings(ratings, attributes, order, folder / FIGURE)
    return {"out": str(out), "report": report, "summary": summary_rows, "tests": test_rows, "pairwise": pair_rows,
            "screening": screened, "excluded": sorted(failed) if exclude else []}
