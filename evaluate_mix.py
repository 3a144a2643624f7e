"""Objective evaluation of automatic mixers on whole test songs: ``python evaluate_mix.py ckpt=CKPT
[baseline=CKPT | baseline=[A,B]] songs=DIR out=DIR [key=value ...]`` (keys: ``configs/evaluate_mix.yaml``).

Every song of ``songs`` (MUSDB18-HQ layout: four stems and ``mixture.wav``) is effect-normalised
with the checkpoints' FxNorm features (cached, resumable, as the training DataModule does; the
checkpoints must share one features file) and mixed in full by each system in chunks
(``mix_song``). Each mix is compared with the song's ``mixture.wav`` by the spec's objective
features (MAPE of 40-frame running means over the whole song) and L1/L2, and the scores are
averaged over songs. Rows: ``target`` (the reference itself: all zero, a check), ``sum`` (the plain
sum of the normalised stems) and one per checkpoint, named by its network (``fxnorm``,
``wave_u_net``; a repeated name gets ``_2``, ...). ``out`` receives ``table.md``, ``table.csv`` (one
row per system, one column per metric), ``songs.csv`` (one row per system and song),
``features.png``, ``config.yaml`` and every mix as ``mixes/<system>/<song>.wav`` (44.1 kHz stereo
float WAV).
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from tqdm import tqdm  # noqa: E402

from callbacks.mix_metrics import MAPE_FEATURES, METRIC_NAMES, MixFeatureError  # noqa: E402
from datamodules.fxnorm import FxNormalizer, normalize_folder  # noqa: E402
from datamodules.fxnorm.songs import MIXTURE, STEMS, list_songs, song_info  # noqa: E402
from datamodules.multitrack import LAYOUT, PackedSong, write_packed_song  # noqa: E402
from framework.cli import check_output_folder, script_main  # noqa: E402
from framework.config import ConfigError, load_config  # noqa: E402
from framework.errors import InputError  # noqa: E402
from framework.io import atomic_path  # noqa: E402
from lightning_modules.mixer import AutoMixer, mix_song  # noqa: E402
from mix import features_path, load_mixer  # noqa: E402

CONFIG = Path(__file__).resolve().parent / "configs" / "evaluate_mix.yaml"
TARGET, SUM = "target", "sum"


def configure(argv: Sequence[str]) -> DictConfig:
    cfg = load_config(CONFIG, argv)
    for key in ("ckpt", "songs"):
        if cfg[key] is None:
            raise ConfigError(f"{key}=... is required (usage: python evaluate_mix.py ckpt=CKPT songs=DIR out=DIR)")
    baselines = cfg.baseline if OmegaConf.is_list(cfg.baseline) else [cfg.baseline]
    for path in [cfg.ckpt, *baselines]:
        if not Path(path).is_file():
            raise ConfigError(f"{path}: no such checkpoint file")
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device} but CUDA is not available here; use device=cpu")
    check_output_folder(cfg.out, cfg.overwrite)
    return cfg


def load_systems(cfg: DictConfig, device: torch.device) -> tuple[dict[str, AutoMixer], FxNormalizer]:
    """The mixers by row name, and the FxNorm features they all were trained with."""
    baselines = cfg.baseline if OmegaConf.is_list(cfg.baseline) else [cfg.baseline]
    systems, features = {}, {}
    for path in [cfg.ckpt, *baselines]:
        model = load_mixer(path, device)
        name, count = model.hparams.network, 2
        while name in systems:
            name, count = f"{model.hparams.network}_{count}", count + 1
        systems[name] = model
        features[path] = FxNormalizer.load(features_path(model, path, cfg.features))
    fingerprints = {path: normalizer.fingerprint() for path, normalizer in features.items()}
    if len(set(fingerprints.values())) > 1:
        raise ConfigError(f"the checkpoints were trained on different FxNorm features ({', '.join(fingerprints)}); "
                          "compare mixers trained on one normalisation")
    rates = {int(model.hparams.sample_rate) for model in systems.values()}
    if len(rates) > 1:
        raise ConfigError(f"the checkpoints run at different sample rates {sorted(rates)}")
    return systems, next(iter(features.values()))


def default_cache(songs: Path) -> Path:
    """Where the training DataModule caches ``<root>/<split>``: ``<root>_fxnorm/<split>``."""
    songs = songs.resolve()
    return songs.parent.with_name(songs.parent.name + "_fxnorm") / songs.name


def prepare_songs(cfg: DictConfig, normalizer: FxNormalizer) -> list[PackedSong]:
    """Check every song's files, normalise them into the cache (resumable) and index them."""
    songs = Path(cfg.songs)
    if not songs.is_dir():
        raise InputError(f"songs={songs}: no such folder")
    folders = list_songs(songs)
    if not folders:
        raise InputError(f"songs={songs}: no song folders with stems")
    for folder in folders:
        song_info(folder, (*STEMS, MIXTURE), normalizer.sr)
    cache = Path(cfg.cache) if cfg.cache else default_cache(songs)
    print(f"normalised songs: {cache}", file=sys.stderr)
    normalize_folder(normalizer, songs, cache, seed=cfg.data_seed, write=write_packed_song, layout=LAYOUT)
    return [PackedSong(cache / folder.name, normalizer.sr) for folder in folders]


def write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.asarray(audio, dtype=np.float32).T, sample_rate, subtype="FLOAT", format="WAV")


def table_markdown(rows: dict[str, dict[str, float]], setting: str) -> str:
    header = "| system | " + " | ".join(METRIC_NAMES) + " |"
    lines = [header, "|" + "---|" * (len(METRIC_NAMES) + 1)]
    for system, values in rows.items():
        lines.append(f"| {system} | " + " | ".join(f"{values[name]:.4f}" for name in METRIC_NAMES) + " |")
    return "\n".join(lines) + f"\n\nMAPE of 40-frame running means over whole songs (0.12 = 12 %); l1, l2: waveform error. {setting}\n"


def plot_features(rows: dict[str, dict[str, float]], path: Path) -> None:
    """Grouped bars: each MAPE feature (and their mean) for every system but the target."""
    names = [*MAPE_FEATURES, "mape_mean"]
    systems = [system for system in rows if system != TARGET]
    figure, axis = plt.subplots(figsize=(12, 4))
    width = 0.8 / max(len(systems), 1)
    for index, system in enumerate(systems):
        axis.bar(np.arange(len(names)) + index * width, [rows[system][name] for name in names], width, label=system)
    axis.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=45, ha="right")
    axis.set_ylabel("MAPE against the reference mix")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run(argv: Sequence[str]) -> dict:
    cfg = configure(argv)
    device = torch.device(cfg.device)
    systems, normalizer = load_systems(cfg, device)
    sample_rate = normalizer.sr
    songs = prepare_songs(cfg, normalizer)
    metric = MixFeatureError(sample_rate).to(device)
    per_song: list[dict] = []
    with atomic_path(cfg.out) as out:
        out.mkdir()
        for song in tqdm(songs, desc="evaluate", unit="song"):
            stems, mixture = song.read()
            target = torch.from_numpy(mixture).to(device)[None]
            stems_tensor = torch.from_numpy(stems).to(device)
            mixes = {TARGET: target[0], SUM: stems_tensor.unflatten(0, (-1, 2)).sum(0)}
            for name, model in systems.items():
                mixes[name] = mix_song(model, stems_tensor, sample_rate, cfg.chunk_seconds, cfg.overlap_seconds,
                                       progress=False)
            for name, mix in mixes.items():
                metric.reset()
                metric.update(mix[None], target)
                values = {key: float(value) for key, value in metric.compute().items()}
                per_song.append({"system": name, "song": song.folder.name, **values})
                write_wav(out / "mixes" / name / f"{song.folder.name}.wav", mix.cpu().numpy(), sample_rate)
        rows = {name: {key: float(np.mean([r[key] for r in per_song if r["system"] == name])) for key in METRIC_NAMES}
                for name in [TARGET, SUM, *systems]}
        setting = f"{len(songs)} songs from {cfg.songs}; chunks of {cfg.chunk_seconds} s overlapping {cfg.overlap_seconds} s."
        text = "**Objective evaluation of the mixes.**\n\n" + table_markdown(rows, setting)
        (out / "table.md").write_text(text)
        with open(out / "table.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, ["system", *METRIC_NAMES])
            writer.writeheader()
            writer.writerows({"system": name, **values} for name, values in rows.items())
        with open(out / "songs.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, ["system", "song", *METRIC_NAMES])
            writer.writeheader()
            writer.writerows(per_song)
        plot_features(rows, out / "features.png")
        OmegaConf.save(cfg, out / "config.yaml")
    print(text)
    return {"rows": rows, "out": Path(cfg.out)}


def main(argv: Sequence[str] | None = None) -> int:
    return script_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
