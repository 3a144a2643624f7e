"""Mix a song's dry stems with a trained automatic mixer.

    python mix.py ckpt=CKPT stems=DIR out=mix.wav [features=F] [chunk_seconds=10] \
        [overlap_seconds=1] [device=cpu] [pad=false]

``DIR`` holds ``vocals.wav bass.wav drums.wav other.wav`` (a missing stem is silence; mono is
duplicated to stereo). Stems of different lengths are an error unless ``pad=true``, which zero-pads
the shorter ones to the longest; an unreadable, empty or non-finite stem is an error naming the
file, printed as one line. Stems at another sample rate are resampled to the model's with librosa's
``soxr_hq``; a missing or unreadable checkpoint, or a pretraining one, is a one-line error too.
The stems are effect-normalised with the training set's FxNorm features (``features=`` or the path
the checkpoint recorded), including the inference reverb on vocals and other, then mixed chunk by
chunk (``mix_song``) and written as a stereo float WAV at the model's sample rate with exactly the
stems' length.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import librosa
import numpy as np
import soundfile as sf
import torch
from omegaconf import OmegaConf

from datamodules.fxnorm.songs import STEMS, read_stem, stem_info
from framework.cli import load_checkpoint
from framework.errors import InputError
from framework.io import atomic_path
from lightning_modules.mixer import AutoMixer, mix_song

DEFAULTS = {"ckpt": None, "stems": None, "out": None, "features": None, "chunk_seconds": 10.0,
            "overlap_seconds": 1.0, "device": "cpu", "progress": True, "pad": False}
REQUIRED = ("ckpt", "stems", "out")


def parse_args(argv: Sequence[str]) -> dict:
    """``key=value`` arguments over ``DEFAULTS``; unknown or missing keys raise ``ValueError``."""
    malformed = [arg for arg in argv if "=" not in arg]
    if malformed:
        raise ValueError(f"arguments must be key=value, got {malformed}")
    given = OmegaConf.to_container(OmegaConf.from_dotlist(list(argv)))
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(DEFAULTS)}")
    args = {**DEFAULTS, **given}
    missing = [key for key in REQUIRED if args[key] is None]
    if missing:
        raise ValueError(f"missing required key(s): {', '.join(missing)} (usage: python mix.py "
                         "ckpt=CKPT stems=DIR out=mix.wav)")
    return args


def read_stems(folder: str | Path, sample_rate: int, pad: bool = False) -> dict[str, np.ndarray]:
    """Stereo float32 ``(2, n)`` arrays for every stem name; missing stems are zeros of the common
    length. An :class:`InputError` names the folder when it has none of the stems, and the file
    that is unreadable, empty, non-finite, or (unless ``pad``) of another length than the others."""
    folder = Path(folder)
    loaded = {}
    for name in STEMS:
        path = folder / f"{name}.wav"
        if not path.exists():
            continue
        rate, _ = stem_info(path)
        audio = read_stem(path)
        if rate != sample_rate:
            audio = librosa.resample(audio, orig_sr=rate, target_sr=sample_rate, res_type="soxr_hq")
        loaded[name] = audio.astype(np.float32)
    if not loaded:
        raise InputError(f"{folder}: none of {', '.join(f'{s}.wav' for s in STEMS)} found")
    lengths = {name: audio.shape[-1] for name, audio in loaded.items()}
    first = next(iter(lengths))
    uneven = [name for name in lengths if lengths[name] != lengths[first]]
    if uneven and not pad:
        raise InputError(f"{folder / (uneven[0] + '.wav')}: {lengths[uneven[0]]} samples at {sample_rate} Hz, but "
                         f"{first}.wav has {lengths[first]}; pass pad=true to zero-pad the shorter stems")
    length = max(audio.shape[-1] for audio in loaded.values())
    stems = {}
    for name in STEMS:
        audio = loaded.get(name, np.zeros((2, length), dtype=np.float32))
        stems[name] = np.pad(audio, ((0, 0), (0, length - audio.shape[-1])))
    missing = [name for name in STEMS if name not in loaded]
    if missing:
        print(f"{folder}: no {', '.join(missing)} stem(s); mixing them as silence", file=sys.stderr)
    return stems


def load_mixer(path: str | Path, device: torch.device | str = "cpu") -> AutoMixer:
    """The mixer of checkpoint ``path`` on ``device``, in eval mode; an :class:`InputError` naming the
    file when it is missing, cannot be read as an AutoMixer checkpoint, or holds a pretraining run."""
    model = load_checkpoint(AutoMixer, path, device)
    if model.hparams.pretrain:
        raise InputError(f"{path} is a front-end pretraining checkpoint, not a mixer")
    return model.eval()


def features_path(model: AutoMixer, ckpt: str, override: str | None) -> str:
    """The FxNorm feature file: the argument, else the module's ``features`` hyperparameter, else the
    datamodule's ``features`` in the checkpoint's resolved config."""
    path = override or model.hparams.get("features")
    if not path:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
        path = (checkpoint.get("config") or {}).get("datamodule", {}).get("features")
    if not path:
        raise InputError(f"{ckpt} records no FxNorm features path; pass features=PATH")
    if not Path(path).exists():
        raise InputError(f"FxNorm features file {path} (recorded in {ckpt}) not found; pass features=PATH")
    return str(path)


def normalise(stems: dict[str, np.ndarray], features: str, sample_rate: int) -> np.ndarray:
    """Effect-normalise the stems for inference and stack them as ``(8, n)`` in ``STEMS`` order."""
    from datamodules.fxnorm import FxNormalizer

    normalised = FxNormalizer.load(features).normalize_song(stems, sample_rate, inference=True)
    return np.concatenate([np.asarray(normalised[name], dtype=np.float32) for name in STEMS])


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as err:
        print(f"mix.py: {err}", file=sys.stderr)
        return 2
    try:
        model = load_mixer(args["ckpt"], torch.device(args["device"]))
        sample_rate = int(model.hparams.sample_rate)
        stems = read_stems(args["stems"], sample_rate, args["pad"])
        normalised = normalise(stems, features_path(model, args["ckpt"], args["features"]), sample_rate)
    except InputError as err:
        print(f"mix.py: {err}", file=sys.stderr)
        return 2
    mix = mix_song(model, normalised, sample_rate, args["chunk_seconds"], args["overlap_seconds"],
                   progress=args["progress"])
    with atomic_path(args["out"]) as tmp:
        sf.write(tmp, mix.T, sample_rate, subtype="FLOAT", format="WAV")
    print(f"wrote {args['out']} ({mix.shape[-1] / sample_rate:.1f} s at {sample_rate} Hz)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
