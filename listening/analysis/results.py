"""Answer files of a listening test read back: the JSON and CSV files the page downloads (or POSTs).

Every rating becomes one :class:`Rating`. Files are given one by one or as folders (every
``.json`` and ``.csv`` below them). A file that cannot be read, or a row that lacks a column or
holds no numeric score, is skipped with its reason; nothing is dropped silently. A participant
who downloaded both the JSON and the CSV file gives every answer twice: identical answers count
once, and an answer that contradicts an earlier one for the same session, page, stimulus and
attribute is skipped and reported. Each answer keeps the id of the test (the kit) it belongs to:
the ``test`` column, or the JSON file's ``test.id``.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

#: Columns every answer must have.
REQUIRED = ("participant", "session", "page", "stimulus", "system", "attribute", "score", "time")


@dataclass(frozen=True)
class Rating:
    """One answer: ``participant`` rated ``stimulus`` (of ``system``) ``score`` for ``attribute``."""

    participant: str
    session: str
    page: str
    stimulus: str
    system: str
    attribute: str
    score: float
    time: str
    song: str = ""  # the mixing test's song; empty in the loop test
    test: str = ""  # the id of the kit that asked; empty when the file does not say

    @property
    def key(self) -> tuple[str, str, str, str]:
        return self.session, self.page, self.stimulus, self.attribute


@dataclass
class Results:
    """The ratings read, the files they came from, and what was skipped and why."""

    ratings: list[Rating] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file or file:row, reason)
    repeated: int = 0  # identical answers read twice (a participant's JSON and CSV file)
    tests: dict[str, Path] = field(default_factory=dict)  # test id -> the first file holding its answers

    def of_tests(self, chosen: Iterable[str]) -> tuple[Results, int]:
        """These results restricted to the tests ``chosen``, and how many ratings that leaves out."""
        chosen = set(chosen)
        kept = [rating for rating in self.ratings if rating.test in chosen]
        tests = {test: path for test, path in self.tests.items() if test in chosen}
        return Results(kept, self.files, self.skipped, self.repeated, tests), len(self.ratings) - len(kept)


def result_files(paths: Iterable[str | Path]) -> list[Path]:
    """The given files, and every .json and .csv file below the given folders, in order."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in (".json", ".csv") and p.is_file()))
        else:
            found.append(path)
    return found


def _rows(path: Path) -> tuple[list[dict], str]:
    """The raw rows of one file and the test id the file names for all of them (JSON only);
    ValueError when it is not an answer file."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [column for column in REQUIRED if column not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"CSV header lacks {', '.join(missing)}")
            return list(reader), ""
    document = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(document, dict) or not isinstance(document.get("ratings"), list):
        raise ValueError("JSON without a `ratings` list")
    test = document.get("test")
    return document["ratings"], str(test.get("id") or "") if isinstance(test, dict) else ""


def _rating(row: dict, test: str) -> Rating:
    if not isinstance(row, dict):
        raise ValueError(f"not a mapping: {row!r}")
    missing = [column for column in REQUIRED if row.get(column) in (None, "")]
    if missing:
        raise ValueError(f"no {', '.join(missing)}")
    try:
        score = float(row["score"])
    except (TypeError, ValueError):
        raise ValueError(f"score {row['score']!r} is not a number") from None
    if not math.isfinite(score):
        raise ValueError(f"score {row['score']!r} is not finite")
    text = {column: str(row[column]) for column in REQUIRED if column != "score"}
    return Rating(score=score, song=str(row.get("song") or ""), test=str(row.get("test") or test), **text)


def read_results(paths: Iterable[str | Path]) -> Results:
    """Every rating in the answer files ``paths`` (files or folders)."""
    results = Results()
    seen: dict[tuple, float] = {}
    for path in result_files(paths):
        try:
            rows, test = _rows(path)
        except (OSError, UnicodeDecodeError, ValueError, csv.Error) as err:
            results.skipped.append((str(path), f"not an answer file: {err}"))
            continue
        results.files.append(path)
        for number, row in enumerate(rows, 1):
            where = f"{path}:{number}"
            try:
                rating = _rating(row, test)
            except ValueError as err:
                results.skipped.append((where, str(err)))
                continue
            if rating.key in seen:
                if seen[rating.key] == rating.score:
                    results.repeated += 1
                else:
                    results.skipped.append((where, f"score {rating.score:g} contradicts {seen[rating.key]:g} given "
                                                   "earlier for the same session, page, stimulus and attribute"))
                continue
            seen[rating.key] = rating.score
            results.ratings.append(rating)
            if rating.test:
                results.tests.setdefault(rating.test, path)
    return results
