"""Command line: fit FxNorm references on a folder of songs, or normalise a folder of songs.

    python -m datamodules.fxnorm fit --songs DIR --out features.npz [--sr 44100] [--seed 0]
    python -m datamodules.fxnorm normalize --features F --songs DIR --out CACHE [--inference] [--seed 0]

``--features musdb18`` uses the built-in MUSDB18 loudness and DRC targets (no EQ or panning).
Outputs are written atomically; ``normalize`` skips songs already in CACHE, so it resumes. A
missing folder, an unusable file or a cache of another normalisation is reported in one line
(exit code 2).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from datamodules.fxnorm.normalizer import FxNormalizer, normalize_folder
from datamodules.fxnorm.songs import list_songs
from framework.errors import InputError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datamodules.fxnorm", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("fit", help="fit per-stem-type references on training songs")
    fit.add_argument("--songs", required=True, type=Path, help="folder of song folders")
    fit.add_argument("--out", required=True, type=Path, help="features file to write (.npz)")
    fit.add_argument("--sr", type=int, default=44100)
    fit.add_argument("--seed", type=int, default=0, help="seed of the reverb augmentation")
    fit.add_argument("--panning-reference-scale", type=float, default=1.0, help="0.9 reproduces the authors")
    normalize = commands.add_parser("normalize", help="write normalised stems for every song")
    normalize.add_argument("--features", required=True, help="features file, or 'musdb18'")
    normalize.add_argument("--songs", required=True, type=Path, help="folder of song folders")
    normalize.add_argument("--out", required=True, type=Path, help="output folder (one subfolder per song)")
    normalize.add_argument("--inference", action="store_true", help="dry stems: short reverb instead of augmentation")
    normalize.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.command == "fit":
            normalizer = FxNormalizer.fit(list_songs(args.songs), args.sr, seed=args.seed,
                                          panning_reference_scale=args.panning_reference_scale)
            normalizer.save(args.out)
            print(f"wrote {args.out}")
        else:
            normalizer = FxNormalizer.musdb18_reference() if args.features == "musdb18" else FxNormalizer.load(args.features)
            written = normalize_folder(normalizer, args.songs, args.out, inference=args.inference, seed=args.seed)
            print(f"wrote {written} songs to {args.out}")
    except (InputError, FileNotFoundError) as error:
        print(f"{parser.prog}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
