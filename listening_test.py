"""Listening tests for both papers: build a static web kit from a run's outputs, then analyse the answers.

    python listening_test.py build kind=loops out=DIR \\
        systems="{Training set: LOOPS_CACHE, VQ-VAE+LSTM: GENERATED_DIR, CNN-VAE: CNNVAE.ckpt}"
    python listening_test.py build kind=mixing mixes=EVALUATE_MIX_OUT stems=SONGS_DIR out=DIR
    python listening_test.py analyse RESULTS... out=DIR [screening.exclude=true]
    python listening_test.py demo                     # make listening-test

Keys and defaults: ``configs/listening_test.yaml`` (``build`` reads its ``build`` section and the
kind's). A kit is a folder with ``index.html``: open it from the disk or put the folder on any
static web server, one browser per participant; each participant downloads their answers as JSON
and CSV (and the page POSTs them to ``post_url`` when one is set). ``analyse`` takes those files,
or folders holding them; arguments holding ``=`` are settings, the others answer files.

``demo`` builds both tests from the newest demo runs under ``runs``: the loop test from the newest
``pipeline.py`` run (``make demo``) and the mixing test from the newest ``evaluate_mix.py`` output
(a folder with ``mixes/target/``). The demo's test songs have wet stems that sum to their
mixture, so its mixing test has no extra anchor (``demo.anchor``): the ``sum`` mix of
``evaluate_mix.py`` is the low anchor. It builds what it finds and names the command to run for
what is missing (exit code 1 then).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from framework.checkpoints import selected_checkpoint
from framework.cli import check_output_folder, script_main
from framework.config import ConfigError, apply_overrides
from listening.analysis.report import analyse
from listening.analysis.results import Results, read_results
from listening.build.loops import build_loop_test
from listening.build.mixing import build_mixing_test

CONFIG = Path(__file__).resolve().parent / "configs" / "listening_test.yaml"
USAGE = "usage: python listening_test.py build kind=loops|mixing ... out=DIR | analyse RESULTS... out=DIR | demo"
BUILDERS = {"loops": build_loop_test, "mixing": build_mixing_test}
#: Generator checkpoints the demo's loop test includes when its pipeline run trained them.
DEMO_GENERATORS = {"cnn_vae": "CNN-VAE", "music_transformer": "Music Transformer", "musegan": "MuseGAN"}


def section_config(sections: Sequence[str], argv: Sequence[str]) -> DictConfig:
    """The named sections of ``configs/listening_test.yaml`` merged, with ``key=value`` overrides."""
    base = OmegaConf.load(CONFIG)
    cfg = apply_overrides(OmegaConf.merge(*(base[section] for section in sections)), argv)
    OmegaConf.resolve(cfg)
    return cfg


def build_config(kind: str, argv: Sequence[str]) -> DictConfig:
    if kind not in BUILDERS:
        raise ConfigError(f"kind={kind!r}; choose one of: {', '.join(BUILDERS)}")
    return section_config(["build", kind], argv)


def build_kit(kind: str, cfg: DictConfig) -> dict:
    check_output_folder(cfg.out, cfg.overwrite)
    return BUILDERS[kind](cfg)


def build(argv: Sequence[str]) -> dict:
    kinds = [arg.split("=", 1)[1] for arg in argv if arg.startswith("kind=")]
    if len(kinds) != 1:
        raise ConfigError(f"build needs one kind=loops or kind=mixing, got {len(kinds)}")
    return build_kit(kinds[0], build_config(kinds[0], [arg for arg in argv if not arg.startswith("kind=")]))


def analyse_answers(argv: Sequence[str]) -> dict:
    paths = [arg for arg in argv if "=" not in arg]
    cfg = section_config(["analyse"], [arg for arg in argv if "=" in arg])
    if not paths:
        raise ConfigError("analyse needs answer files or folders: python listening_test.py analyse RESULTS... out=DIR")
    for path in paths:
        if not Path(path).exists():
            raise ConfigError(f"{path}: no such answer file or folder")
    results = read_results(paths)
    if not results.ratings:
        reasons = "; ".join(f"{where}: {why}" for where, why in results.skipped[:3])
        raise ConfigError(f"no ratings found in {', '.join(paths)}" + (f" ({reasons})" if reasons else ""))
    results, left_out = choose_tests(results, cfg.tests)
    rated = sorted({rating.system for rating in results.ratings})
    unknown = [system for system in (cfg.systems or []) if system not in rated]
    if unknown:
        raise ConfigError(f"systems: {unknown} not rated in the answers; rated: {', '.join(rated)}")
    check_output_folder(cfg.out, cfg.overwrite)
    screening = cfg.screening
    return analyse(results, cfg.out, cfg.systems, screening.reference, screening.below, screening.max_share,
                   screening.exclude, left_out)


def choose_tests(results: Results, chosen: Sequence[str] | None) -> tuple[Results, int]:
    """The answers of the tests ``chosen``, and how many others were left out; with none chosen,
    the answers must all come from one test (two builds of a test differ in their stimuli)."""
    found = ", ".join(sorted(results.tests))
    if chosen:
        chosen = [str(test) for test in chosen]  # an id of digits alone arrives as a number
        unknown = [test for test in chosen if test not in results.tests]
        if unknown:
            raise ConfigError(f"tests: {unknown} not among the answers' tests: {found or 'none named'}")
        return results.of_tests(chosen)
    if len(results.tests) > 1:
        where = ", ".join(f"{test} (in {path})" for test, path in sorted(results.tests.items()))
        raise ConfigError(f"the answers come from {len(results.tests)} listening tests: {where}; analyse one, or "
                          "choose with tests=[ID, ...] (several ids pool them)")
    return results, 0


def newest(paths) -> Path | None:
    return max(paths, key=lambda path: path.stat().st_mtime, default=None)


def demo_loop_systems(run: Path) -> dict[str, str]:
    systems = {"Training set": str(run / "loops"), "VQ-VAE+LSTM": str(run / "generated")}
    for step, name in DEMO_GENERATORS.items():
        checkpoint = selected_checkpoint(run / step)
        if checkpoint is not None:
            systems[name] = str(checkpoint)
    return systems


def demo(argv: Sequence[str]) -> dict:
    """Both tests from the newest demo runs; the commands to run first for any that is missing."""
    cfg = section_config(["demo"], argv)
    runs, out = Path(cfg.runs), Path(cfg.out)
    loop_run = newest(p.parent.parent for p in runs.glob("pipeline/*/generated/phrases.npz")
                      if (p.parent.parent / "loops" / "report.json").is_file())
    mix_output = newest(p.parent.parent for p in runs.glob("**/mixes/target") if any(p.glob("*.wav")))
    built, missing = {}, {}
    if loop_run is None:
        missing["loops"] = f"no pipeline.py run with loops/ and generated/ under {runs}/pipeline: run `make demo` first"
    else:
        print(f"loop test from {loop_run}")
        cfg_loops = build_config("loops", [f"out={out / 'loops'}", "overwrite=true"])
        cfg_loops.systems = demo_loop_systems(loop_run)
        built["loops"] = build_kit("loops", cfg_loops)
    if mix_output is None:
        missing["mixing"] = (f"no evaluate_mix.py output (a folder with mixes/target/*.wav) under {runs}: run "
                             "`make demo-mixing` (its evaluate_mix step) or `python evaluate_mix.py ... out=DIR` first")
    else:
        print(f"mixing test from {mix_output}")
        cfg_mixing = build_config("mixing", [f"mixes={mix_output}", f"stems={cfg.stems}", f"out={out / 'mixing'}",
                                              "overwrite=true"])
        cfg_mixing.anchor = cfg.anchor
        built["mixing"] = build_kit("mixing", cfg_mixing)
    return {"built": built, "missing": missing}


COMMANDS = {"build": build, "analyse": analyse_answers, "demo": demo}


def run(argv: Sequence[str]) -> tuple[str, dict]:
    if not argv or argv[0] not in COMMANDS:
        raise ConfigError(USAGE)
    return argv[0], COMMANDS[argv[0]](argv[1:])


def open_hint(summary: dict) -> str:
    """What was skipped while building, then where the kit is and how to open it."""
    notes = [f"note: {name}: {count} silent loops skipped and replaced by further draws"
             for name, count in summary.get("silent_skipped", {}).items()]
    notes += [f"note: song {name} skipped: {why}" for name, why in summary.get("skipped_songs", {}).items()]
    index = (Path(summary["out"]) / "index.html").resolve()
    return "\n".join([*notes, f"{summary['kind']} test {summary['id']}: open {index.as_uri()} "
                                f"or serve {index.parent} with any static web server"])


def report(outcome: tuple[str, dict]) -> int:
    command, result = outcome
    if command == "build":
        print(open_hint(result))
    elif command == "analyse":
        print(result["report"])
        print(f"\nreport: {Path(result['out']) / 'report.md'}")
    else:
        for summary in result["built"].values():
            print(open_hint(summary))
        for why in result["missing"].values():
            print(f"missing: {why}", file=sys.stderr)
        return 1 if result["missing"] else 0
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return script_main(run, argv, report)


if __name__ == "__main__":
    sys.exit(main())
