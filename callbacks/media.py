"""Media for generated phrases: a pianoroll image grid, MIDI files and audio previews.

Shared by every stage that shows phrases to people (validation-time generation, generation and
evaluation scripts). W&B has no MIDI media type, so a phrase is shown three ways: the pianoroll
image, a rendered audio preview, and the ``.mid`` file itself.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import soundfile as sf  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from pytorch_lightning.loggers import WandbLogger  # noqa: E402

from datamodules.pianoroll import N_COLUMNS, N_DRUM_CLASSES, STEPS_PER_BAR, phrases_to_midi  # noqa: E402
from datamodules.pianoroll.synth import DEFAULT_SR, render_phrases  # noqa: E402
from framework.io import atomic_path  # noqa: E402

# Cell colours: 0 empty, 1 drum hit, 2 bass note.
_CELL_COLOURS = ListedColormap(["white", "tab:red", "tab:blue"])


def _as_numpy_phrases(phrases) -> np.ndarray:
    roll = np.asarray(phrases.cpu() if hasattr(phrases, "cpu") else phrases).astype(bool)
    if roll.ndim == 2:
        roll = roll[None]
    if roll.ndim != 3 or roll.shape[2] != N_COLUMNS:
        raise ValueError(f"expected phrases of shape (N, T, 57), got {roll.shape}")
    return roll


def pianoroll_grid(phrases, path: str | Path, ncols: int = 4, title: str | None = None) -> Path:
    """Draw phrases ``(N, T, 57)`` as a grid of pianorolls and save a PNG at ``path``.

    Time runs left to right with a line at every bar; drum classes (red) sit below the bass
    pitches (blue), split by a horizontal line. Returns ``path``.
    """
    roll = _as_numpy_phrases(phrases)
    n, steps, _ = roll.shape
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        cells = roll[i].T.astype(np.int8)
        cells[N_DRUM_CLASSES:] *= 2
        ax.imshow(cells, cmap=_CELL_COLOURS, vmin=0, vmax=2, origin="lower", aspect="auto", interpolation="nearest")
        for bar in range(STEPS_PER_BAR, steps, STEPS_PER_BAR):
            ax.axvline(bar - 0.5, color="0.75", linewidth=0.5)
        ax.axhline(N_DRUM_CLASSES - 0.5, color="0.3", linewidth=0.8)
        ax.set_yticks([N_DRUM_CLASSES / 2 - 0.5, (N_DRUM_CLASSES + cells.shape[0]) / 2 - 0.5], ["drums", "bass"])
        ax.set_xticks(range(0, steps, STEPS_PER_BAR * 2))
        ax.set_title(f"#{i}", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(path)


def write_previews(
    phrases, folder: str | Path, bpm: float = 120.0, sample_rate: int = DEFAULT_SR, seed: int = 0, prefix: str = "sample"
) -> list[tuple[Path, Path]]:
    """Write each phrase as ``<prefix>_NN.mid`` and a rendered ``<prefix>_NN.wav`` in ``folder``.

    Returns the (MIDI, WAV) path pairs in phrase order. ``seed`` drives the MIDI velocity jitter
    (phrase ``i`` uses ``seed + i``).
    """
    roll = _as_numpy_phrases(phrases)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, phrase in enumerate(roll):
        midi_path, wav_path = folder / f"{prefix}_{i:02d}.mid", folder / f"{prefix}_{i:02d}.wav"
        with atomic_path(midi_path) as tmp:
            phrases_to_midi(phrase[None], tmp, tempo=bpm, seed=seed + i)
        with atomic_path(wav_path) as tmp:
            sf.write(tmp, render_phrases(phrase[None], bpm, sample_rate), sample_rate, format="WAV")
        written.append((midi_path, wav_path))
    return written


def wandb_loggers(trainer: pl.Trainer) -> list[WandbLogger]:
    """The trainer's W&B loggers (the only ones with image and audio types)."""
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def log_media(
    trainer: pl.Trainer,
    key: str,
    image: Path | None = None,
    audio: Sequence[Path] = (),
    files: Sequence[Path] = (),
    base_path: Path | None = None,
) -> None:
    """Send an image, audio files and other files (e.g. MIDI) to every W&B logger of ``trainer``.

    Images go to ``<key>/pianoroll``, audio to ``<key>/audio`` (captioned by file name), both at
    the trainer's global step; other files are saved into the run (offline runs link them under
    the run's ``files/`` folder, relative to ``base_path``). Call on rank zero only.
    """
    for logger in wandb_loggers(trainer):
        if image is not None:
            logger.log_image(key=f"{key}/pianoroll", images=[str(image)], step=trainer.global_step)
        if audio:
            logger.log_audio(
                key=f"{key}/audio", audios=[str(p) for p in audio], step=trainer.global_step,
                caption=[Path(p).name for p in audio],
            )
        for path in files:
            logger.experiment.save(str(path), base_path=str(base_path or Path(path).parent), policy="now")
