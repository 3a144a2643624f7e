"""Run the loop-generation chain end to end: ``python pipeline.py [key=value ...]``.

Each step is an ordinary stage of the framework (``train.py`` experiments, the code-cache encoder,
``generate.py``, ``evaluate.py``) called with the previous steps' outputs by path, so any step can
be re-run alone with the command it prints. Keys and defaults: ``configs/pipeline.yaml``; the
outputs all land in ``run_dir``:

    detector/   loop detector run (checkpoint, score histogram, Fig. 3 analysis)
    loops/      extracted loops (phrase cache, scores, histogram)
    vqvae/ prior/           training runs of the VQ-VAE and its LSTM prior
    cnn_vae/ music_transformer/ musegan/   training runs of the baselines
    codes/      VQ-VAE code cache
    generated/  MIDI loops, pianoroll grid, WAV previews, summary
    evaluation/ Tables 2-3 and the rejection sweep (Markdown, CSV, PNG)
    mixer_pretrain/ mixer/ wave_u_net/ mixes/ evaluation_mix/   the automatic-mixing steps: the
                front-end pretraining, the mixer started from it and its Wave-U-Net baseline, mixes of
                the dry songs, and the objective table on the test songs

Several devices (``devices=N``): each training step runs as its own job of N processes started by
``torchrun`` (``python -m torch.distributed.run --standalone``), so the pipeline itself stays one
process: encoding, generation and evaluation run once, and every step is handed the run
directory resolved here. ``torchrun`` stops the whole job when one rank dies, and the pipeline
stops with it. The non-training steps run on the first GPU when the training steps use GPUs.
"""
from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from omegaconf import DictConfig

import evaluate
import evaluate_mix
import generate
import mix
import train
from datamodules.codes import encode_phrase_cache
from framework.checkpoints import selected_checkpoint
from framework.cli import script_main
from framework.config import ConfigError, load_config
from lightning_modules.vqvae import VQVAE

REPO = Path(__file__).resolve().parent
CONFIG = REPO / "configs" / "pipeline.yaml"


class Pipeline:
    """The steps of one pipeline run and the paths they hand to each other."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.root = Path(cfg.run_dir)
        self.args = cfg.scales[cfg.scale]
        self.checkpoints: dict[str, str] = {}

    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def device(self) -> str:
        """Where the steps that are not training run: the first GPU when training uses GPUs."""
        accelerator = self.cfg.accelerator
        gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
        return "cuda" if gpu else "cpu"

    def _train(self, step: str, experiment: str, *args: str) -> Path:
        """Run ``train.py experiment=...`` into ``<run_dir>/<step>`` and return that folder.

        One device: in this process. Several: a ``torchrun`` job of ``devices`` processes.
        """
        cfg = self.cfg
        run_dir = self.path(step)
        argv = [
            f"experiment={experiment}", f"run_dir={run_dir}", f"seed={cfg.seed}",
            f"paths.demo={cfg.demo}", f"logger={cfg.logger}", f"trainer.accelerator={cfg.accelerator}",
            f"trainer.devices={cfg.devices}", *(["trainer.strategy=ddp"] if cfg.devices > 1 else []),
            *args, *self.args[step],
        ]
        if cfg.devices > 1:
            launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.devices}"]
            print(f"    python {' '.join(launcher)} train.py {' '.join(argv)}", flush=True)
            _check(subprocess.run([sys.executable, *launcher, str(REPO / "train.py"), *argv]).returncode,
                   f"the {step} step (train.py under torchrun)")
        else:
            print(f"    python train.py {' '.join(argv)}", flush=True)
            train.run(argv)
        return run_dir

    def detector(self) -> None:
        cfg = self.cfg
        if cfg.labels:
            analysis = [f"callbacks.loop_analysis.labels={cfg.labels}", f"callbacks.loop_analysis.midi={cfg.midi}",
                        f"callbacks.loop_analysis.phrases={cfg.phrases}"]
        else:
            analysis = ["callbacks.loop_analysis=null"]
        self.checkpoints["detector"] = evaluation_checkpoint(
            self._train("detector", "loop_detector", f"datamodule.loops={cfg.loops}", *analysis))

    def extract(self) -> None:
        self._train("extract", "extract_loops", f"detector={self.checkpoints['detector']}",
                    f"phrases={self.cfg.phrases}", f"datamodule.midi={self.cfg.midi}", f"out={self.path('loops')}")

    def vqvae(self) -> None:
        self.checkpoints["vqvae"] = evaluation_checkpoint(
            self._train("vqvae", "vqvae", f"datamodule.cache={self.path('loops')}", "datamodule.midi=null"))

    def encode(self) -> None:
        ckpt = self.checkpoints["vqvae"]
        print(f"    python -m datamodules.codes encode --ckpt {ckpt} --phrases {self.path('loops')} --out {self.path('codes')}")
        model = VQVAE.load_from_checkpoint(ckpt, map_location=self.device)
        encode_phrase_cache(model, self.path("loops"), self.path("codes"), device=self.device, vqvae_ckpt=ckpt)

    def prior(self) -> None:
        self.checkpoints["prior"] = evaluation_checkpoint(
            self._train("prior", "prior", f"datamodule.codes={self.path('codes')}",
                        f"callbacks.generation.detector={self.checkpoints['detector']}"))

    def _baseline(self, name: str) -> None:
        """Train the baseline experiment ``name`` on the extracted loops, scoring its samples with the detector."""
        self.checkpoints[name] = evaluation_checkpoint(self._train(
            name, name, f"datamodule.cache={self.path('loops')}", "datamodule.midi=null",
            f"callbacks.generation.detector={self.checkpoints['detector']}"))

    def cnn_vae(self) -> None:
        self._baseline("cnn_vae")

    def music_transformer(self) -> None:
        self._baseline("music_transformer")

    def musegan(self) -> None:
        self._baseline("musegan")

    def generate(self) -> None:
        argv = [f"prior={self.checkpoints['prior']}", f"detector={self.checkpoints['detector']}",
                f"out={self.path('generated')}", f"seed={self.cfg.seed}", f"device={self.device}", *self.args.generate]
        print(f"    python generate.py {' '.join(argv)}")
        _check(generate.main(argv), "generate.py")

    def evaluate(self) -> None:
        # A generator whose step did not run is passed as null: evaluate.py leaves its rows out.
        generators = [f"{key}={self.checkpoints.get(key) or 'null'}"
                      for key in ("prior", "cnn_vae", "music_transformer", "musegan")]
        argv = [f"training={self.path('loops')}", f"detector={self.checkpoints['detector']}", *generators,
                f"out={self.path('evaluation')}", f"seed={self.cfg.seed}", f"device={self.device}",
                *self.args.evaluate]
        print(f"    python evaluate.py {' '.join(argv)}")
        _check(evaluate.main(argv), "evaluate.py")

    def mixer_pretrain(self) -> None:
        self.checkpoints["mixer_pretrain"] = evaluation_checkpoint(
            self._train("mixer_pretrain", "mixer_pretrain", f"datamodule.root={self.cfg.multitrack}",
                        f"datamodule.cache={self.cfg.normalised}", "stages=[fit]"))

    def mixer(self) -> None:
        # Started from the pretrained filter bank when the mixer_pretrain step ran, as in the paper.
        pretrained = self.checkpoints.get("mixer_pretrain")
        self.checkpoints["mixer"] = evaluation_checkpoint(
            self._train("mixer", "mixer", f"datamodule.root={self.cfg.multitrack}",
                        f"datamodule.cache={self.cfg.normalised}",
                        *([f"model.init_from={pretrained}"] if pretrained else [])))

    def wave_u_net(self) -> None:
        self.checkpoints["wave_u_net"] = evaluation_checkpoint(
            self._train("wave_u_net", "mixer_wave_u_net", f"datamodule.root={self.cfg.multitrack}",
                        f"datamodule.cache={self.cfg.normalised}"))

    def evaluate_mix(self) -> None:
        baselines = [self.checkpoints[name] for name in ("wave_u_net",) if name in self.checkpoints]
        argv = [f"ckpt={self.checkpoints['mixer']}", f"baseline=[{','.join(baselines)}]",
                f"songs={Path(self.cfg.multitrack) / 'test'}", f"cache={Path(self.cfg.normalised) / 'test'}",
                f"out={self.path('evaluation_mix')}", f"device={self.device}", *self.args.evaluate_mix]
        print(f"    python evaluate_mix.py {' '.join(argv)}")
        _check(evaluate_mix.main(argv), "evaluate_mix.py")

    def mix(self) -> None:
        songs = sorted(p for p in Path(self.cfg.dry).iterdir() if p.is_dir())
        if not songs:
            raise FileNotFoundError(f"dry={self.cfg.dry} holds no song folders")
        for song in songs:
            argv = [f"ckpt={self.checkpoints['mixer']}", f"stems={song}", f"out={self.path('mixes') / song.name}.wav"]
            print(f"    python mix.py {' '.join(argv)}")
            _check(mix.main(argv), "mix.py")

    def steps(self) -> list[tuple[str, Callable[[], None]]]:
        valid = ("detector", "extract", "vqvae", "encode", "prior", "cnn_vae", "music_transformer", "musegan",
                 "generate", "evaluate", "mixer_pretrain", "mixer", "wave_u_net", "mix", "evaluate_mix")
        steps = list(self.cfg.steps)
        unknown = [s for s in steps if s not in valid]
        if unknown:
            raise ConfigError(f"steps: unknown step(s) {unknown}; valid: {', '.join(valid)}.")
        for step, needs in (("mixer_pretrain", "mixer"), ("mixer", "mix"), ("mixer", "evaluate_mix")):
            if needs in steps and step in steps and steps.index(step) > steps.index(needs):
                raise ConfigError(f"steps: {step} must come before {needs}, which uses its checkpoint.")
        for needs in ("mix", "evaluate_mix"):
            if needs in steps and "mixer" not in steps:
                raise ConfigError(f"steps: {needs} needs the mixer step, which trains the mixer it uses.")
        return [(name, getattr(self, name)) for name in self.cfg.steps]


def _check(returncode: int, what: str) -> None:
    if returncode:
        raise RuntimeError(f"{what} exited with {returncode}")


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children: the budget a step costs,
    which wall time on a shared machine does not show."""
    return sum(usage.ru_utime + usage.ru_stime
               for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))


def evaluation_checkpoint(run_dir: Path) -> str:
    """The checkpoint the finished training step in ``run_dir`` selected (:func:`selected_checkpoint`)."""
    checkpoint = selected_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir / 'checkpoints' / 'last.ckpt'}: the training step wrote no checkpoint")
    return str(checkpoint)


def run(argv: Sequence[str]) -> Pipeline:
    cfg = load_config(CONFIG, argv)
    if cfg.scale not in cfg.scales:
        raise ConfigError(f"scale={cfg.scale!r}; choose one of: {', '.join(cfg.scales)}.")
    pipeline = Pipeline(cfg)
    steps = pipeline.steps()
    started, cpu_started = time.monotonic(), cpu_seconds()

    def elapsed() -> str:
        return f"{time.monotonic() - started:.0f} s elapsed, {cpu_seconds() - cpu_started:.0f} s CPU"

    for number, (name, step) in enumerate(steps, 1):
        print(f"\n[{number}/{len(steps)}] {name}  ({elapsed()})", flush=True)
        step()
    root = pipeline.root
    print(f"\nDone ({elapsed()}). Outputs in {root}:")
    for label, where in [("generated MIDI loops", root / "generated" / "midi"),
                         ("pianorolls", root / "generated" / "pianorolls.png"),
                         ("evaluation tables", root / "evaluation"),
                         ("rejection sweep plot", root / "evaluation" / "rejection.png"),
                         ("detector analysis", root / "detector" / "loop_analysis"),
                         ("mixes of the dry songs", root / "mixes"),
                         ("mixing evaluation", root / "evaluation_mix")]:
        if where.exists():
            print(f"  {label:22s} {where}")
    return pipeline


def main(argv: Sequence[str] | None = None) -> int:
    return script_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
