"""FxNormalizer: fit per-stem-type effect references on a training set and normalise songs."""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from datamodules.fxnorm import drc, eq, loudness, panning, reverb
from datamodules.fxnorm.audio import as_audio, is_silent
from datamodules.fxnorm.songs import MIXTURE, STEMS, list_songs, read_song, write_song
from framework.errors import InputError
from framework.io import atomic_path

#: Processing order; each effect's statistics are computed on stems already processed by the earlier ones.
STAGES = ("reverb", "eq", "drc", "panning", "loudness")

Song = Mapping[str, np.ndarray] | str | os.PathLike


def stem_rng(seed: int, song: str, kind: str) -> np.random.Generator:
    """The generator of one stem's reverb draws: it depends only on ``seed``, the song's name and the
    stem type (stable across runs and machines), so fitting and normalising draw the same room."""
    return np.random.default_rng([seed, zlib.crc32(song.encode()), STEMS.index(kind)])


class FxNormalizer:
    """Per-stem-type effect references and the normalisation chain built on them.

    ``eq_reference[k]`` (mean magnitude spectrum, n_fft 65,536) and ``panning_reference[k]`` (mean
    similarity, 1,025 bins) may be ``None``: that effect is then skipped for stem type ``k``.
    ``drc_reference[k]`` is (mean dB, std dB) of the onset peaks, ``loudness_target[k]`` in LUFS.
    ``fitted_on`` names the songs the references were fitted on (saved with them; it does not
    change how the normalizer acts, so it is not part of :meth:`fingerprint`).
    """

    def __init__(
        self,
        sr: int,
        eq_reference: Mapping[str, np.ndarray | None],
        drc_reference: Mapping[str, tuple[float, float]],
        panning_reference: Mapping[str, np.ndarray | None],
        loudness_target: Mapping[str, float],
        panning_reference_scale: float = 1.0,
        fitted_on: Sequence[str] = (),
    ):
        self.sr = int(sr)
        self.fitted_on = tuple(fitted_on)
        self.eq_reference = {k: None if v is None else np.asarray(v, dtype=np.float64) for k, v in eq_reference.items()}
        self.drc_reference = {k: (float(v[0]), float(v[1])) for k, v in drc_reference.items()}
        self.panning_reference = {k: None if v is None else np.asarray(v, dtype=np.float64) for k, v in panning_reference.items()}
        self.loudness_target = {k: float(v) for k, v in loudness_target.items()}
        self.panning_reference_scale = float(panning_reference_scale)
        for table in (self.eq_reference, self.drc_reference, self.panning_reference, self.loudness_target):
            missing = set(STEMS) - set(table)
            if missing:
                raise ValueError(f"FxNormalizer: no reference for stem types {sorted(missing)}")

    # ------------------------------------------------------------------ references
    @classmethod
    def musdb18_reference(cls, sr: int = 44100) -> "FxNormalizer":
        """The MUSDB18 loudness and DRC targets, usable without any dataset.

        MUSDB18's mean spectra and panning spectra are not published, and fitting them on
        synthetic data would impose a synthetic timbre and stereo image on real stems, so this
        set skips EQ and panning normalisation. Fit a normalizer on a training set to get them.
        """
        none = {k: None for k in STEMS}
        return cls(sr, none, drc.MUSDB18_DRC, none, loudness.MUSDB18_LOUDNESS)

    @classmethod
    def fit(
        cls,
        songs: Sequence[Song],
        sr: int,
        seed: int = 0,
        panning_reference_scale: float = 1.0,
        progress: bool = True,
    ) -> "FxNormalizer":
        """Fit every reference over ``songs`` (stem dicts or song folders) in :data:`STAGES` order.

        One pass per effect: each song is re-processed with the effects fitted so far and the next
        effect's feature is measured on the result, so no intermediate audio is kept in memory.
        Reverb augmentation is drawn per song and stem (:func:`stem_rng`), so every pass, and
        :func:`normalize_folder` with the same seed, sees the same augmented stems. Silent stems are
        left out of the averages.
        """
        if not songs:
            raise ValueError("FxNormalizer.fit: no songs given")
        none = {k: None for k in STEMS}
        names = [song.name if isinstance(song, Path) else Path(song).name if isinstance(song, (str, os.PathLike)) else f"song-{i}"
                 for i, song in enumerate(songs)]
        normalizer = cls(sr, none, {k: (np.inf, 0.0) for k in STEMS}, none, {k: 0.0 for k in STEMS}, panning_reference_scale,
                         fitted_on=names)
        for stage in ("eq", "drc", "panning", "loudness"):
            features: dict[str, list] = {k: [] for k in STEMS}
            previous = STAGES[: STAGES.index(stage)]
            for index, song in enumerate(tqdm(songs, desc=f"fit {stage}", unit="song", disable=not progress)):
                stems = _load(song, sr, index)
                for kind, audio in stems.items():
                    audio = normalizer.normalize_stem(kind, audio, sr, stem_rng(seed, names[index], kind), stages=previous)
                    if not is_silent(audio):
                        features[kind].append(_measure(stage, audio, sr))
            normalizer._set_reference(stage, features)
        return normalizer

    def _set_reference(self, stage: str, features: Mapping[str, list]) -> None:
        for kind, values in features.items():
            if not values:
                raise ValueError(f"FxNormalizer.fit: every '{kind}' stem is silent; cannot fit {stage}")
            if stage == "eq":
                spectra = np.concatenate([v[np.any(v > 0, axis=1)] for v in values])  # drop silent channels
                self.eq_reference[kind] = eq.smooth_spectrum(spectra.mean(axis=0), eq.SMOOTHING_WINDOW[kind])
            elif stage == "drc":
                stats = np.asarray(values)
                self.drc_reference[kind] = (float(stats[:, 0].mean()), float(stats[:, 1].mean()))
            elif stage == "panning":
                self.panning_reference[kind] = panning.smooth_similarity(np.mean(values, axis=0))
            else:
                finite = [v for v in values if np.isfinite(v)]
                self.loudness_target[kind] = float(np.mean(finite))

    # ------------------------------------------------------------------ normalisation
    def normalize_stem(
        self,
        kind: str,
        audio: np.ndarray,
        sr: int,
        rng: np.random.Generator | None = None,
        inference: bool = False,
        stages: Sequence[str] = STAGES,
    ) -> np.ndarray:
        """Apply the given stages (in :data:`STAGES` order) to one stem of type ``kind``."""
        if kind not in STEMS:
            raise ValueError(f"unknown stem type '{kind}'; expected one of {STEMS}")
        if sr != self.sr:
            raise ValueError(f"audio at {sr} Hz, but the features were fitted at {self.sr} Hz")
        audio = as_audio(audio, name=kind, stereo=True)
        if "reverb" in stages and kind in reverb.REVERB_STEMS:
            rng = rng if rng is not None else np.random.default_rng(0 if inference else None)
            audio = reverb.inference_reverb(audio, sr, rng) if inference else reverb.augment_reverb(audio, sr, rng)
        if "eq" in stages and self.eq_reference[kind] is not None:
            audio = eq.normalize_eq(audio, sr, self.eq_reference[kind], eq.SMOOTHING_WINDOW[kind])
        if "drc" in stages:
            attack_ms, release_ms = drc.ATTACK_RELEASE_MS[kind]
            mean_db, std_db = self.drc_reference[kind]
            audio = drc.normalize_drc(audio, sr, mean_db, std_db, drc.RATIO_START[kind], attack_ms, release_ms)
        if "panning" in stages and self.panning_reference[kind] is not None:
            audio = panning.normalize_panning(
                audio, sr, self.panning_reference[kind], panning.CUTOFF_HZ[kind], reference_scale=self.panning_reference_scale
            )
        if "loudness" in stages:
            audio = loudness.normalize_loudness(audio, sr, self.loudness_target[kind])
        return audio

    def normalize_song(
        self,
        stems: Mapping[str, np.ndarray],
        sr: int,
        song: str = "",
        seed: int | None = 0,
        inference: bool = False,
        reverb: bool = True,
    ) -> dict[str, np.ndarray]:
        """Normalise every stem of a song: {type: (2, n) float32}, computed in float32 throughout.

        Training (``inference=False``): vocals and other get a random reverb augmentation.
        Inference: they get the short 50/50 reverb for dry stems. The draws come from
        :func:`stem_rng` of ``seed`` and the song's name, fresh entropy if ``seed`` is None.
        ``reverb=False`` skips either. Mono stems become stereo.
        """
        stages = STAGES if reverb else STAGES[1:]
        return {
            kind: self.normalize_stem(kind, np.asarray(audio, dtype=np.float32), sr,
                                      np.random.default_rng() if seed is None else stem_rng(seed, song, kind),
                                      inference, stages)
            for kind, audio in stems.items()
        }

    def fingerprint(self) -> str:
        """A digest of the sample rate and every reference: equal when two normalizers act alike."""
        digest = hashlib.sha256(json.dumps([self.sr, self.panning_reference_scale]).encode())
        for kind in STEMS:
            references = (self.eq_reference, self.drc_reference, self.panning_reference, self.loudness_target)
            for value in (table[kind] for table in references):
                array = np.asarray(np.nan if value is None else value, dtype=np.float64)
                digest.update(repr(array.shape).encode() + array.tobytes())
        return digest.hexdigest()

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the references to one ``.npz`` file (atomically)."""
        meta = {"sr": self.sr, "panning_reference_scale": self.panning_reference_scale, "fitted_on": list(self.fitted_on)}
        arrays = {"meta": np.array(json.dumps(meta))}
        for kind in STEMS:
            arrays[f"{kind}/drc"] = np.asarray(self.drc_reference[kind])
            arrays[f"{kind}/loudness"] = np.asarray(self.loudness_target[kind])
            for field, table in (("eq", self.eq_reference), ("panning", self.panning_reference)):
                if table[kind] is not None:
                    arrays[f"{kind}/{field}"] = table[kind]
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FxNormalizer":
        """The normalizer saved at ``path``; an :class:`InputError` naming it when it is missing or not one."""
        try:
            with np.load(path) as data:
                meta = json.loads(str(data["meta"]))
                arrays = {key: data[key] for key in data.files}
        except (OSError, ValueError, KeyError) as error:
            raise InputError(f"{path}: not an FxNormalizer features file ({error})") from error
        try:
            return cls(
                meta["sr"],
                {k: arrays.get(f"{k}/eq") for k in STEMS},
                {k: tuple(arrays[f"{k}/drc"]) for k in STEMS},
                {k: arrays.get(f"{k}/panning") for k in STEMS},
                {k: float(arrays[f"{k}/loudness"]) for k in STEMS},
                meta["panning_reference_scale"],
                meta.get("fitted_on", ()),
            )
        except KeyError as error:
            raise InputError(f"{path}: features file lacks {error}") from error


def _load(song: Song, sr: int, index: int) -> Mapping[str, np.ndarray]:
    if isinstance(song, Mapping):
        unknown = set(song) - set(STEMS)
        if unknown:
            raise ValueError(f"song {index}: unknown stem types {sorted(unknown)}")
        return song
    stems, song_sr = read_song(song)
    if song_sr != sr:
        raise InputError(f"{song}: sample rate {song_sr} Hz, expected {sr} Hz")
    return stems


def _measure(stage: str, audio: np.ndarray, sr: int):
    if stage == "eq":
        return eq.mean_spectrum(audio, sr)
    if stage == "drc":
        return drc.onset_peak_stats(audio, sr)
    if stage == "panning":
        return panning.mean_similarity(audio)
    return loudness.integrated_loudness(audio, sr)


CACHE_RECORD = "fxnorm.json"

#: Writes one normalised song (stem types and ``mixture`` -> (2, n) arrays) as the folder it is given.
SongWriter = Callable[[Path, Mapping[str, np.ndarray], int], None]


def _claim_cache(out_root: Path, settings: Mapping[str, object]) -> None:
    """Record in ``out_root`` which normalisation fills it; refuse a folder filled by another one."""
    record = out_root / CACHE_RECORD
    if record.is_file():
        found = json.loads(record.read_text())
        if found != dict(settings):
            changed = sorted(k for k in set(found) | set(settings) if found.get(k) != settings.get(k))
            details = "; ".join(f"{k} changed: {found.get(k)!r} there, {settings.get(k)!r} now" for k in changed)
            raise InputError(
                f"{out_root} holds stems normalised with different settings ({details}); "
                "delete it, or choose another cache folder"
            )
        return
    if out_root.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in out_root.iterdir()):
        raise InputError(
            f"{out_root} holds songs but no {CACHE_RECORD}, so how they were normalised is unknown; "
            "delete it, or choose another cache folder"
        )
    out_root.mkdir(parents=True, exist_ok=True)
    with atomic_path(record) as tmp:
        Path(tmp).write_text(json.dumps(dict(settings), indent=1))


def normalize_folder(
    normalizer: FxNormalizer,
    songs_root: str | os.PathLike,
    out_root: str | os.PathLike,
    inference: bool = False,
    seed: int = 0,
    progress: bool = True,
    write: SongWriter = write_song,
    layout: str = "wav",
) -> int:
    """Normalise every song under ``songs_root`` into ``out_root/<song>/``; returns how many were written.

    ``write`` stores a song (default: one float WAV per stem; ``layout`` names the format in the
    record). Resumable: songs whose output folder exists are skipped, and each folder is written
    atomically. A ``mixture.wav`` is passed on unchanged. Reverb is drawn per song and stem
    (:func:`stem_rng`), so a re-run produces the same files. ``out_root/fxnorm.json`` records the
    normalizer's fingerprint, the settings and the source folder; resuming with different ones is
    an error naming both rather than a cache that silently mixes two normalisations or datasets.
    """
    out_root = Path(out_root)
    settings = {"features": normalizer.fingerprint(), "inference": bool(inference), "seed": int(seed),
                "source": str(Path(songs_root).resolve()), "layout": layout}
    _claim_cache(out_root, settings)
    written = 0
    for folder in tqdm(list_songs(songs_root), desc=f"normalize {Path(songs_root).name}", unit="song", disable=not progress):
        target = out_root / folder.name
        if target.is_dir():
            continue
        names = [s for s in (*STEMS, MIXTURE) if (folder / f"{s}.wav").is_file()]
        stems, sr = read_song(folder, names)
        mixture = stems.pop(MIXTURE, None)
        output = normalizer.normalize_song(stems, sr, song=folder.name, seed=seed, inference=inference)
        if mixture is not None:
            output[MIXTURE] = mixture
        write(target, output, sr)
        written += 1
    return written
