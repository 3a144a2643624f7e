"""listening_test.py analyse: answer files read back, statistics equal to scipy, Holm, post-screening."""
from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json

import numpy as np
import pytest
import scipy.stats

import listening_test
from listening.analysis.results import read_results
from listening.analysis.statistics import holm

SYSTEMS = ("target", "proposed", "anchor")
ATTRIBUTES = ("Production Value", "Clarity")
SONGS = ("song_a", "song_b", "song_c")


def mixing_rows(participant: str, scores: dict, session: str | None = None) -> list[dict]:
    """One participant's answers: ``scores[(song, attribute, system)]``."""
    rows = []
    for (song, attribute, system), score in scores.items():
        rows.append({"participant": participant, "session": session or f"s-{participant}",
                     "page": f"{song}/{attribute}", "stimulus": f"{song}-{system}", "system": system,
                     "attribute": attribute, "score": score, "time": "2026-01-01T00:00:00Z", "kind": "mixing",
                     "song": song, "position": 1, "seed": 1, "seconds_on_page": 10})
    return rows


def write_json(path, rows):
    path.write_text(json.dumps({"format": "loopmix-listening-test", "ratings": rows}))
    return path


def write_csv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def run_analyse(*args) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = listening_test.main(["analyse", *map(str, args)])
    return code, stdout.getvalue(), stderr.getvalue()


def read_table(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def panel():
    """Six listeners rating three systems on three songs and two attributes, with ties and spread."""
    rng = np.random.default_rng(7)
    means = {"target": 80, "proposed": 72, "anchor": 30}
    return {
        f"listener{k}": {(song, attribute, system): int(np.clip(means[system] + rng.integers(-25, 26), 0, 100))
                         for song, attribute, system in itertools.product(SONGS, ATTRIBUTES, SYSTEMS)}
        for k in range(6)
    }


@pytest.fixture(scope="module")
def analysed(panel, tmp_path_factory):
    root = tmp_path_factory.mktemp("answers")
    for index, (participant, scores) in enumerate(panel.items()):
        rows = mixing_rows(participant, scores)
        (write_json if index % 2 else write_csv)(root / f"{participant}.{'json' if index % 2 else 'csv'}", rows)
    out = tmp_path_factory.mktemp("report") / "report"
    code, stdout, stderr = run_analyse(root, f"out={out}")
    assert code == 0, stderr
    return out, stdout


def by_attribute(rows, key="attribute"):
    grouped = {}
    for row in rows:
        grouped.setdefault(row[key], []).append(row)
    return grouped


def test_descriptive_figures_and_kruskal_wallis_equal_numpy_and_scipy(panel, analysed):
    out, _ = analysed
    summary = {(row["attribute"], row["system"]): row for row in read_table(out / "summary.csv")}
    tests = {(row["attribute"], row["test"]): row for row in read_table(out / "tests.csv")}
    for attribute in ATTRIBUTES:
        groups = {system: [scores[song, attribute, system] for scores in panel.values() for song in SONGS]
                  for system in SYSTEMS}
        for system, scores in groups.items():
            row = summary[attribute, system]
            assert int(row["count"]) == len(scores) == 18
            assert float(row["mean"]) == pytest.approx(np.mean(scores))
            assert float(row["std"]) == pytest.approx(np.std(scores, ddof=1))
            assert float(row["median"]) == pytest.approx(np.median(scores))
        reference = scipy.stats.kruskal(*groups.values())
        assert float(tests[attribute, "kruskal_wallis"]["statistic"]) == pytest.approx(reference.statistic)
        assert float(tests[attribute, "kruskal_wallis"]["p"]) == pytest.approx(reference.pvalue)


def test_friedman_and_wilcoxon_use_listener_song_blocks_and_equal_scipy(panel, analysed):
    out, _ = analysed
    tests = {(row["attribute"], row["test"]): row for row in read_table(out / "tests.csv")}
    pairs = by_attribute(read_table(out / "pairwise.csv"))
    for attribute in ATTRIBUTES:
        blocks = np.array([[scores[song, attribute, system] for system in SYSTEMS]
                           for scores in panel.values() for song in SONGS], dtype=float)
        reference = scipy.stats.friedmanchisquare(*blocks.T)
        row = tests[attribute, "friedman"]
        assert int(row["blocks"]) == 18
        assert float(row["statistic"]) == pytest.approx(reference.statistic)
        assert float(row["p"]) == pytest.approx(reference.pvalue)
        column = {system: i for i, system in enumerate(SYSTEMS)}
        got = {(r["a"], r["b"]): r for r in pairs[attribute]}
        assert len(got) == 3
        p_values = []
        for (a, b), r in got.items():
            expected = scipy.stats.wilcoxon(blocks[:, column[a]], blocks[:, column[b]])
            assert float(r["statistic"]) == pytest.approx(expected.statistic)
            assert float(r["p"]) == pytest.approx(expected.pvalue)
            p_values.append(expected.pvalue)
        assert [float(r["p_holm"]) for r in got.values()] == pytest.approx(list(holm(p_values)))


def test_loop_test_blocks_average_each_listeners_samples_per_system(tmp_path):
    """Loop test: ten samples per system per listener; Friedman runs on the listeners' means."""
    rng = np.random.default_rng(3)
    systems = ("Training set", "VQ-VAE+LSTM", "MuseGAN")
    rows, means = [], []
    for listener in range(8):
        listener_means = []
        for offset, system in enumerate(systems):
            scores = np.clip(np.round(4 - offset * 0.5 + rng.normal(0, 1, 10)), 1, 5)
            listener_means.append(scores.mean())
            rows += [{"participant": f"p{listener}", "session": f"s{listener}", "page": f"loop-{offset}{k}",
                      "stimulus": f"{system}-{k}", "system": system, "attribute": "Loop-likeness", "score": score,
                      "time": "t", "song": ""} for k, score in enumerate(scores)]
        means.append(listener_means)
    out = tmp_path / "report"
    code, _, stderr = run_analyse(write_json(tmp_path / "answers.json", rows), f"out={out}")
    assert code == 0, stderr
    friedman = next(r for r in read_table(out / "tests.csv") if r["test"] == "friedman")
    kruskal = next(r for r in read_table(out / "tests.csv") if r["test"] == "kruskal_wallis")
    assert float(friedman["statistic"]) == pytest.approx(scipy.stats.friedmanchisquare(*np.array(means).T).statistic)
    by_system = [[r["score"] for r in rows if r["system"] == s] for s in systems]
    assert float(kruskal["statistic"]) == pytest.approx(scipy.stats.kruskal(*by_system).statistic)
    assert (out / "ratings.png").stat().st_size > 0
    assert "Not applied: no ratings of the reference system `target`" in (out / "report.md").read_text()


def test_holm_on_a_known_example():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm([0.02]) == pytest.approx([0.02])


def test_post_screening_flags_and_can_exclude_a_listener_who_rates_the_reference_low(panel, tmp_path):
    honest = {key: (95 if key[2] == "target" else score) for key, score in panel["listener0"].items()}
    careless = dict(honest)
    for song in SONGS[:2]:  # 2 of 6 pages: 33 % > 15 %
        careless[song, "Clarity", "target"] = 40
    borderline = dict(honest)
    borderline["song_a", "Clarity", "target"] = 60  # 1 of 6 pages: 17 % > 15 % fails; at max_share 0.2 passes
    files = [write_json(tmp_path / f"{name}.json", mixing_rows(name, scores))
             for name, scores in (("honest", honest), ("careless", careless), ("borderline", borderline))]
    out = tmp_path / "flagged"
    code, stdout, _ = run_analyse(*files, f"out={out}", "screening.max_share=0.2")
    assert code == 0
    screening = {row["participant"]: row for row in read_table(out / "screening.csv")}
    assert screening["careless"]["fails"] == "True" and int(screening["careless"]["low_pages"]) == 2
    assert screening["honest"]["fails"] == "False" and screening["borderline"]["fails"] == "False"
    assert "| careless | 6 | 2 | 33% | fails |" in stdout
    counts = {(r["attribute"], r["system"]): int(r["count"]) for r in read_table(out / "summary.csv")}
    assert counts["Clarity", "target"] == 9  # reported only: everyone counted

    excluded = tmp_path / "excluded"
    assert run_analyse(*files, f"out={excluded}", "screening.exclude=true")[0] == 0
    screening = {row["participant"]: row["fails"] for row in read_table(excluded / "screening.csv")}
    assert screening == {"borderline": "True", "careless": "True", "honest": "False"}
    counts = {(r["attribute"], r["system"]): int(r["count"]) for r in read_table(excluded / "summary.csv")}
    assert counts["Clarity", "target"] == 3

    nobody = tmp_path / "nobody"  # every listener fails: the report says so and shows no figure it lacks
    assert run_analyse(*files[1:], f"out={nobody}", "screening.exclude=true")[0] == 0
    report = (nobody / "report.md").read_text()
    assert "Every listener failed the screening: no ratings left to analyse." in report
    assert "ratings.png" not in report and not (nobody / "ratings.png").exists()


def test_reader_skips_bad_files_and_rows_with_reasons_and_counts_repeated_answers_once(tmp_path):
    rows = mixing_rows("ann", {("song_a", "Clarity", s): 50 + i for i, s in enumerate(SYSTEMS)})
    write_json(tmp_path / "ann.json", rows)
    write_csv(tmp_path / "ann.csv", rows)  # the same answers downloaded twice
    contradicting = [dict(rows[0], score=1)]
    write_json(tmp_path / "ann_edited.json", contradicting)
    bad_rows = [dict(rows[0], session="other", score="abc"), {k: v for k, v in rows[1].items() if k != "system"},
                dict(rows[2], session="other", score="nan")]
    write_json(tmp_path / "bad_rows.json", bad_rows)
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")

    results = read_results([tmp_path])
    assert len(results.ratings) == 3 and results.repeated == 3
    reasons = dict(results.skipped)
    assert "not an answer file" in reasons[str(tmp_path / "broken.json")]
    assert "lacks participant" in reasons[str(tmp_path / "table.csv")]
    assert "contradicts" in reasons[f"{tmp_path / 'ann_edited.json'}:1"]
    assert "'abc' is not a number" in reasons[f"{tmp_path / 'bad_rows.json'}:1"]
    assert "no system" in reasons[f"{tmp_path / 'bad_rows.json'}:2"]
    assert "not finite" in reasons[f"{tmp_path / 'bad_rows.json'}:3"]
    assert len(results.skipped) == 6


def test_command_line_errors_are_one_line(tmp_path):
    (tmp_path / "empty.json").write_text(json.dumps({"ratings": []}))
    rated = write_json(tmp_path / "rated.json", mixing_rows("ann", {("song_a", "Clarity", s): 50 for s in SYSTEMS}))
    for args, message in [((), "analyse needs answer files"), ((tmp_path / "nowhere.json",), "no such answer file"),
                          ((tmp_path / "empty.json",), "no ratings found"),
                          ((tmp_path / "empty.json", "screening.level=3"), "Valid keys at screening"),
                          ((rated, "systems=[target, proposd]"),
                           "systems: ['proposd'] not rated in the answers; rated: anchor, proposed, target")]:
        code, _, stderr = run_analyse(*args, f"out={tmp_path / 'out'}")
        assert code == 2 and message in stderr and stderr.count("\n") == 1, stderr


def test_answers_of_different_tests_are_refused_unless_chosen(tmp_path):
    """Two builds of a test share system names but not stimuli: pooling them is a choice, never silent."""
    scores = {("song_a", "Clarity", s): 40 + 10 * i for i, s in enumerate(SYSTEMS)}
    answers = tmp_path / "answers"
    answers.mkdir()
    write_json(answers / "ann.json", [dict(row, test="aaaa11112222") for row in mixing_rows("ann", scores)])
    write_csv(answers / "bob.csv", [dict(row, test="bbbb11112222") for row in mixing_rows("bob", scores)])
    # the JSON download names its test once, in its header
    (answers / "cid.json").write_text(json.dumps({"test": {"id": "aaaa11112222"}, "ratings": mixing_rows("cid", scores)}))

    code, _, stderr = run_analyse(answers, f"out={tmp_path / 'mixed'}")
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert f"2 listening tests: aaaa11112222 (in {answers / 'ann.json'}), bbbb11112222 (in {answers / 'bob.csv'})" in stderr
    assert not (tmp_path / "mixed").exists()

    code, stdout, stderr = run_analyse(answers, "tests=[aaaa11112222]", f"out={tmp_path / 'one'}")
    assert code == 0, stderr
    assert "3 ratings of other tests left out" in stdout and "from 2 listeners" in stdout
    assert {int(r["count"]) for r in read_table(tmp_path / "one" / "summary.csv")} == {2}

    code, stdout, stderr = run_analyse(answers, "tests=[aaaa11112222, bbbb11112222]", f"out={tmp_path / 'pooled'}")
    assert code == 0 and "from 3 listeners" in stdout, stderr
    code, _, stderr = run_analyse(answers, "tests=[cccc11112222]", f"out={tmp_path / 'none'}")
    assert code == 2 and "tests: ['cccc11112222'] not among the answers' tests: aaaa11112222, bbbb11112222" in stderr
