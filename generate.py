"""Generate loops with a trained LSTM prior: ``python generate.py prior=CKPT [key=value ...]``.

Keys and defaults: ``configs/generate.yaml``. Sampling modes (``sampling.mode``): ``temperature``
(softmax of logits / ``sampling.temperature``; paper 0.7), ``top_k`` (the ``sampling.k`` most probable
indices; paper 30), ``top_p`` (the fewest most probable indices whose probability reaches
``sampling.p``; paper 0.08). The temperature applies in every mode. With ``detector=CKPT`` each
loop gets its loop score; with ``reject.threshold=T`` too, only loops scoring below T are kept and
batches are drawn until ``n`` pass or ``reject.max_rounds`` batches have been drawn.

Writes into ``out``: ``midi/loop_00000.mid`` ... (one file per loop), ``pianorolls.png`` (the
first ``preview`` loops), ``previews/loop_00.{mid,wav}`` ... (the same loops rendered to audio,
when ``wav=true``),
``phrases.npz`` (``packed``: bit-packed phrases (N, 912) uint8, ``codes`` (N, 32), ``scores`` when
scored) and ``summary.json`` (counts, acceptance rate, UP, ND and LS; also printed).
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from callbacks.media import pianoroll_grid, write_previews
from callbacks.metrics import note_density, unique_pitch
from datamodules.pianoroll import PACKED_BYTES, pack_phrases, phrases_to_midi
from framework.cli import check_checkpoints, check_output_folder, load_checkpoint, script_main
from framework.config import ConfigError, load_config as load_yaml_config
from framework.io import atomic_path
from framework.seeding import sampling_generator
from lightning_modules.loop_detector import LoopDetector
from lightning_modules.prior import GeneratedLoops, LSTMPrior, generate_loops
from lightning_modules.sampling import SamplingSettings

CONFIG = Path(__file__).resolve().parent / "configs" / "generate.yaml"


def load_config(argv: Sequence[str]) -> DictConfig:
    """``configs/generate.yaml`` with ``key=value`` overrides; unknown keys fail naming the valid ones."""
    cfg = load_yaml_config(CONFIG, argv)
    if cfg.prior is None:
        raise ConfigError("prior=... is required: the LSTMPrior checkpoint to sample from")
    for key in ("n", "batch_size", "reject.max_rounds"):
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)} must be at least 1")
    try:
        SamplingSettings.from_mode(**_sampling_arguments(cfg))
    except ValueError as err:
        raise ConfigError(f"sampling: {err}") from err
    if cfg.reject.threshold is not None and cfg.detector is None:
        raise ConfigError("reject.threshold needs detector=CKPT (a LoopDetector checkpoint) to score the loops")
    return cfg


def summarise(cfg: DictConfig, prior: LSTMPrior, loops: GeneratedLoops) -> dict:
    """Counts, acceptance and the quality metrics (UP, ND, LS) of the written loops."""
    written = len(loops.phrases)
    metrics = {}
    if written:
        metrics = {"UP": unique_pitch(loops.phrases).mean().item(), "ND": note_density(loops.phrases).mean().item()}
        if loops.scores is not None:
            metrics["LS"] = loops.scores.mean().item()
    return {
        "prior": str(cfg.prior),
        "vqvae": prior.hparams.vqvae_ckpt,
        "detector": cfg.detector,
        "sampling": {"mode": cfg.sampling.mode, **asdict(prior.sampling_settings(**_sampling_arguments(cfg)))},
        "seed": cfg.seed,
        "requested": cfg.n,
        "written": written,
        "shortfall": cfg.n - written,
        "generated": loops.generated,
        "rounds": loops.rounds,
        "reject_threshold": cfg.reject.threshold,
        "acceptance_rate": loops.acceptance_rate,
        "metrics": metrics,
    }


def _sampling_arguments(cfg: DictConfig) -> dict:
    sampling = cfg.sampling
    return {"mode": sampling.mode, "temperature": sampling.temperature, "top_k": sampling.k, "top_p": sampling.p}


def write_midi_files(phrases: np.ndarray, folder: Path, tempo: float, seed: int) -> list[Path]:
    """One MIDI file per phrase, ``loop_00000.mid`` ...; velocity jitter seeded by ``seed`` + index."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"loop_{index:05d}.mid" for index in range(len(phrases))]
    for index, (phrase, path) in enumerate(tqdm(zip(phrases, paths), total=len(paths), desc="writing MIDI", unit="file")):
        phrases_to_midi(phrase, path, tempo=tempo, seed=seed + index)
    return paths


def write_outputs(cfg: DictConfig, loops: GeneratedLoops, summary: dict, folder: Path) -> None:
    phrases = loops.phrases.numpy()
    folder.mkdir(parents=True)
    write_midi_files(phrases, folder / "midi", cfg.tempo, cfg.seed)
    preview = phrases[: cfg.preview]
    if len(preview):
        pianoroll_grid(preview, folder / "pianorolls.png", title=f"first {len(preview)} of {len(phrases)} loops")
        if cfg.wav:
            write_previews(preview, folder / "previews", cfg.tempo, cfg.sample_rate, cfg.seed, prefix="loop")
    packed = pack_phrases(phrases) if len(phrases) else np.zeros((0, PACKED_BYTES), dtype=np.uint8)
    arrays = {"packed": packed, "codes": loops.codes.numpy().astype(np.int16)}
    if loops.scores is not None:
        arrays["scores"] = loops.scores.numpy()
    np.savez_compressed(folder / "phrases.npz", **arrays)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))


def run(argv: Sequence[str]) -> dict:
    """Generate and write the loops described by ``argv``; return the summary."""
    cfg = load_config(argv)
    check_checkpoints(cfg, ("prior", "vqvae", "detector"))
    check_output_folder(cfg.out, cfg.overwrite)
    device = torch.device(cfg.device)
    prior = load_checkpoint(LSTMPrior, cfg.prior, device, "prior").eval()
    if cfg.vqvae is not None:
        prior.hparams.vqvae_ckpt = str(cfg.vqvae)
    detector = load_checkpoint(LoopDetector, cfg.detector, device, "detector").eval() if cfg.detector else None
    loops = generate_loops(
        prior, cfg.n, sampling_generator(cfg.seed, 0, device), _sampling_arguments(cfg), cfg.batch_size,
        detector, cfg.reject.threshold, cfg.reject.max_rounds,
    )
    summary = summarise(cfg, prior, loops)
    with atomic_path(cfg.out) as tmp:
        write_outputs(cfg, loops, summary, tmp)
    return summary


def report(summary: dict) -> None:
    print(json.dumps(summary, indent=2))
    if summary["shortfall"] > 0:
        print(
            f"warning: only {summary['written']} of {summary['requested']} loops scored below "
            f"reject.threshold={summary['reject_threshold']} in {summary['rounds']} batches "
            f"(acceptance {summary['acceptance_rate']:.2%}); raise reject.max_rounds or reject.threshold",
            file=sys.stderr,
        )


def main(argv: Sequence[str] | None = None) -> int:
    return script_main(run, argv, report)


if __name__ == "__main__":
    sys.exit(main())
