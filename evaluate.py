"""Evaluate loop generators as in the paper's Tables 2-3 and Fig. 5.

``python evaluate.py training=PHRASE_CACHE detector=DETECTOR.ckpt prior=PRIOR.ckpt cnn_vae=CNNVAE.ckpt
music_transformer=MT.ckpt musegan=MUSEGAN.ckpt out=DIR [n=...] [device=cuda] [key=value ...]``; keys and
defaults: ``configs/evaluate.yaml``.

Rows, in the paper's order: the training set (LS, UP, ND of ``n`` of its phrases), the CNN-VAE, the
Music Transformer, MuseGAN, and one VQ-VAE+LSTM row per entry of ``prior_sampling``; a generator
whose checkpoint is null is skipped with a note.
Every generator produces ``n`` phrases (default: as many as the training set, at most ``n_cap``)
from the same seed. Writes into ``out``: ``table2.{md,csv}`` (LS, UP, ND, P/R/D/C mean ± std over
``n_networks`` random CNN embeddings), ``table3.{md,csv}`` (F1 of the mean P and R, and of the mean
D and C), ``rejection.{md,csv,png}`` (Fig. 5: the ``rejection.generators`` sampled with rejection at
each of ``rejection.thresholds``, with the acceptance rate and any shortfall) and ``config.yaml``.
The tables are printed as well.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from callbacks.evaluation import (
    ROW_FIELDS, TABLE3_FIELDS, Evaluation, LatentSampler, LoopSource, PhraseSampler, plot_rejection,
    rejection_markdown, table2_markdown, table3_markdown, threshold_label, write_csv,
)
from datamodules.pianoroll import load_phrase_cache
from framework.cli import check_checkpoints, check_output_folder, load_checkpoint, script_main
from framework.config import ConfigError, load_config as load_yaml_config
from framework.io import atomic_path
from lightning_modules.cnn_vae import CNNVAE
from lightning_modules.loop_detector import LoopDetector
from lightning_modules.music_transformer import MusicTransformer
from lightning_modules.musegan import MuseGAN
from lightning_modules.prior import LSTMPrior
from lightning_modules.sampling import SamplingSettings
from lightning_modules.vqvae import VQVAE

CONFIG = Path(__file__).resolve().parent / "configs" / "evaluate.yaml"
# The baselines in Table 2 order: checkpoint key, row name, class and the sampler that wraps it.
BASELINES = (
    ("cnn_vae", "CNN-VAE", CNNVAE, LatentSampler),
    ("music_transformer", "Music Transformer", MusicTransformer, PhraseSampler),
    ("musegan", "MuseGAN", MuseGAN, PhraseSampler),
)
SAMPLING_KEYS = ("name", "mode", "temperature", "k", "p")
CHECKPOINT_KEYS = ("detector", "prior", "vqvae", *(key for key, *_ in BASELINES))


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def sampling_settings(entry: dict) -> dict:
    """``generate_loops`` keyword arguments of one ``prior_sampling`` entry (mode, temperature, top_k, top_p)."""
    settings = SamplingSettings.from_mode(
        entry["mode"], entry.get("temperature", 1.0), entry.get("k", 30), entry.get("p", 0.08)
    )
    return {"mode": entry["mode"], "temperature": settings.temperature, "top_k": settings.top_k, "top_p": settings.top_p}


def prior_row_name(entry: dict) -> str:
    """The entry's ``name``, or one built from its settings: ``VQ-VAE+LSTM (top-k sampling=30)``."""
    if entry.get("name"):
        return str(entry["name"])
    settings = sampling_settings(entry)
    described = {
        "temperature": f"temperature sampling={settings['temperature']:g}",
        "top_k": f"top-k sampling={settings['top_k']}",
        "top_p": f"top-p sampling={settings['top_p']:g}",
    }[entry["mode"]]
    if entry["mode"] != "temperature" and settings["temperature"] != 1.0:
        described += f", temperature={settings['temperature']:g}"
    return f"VQ-VAE+LSTM ({described})"


def _check_sampling(entries) -> list[dict]:
    checked = []
    for position, entry in enumerate(entries):
        where = f"prior_sampling.{position}"
        if not isinstance(entry, dict) or "mode" not in entry:
            raise ConfigError(f"{where} must be a mapping with at least `mode`, got {entry!r}")
        unknown = sorted(set(entry) - set(SAMPLING_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown keys {unknown}; valid keys: {', '.join(SAMPLING_KEYS)}")
        try:
            sampling_settings(entry)
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from err
        checked.append(entry)
    names = [prior_row_name(entry) for entry in checked]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"prior_sampling: row names must differ, repeated: {duplicates}")
    return checked


def _check_thresholds(thresholds: list) -> None:
    numbers = [t for t in thresholds if t is not None]
    if not thresholds or thresholds.count(None) > 1 or (None in thresholds and thresholds[0] is not None):
        raise ConfigError(f"rejection.thresholds={thresholds}: list them loosest first, with at most one null (first)")
    if any(not isinstance(t, (int, float)) or t <= 0 for t in numbers) or numbers != sorted(set(numbers), reverse=True):
        raise ConfigError(f"rejection.thresholds={thresholds}: thresholds must be positive and strictly decreasing")


def load_config(argv: Sequence[str]) -> DictConfig:
    """``configs/evaluate.yaml`` with ``key=value`` overrides; unknown keys fail naming the valid ones."""
    cfg = load_yaml_config(CONFIG, argv)
    if cfg.training is None:
        raise ConfigError("training=... is required: the phrase cache of the training set")
    for key in ("n", "n_cap", "batch_size", "n_networks", "k", "rejection.max_rounds"):
        value = OmegaConf.select(cfg, key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{key}={value} must be a whole number of at least 1")
    if cfg.max_samples <= cfg.k:
        raise ConfigError(f"max_samples={cfg.max_samples} must exceed k={cfg.k}")
    names = [prior_row_name(entry) for entry in _check_sampling(OmegaConf.to_container(cfg.prior_sampling))]
    known = [*(name for _, name, *_ in BASELINES), *names]
    swept = list(cfg.rejection.generators)
    for name in swept:
        if name not in known:
            raise ConfigError(f"rejection.generators: unknown model {name!r}; models: {', '.join(known)}")
    if len(set(swept)) < len(swept):
        raise ConfigError(f"rejection.generators={swept} names a model twice")
    _check_thresholds(list(cfg.rejection.thresholds))
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device} but CUDA is not available here; use device=cpu")
    return cfg


def load_sources(cfg: DictConfig, device: torch.device) -> list[LoopSource]:
    """The generators whose checkpoints are given, in Table 2 order; a note for each one skipped."""
    sources = []
    for key, name, model_class, sampler in BASELINES:
        if cfg[key] is None:
            note(f"{key}=null: the {name} row is skipped")
        else:
            sources.append(LoopSource(name, sampler(load_checkpoint(model_class, cfg[key], device, key))))
    if cfg.prior is None:
        note("prior=null: the VQ-VAE+LSTM rows are skipped")
    else:
        prior = load_checkpoint(LSTMPrior, cfg.prior, device, "prior").eval()
        # The VQ-VAE is loaded now, not at the first decode, so a wrong or moved file fails in one line.
        vqvae = cfg.vqvae if cfg.vqvae is not None else prior.hparams.vqvae_ckpt
        if vqvae is None:
            raise ConfigError(f"prior={cfg.prior} records no VQ-VAE checkpoint: pass vqvae=...")
        prior.hparams.vqvae_ckpt = str(vqvae)
        prior.attach_vqvae(load_checkpoint(VQVAE, vqvae, device, "vqvae" if cfg.vqvae is not None else None))
        for entry in OmegaConf.to_container(cfg.prior_sampling):
            sources.append(LoopSource(prior_row_name(entry), prior, sampling_settings(entry)))
    return sources


def load_training(cfg: DictConfig):
    """The training cache's packed phrases, left on disk: the evaluation reads only the rows it draws."""
    try:
        return load_phrase_cache(cfg.training).packed
    except FileNotFoundError as err:
        raise ConfigError(f"training={cfg.training}: {err}") from err


def resolve_n(cfg: DictConfig, training_size: int) -> int:
    if cfg.n is not None:
        return cfg.n
    return training_size if cfg.n_cap is None else min(training_size, cfg.n_cap)


def run(argv: Sequence[str]) -> dict:
    """Evaluate the configured generators, write the tables and figure; return their rows."""
    cfg = load_config(argv)
    check_checkpoints(cfg, CHECKPOINT_KEYS)
    check_output_folder(cfg.out, cfg.overwrite)
    device = torch.device(cfg.device)
    training = load_training(cfg)
    n = resolve_n(cfg, len(training))
    detector = load_checkpoint(LoopDetector, cfg.detector, device, "detector").eval() if cfg.detector else None
    if detector is None:
        note("detector=null: LS is left out and the rejection sweep is skipped")
    sources = load_sources(cfg, device)
    evaluation = Evaluation(
        training, n, cfg.seed, device, detector, cfg.batch_size, cfg.rejection.max_rounds,
        cfg.n_networks, cfg.max_samples, cfg.k,
    )
    table2 = [evaluation.training_row(), *(evaluation.row(source) for source in sources)]

    thresholds = list(cfg.rejection.thresholds)
    present = {source.name: source for source in sources}
    swept = []
    for name in cfg.rejection.generators if detector is not None else []:
        if name in present:
            swept.append(present[name])
        else:
            note(f"rejection sweep: {name!r} is skipped, its checkpoint is not given")
    rejection = evaluation.rejection_rows(swept, thresholds)

    setting = (f"n = {n} phrases per model (seed {cfg.seed}); P/R/D/C: mean ± std over {cfg.n_networks} random "
               f"CNN embeddings, k = {cfg.k}, up to {cfg.max_samples} phrases per side; training set: {cfg.training}")
    texts = {
        "table2.md": "**Table 2.**\n\n" + table2_markdown(table2, setting),
        "table3.md": "**Table 3.**\n\n" + table3_markdown(table2[1:], "F1 of the mean P and R, and of the mean D and C "
                                                                   "in Table 2."),
    }
    if rejection:
        texts["rejection.md"] = "**Fig. 5 sweep.**\n\n" + rejection_markdown(
            rejection, thresholds, f"Rejection: keep phrases with loop score < threshold; # numbers the markers "
                                   f"of rejection.png; at most {cfg.rejection.max_rounds} batches of "
                                   f"{cfg.batch_size} per threshold. {setting}")
    with atomic_path(cfg.out) as folder:
        folder.mkdir()
        for name, text in texts.items():
            (folder / name).write_text(text)
        write_csv(table2, ROW_FIELDS, folder / "table2.csv")
        write_csv(table2[1:], TABLE3_FIELDS, folder / "table3.csv")
        if rejection:
            write_csv(rejection, ROW_FIELDS, folder / "rejection.csv")
            plot_rejection(rejection, thresholds, folder / "rejection.png", training=table2[0])
        OmegaConf.save(cfg, folder / "config.yaml")
    for text in texts.values():
        print(text)
    for row in rejection:
        if row["shortfall"] > 0:
            print(f"warning: {row['model']} kept only {row['accepted']} of {row['requested']} phrases below "
                  f"threshold {threshold_label(row['threshold'])} in {cfg.rejection.max_rounds} batches "
                  f"(acceptance {row['acceptance_rate']:.2%}); its row uses only those; "
                  "raise rejection.max_rounds for more", file=sys.stderr)
    return {"n": n, "table2": table2, "rejection": rejection, "out": Path(cfg.out)}


def main(argv: Sequence[str] | None = None) -> int:
    return script_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
