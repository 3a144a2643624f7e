"""The mixing listening test (mixing paper): one multi-stimulus page per song and attribute.

Input is the layout that ``evaluate_mix.py ... out=DIR`` writes, ``DIR/mixes/<system>/<song>.wav``
(``target`` is the reference mixture, ``sum`` the plain sum of the normalised stems, the other
folders mixers), and the songs' stem folders ``STEMS/<song>/{vocals,bass,drums,other}.wav``.

Every song contributes one excerpt of ``excerpt_seconds``, cut at the same place from every mix
and stem: at ``excerpt_start`` seconds, or else where the reference mixture is loudest (the
window of highest energy on a half-second grid). Its stimuli are each system's mix and, with
``anchor`` set, a low anchor: the plain sum of the unprocessed stems. Every stimulus of the test is
matched to one loudness; the stems of a song share one gain that gives their sum that loudness
(so they keep their balance), and play as the reference. Excerpts fade in and out over
``fade_seconds`` so that looping playback does not click. Wet stems (MUSDB18's, the demo's) sum to
the reference mixture itself; the anchor would then be a second hidden reference, so the build
stops and asks for dry stems or ``anchor=null``.

A song is skipped, with its reason in the manifest and the summary, when a mix or stem is missing,
unreadable, holds NaN, is too short for the excerpt or is silent in it. Audio at another sample
rate is resampled (soxr's high quality, as ``mix.py`` resamples stems).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import soundfile as sf
import soxr
from omegaconf import DictConfig, OmegaConf

from datamodules.fxnorm.audio import peak
from datamodules.fxnorm.songs import STEMS
from framework.config import ConfigError
from listening.build.audio import fade_edges, match_loudness, measure
from listening.build.kit import Clip, clip_entry, write_kit

#: The shortest excerpt (seconds): a song whose reference mixture is shorter is skipped.
MIN_EXCERPT_SECONDS = 1.0
#: Grid (seconds) on which the loudest excerpt is searched.
EXCERPT_HOP_SECONDS = 0.5
#: A file may end this much before the excerpt does (resampling rounding); the rest is silence.
LENGTH_TOLERANCE_SECONDS = 0.1
#: Two mixes whose difference, after the best gain, keeps less than this share of the energy (-30 dB) are one mix.
SAME_MIX_RESIDUAL = 1e-3


class SkipSong(Exception):
    """A song that cannot be part of the test; the message says why."""


@dataclass
class SongPlan:
    """Where one song's clips come from: each clip key names the files summed into it."""

    name: str
    start: float  # seconds
    seconds: float
    sources: dict[str, tuple[Path, ...]] = field(default_factory=dict)
    loudness: dict[str, float] = field(default_factory=dict)
    peaks: dict[str, float] = field(default_factory=dict)

    @property
    def mixes(self) -> list[str]:
        return [key for key in self.sources if not key.startswith("stem:")]

    @property
    def stems(self) -> list[str]:
        return [key for key in self.sources if key.startswith("stem:")]


def mixes_root(path: str | Path) -> Path:
    """The folder of ``<system>/<song>.wav``: ``path/mixes`` when present, else ``path`` itself."""
    path = Path(path)
    return path / "mixes" if (path / "mixes").is_dir() else path


def list_systems(root: Path, chosen: Sequence[str] | None, reference: str) -> list[str]:
    """The systems to rate, the reference first; each a sub-folder of ``root`` holding WAVs."""
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.wav")))
    if reference not in found:
        raise ConfigError(f"mixes={root}: no {reference}/ folder of reference mixtures; systems found: "
                          f"{', '.join(found) or 'none'}")
    systems = list(chosen) if chosen else found
    unknown = [name for name in systems if name not in found]
    if unknown:
        raise ConfigError(f"systems: {unknown} have no folder in {root}; found: {', '.join(found)}")
    return [reference] + [name for name in systems if name != reference]


def read_excerpt(paths: Sequence[Path], start: float, seconds: float, sr: int) -> np.ndarray:
    """(2, samples) float32: the sum of the files' excerpts, mono as stereo, resampled to ``sr``."""
    length = int(round(seconds * sr))
    out = np.zeros((2, length), dtype=np.float32)
    for path in paths:
        try:
            info = sf.info(str(path))
            first = int(round(start * info.samplerate))
            stop = first + int(np.ceil(seconds * info.samplerate))
            if info.frames < stop - LENGTH_TOLERANCE_SECONDS * info.samplerate:
                raise SkipSong(f"{path} lasts {info.frames / info.samplerate:.2f} s, the excerpt ends at "
                               f"{start + seconds:.2f} s")
            audio, rate = sf.read(str(path), start=first, stop=stop, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as err:
            raise SkipSong(f"{path} cannot be read: {err}") from err
        audio = audio.T
        if audio.shape[0] == 1:
            audio = np.repeat(audio, 2, axis=0)
        elif audio.shape[0] != 2:
            raise SkipSong(f"{path} has {audio.shape[0]} channels, expected mono or stereo")
        if not np.all(np.isfinite(audio)):
            raise SkipSong(f"{path} holds NaN or infinite samples")
        if rate != sr:
            audio = soxr.resample(audio.T, rate, sr, quality="HQ").T
        audio = audio[:, :length]
        out[:, :audio.shape[1]] += audio
    return out


def loudest_start(path: Path, seconds: float) -> float:
    """Start (seconds) of the ``seconds``-long window of highest energy in a file, on a half-second grid."""
    audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    energy = np.concatenate([[0.0], np.cumsum(np.square(audio, dtype=np.float64).sum(axis=1))])
    if not np.isfinite(energy[-1]):
        raise SkipSong(f"{path} holds NaN or infinite samples")
    window, hop = int(round(seconds * sr)), int(round(EXCERPT_HOP_SECONDS * sr))
    starts = np.arange(0, max(len(audio) - window, 0) + 1, hop)
    return float(starts[np.argmax(energy[np.minimum(starts + window, len(audio))] - energy[starts])] / sr)


def plan_song(name: str, systems: Sequence[str], root: Path, stems_root: Path, cfg: DictConfig) -> SongPlan:
    """The song's excerpt and sources, every file's excerpt read once to measure it; raises SkipSong, or
    ConfigError when the anchor would repeat the reference mixture."""
    mixes = {system: root / system / f"{name}.wav" for system in systems}
    stems = {stem: stems_root / name / f"{stem}.wav" for stem in STEMS}
    missing = [str(path) for path in [*mixes.values(), *stems.values()] if not path.is_file()]
    if missing:
        raise SkipSong(f"missing {', '.join(missing)}")
    reference = mixes[cfg.reference]
    try:
        duration = sf.info(str(reference)).duration
    except (sf.LibsndfileError, RuntimeError) as err:
        raise SkipSong(f"{reference} cannot be read: {err}") from err
    if duration < MIN_EXCERPT_SECONDS:
        raise SkipSong(f"{reference} lasts {duration:.2f} s, less than the shortest excerpt ({MIN_EXCERPT_SECONDS:g} s)")
    seconds = min(cfg.excerpt_seconds, duration)
    start = loudest_start(reference, seconds) if cfg.excerpt_start is None else float(cfg.excerpt_start)
    plan = SongPlan(name, start, seconds, {system: (path,) for system, path in mixes.items()})
    if cfg.anchor:
        plan.sources[cfg.anchor] = tuple(stems.values())
    plan.sources.update({f"stem:{stem}": (path,) for stem, path in stems.items()})
    sr, window = cfg.sample_rate, f"from {start:.1f} s to {start + seconds:.1f} s"
    stems_audio = [clip_audio(plan, key, sr, cfg.fade_seconds) for key in plan.stems]
    stem_sum = sum(stems_audio)
    plan.loudness["stems"] = measure(stem_sum, sr)[0]
    plan.peaks["stems"] = max(peak(audio) for audio in stems_audio)
    if not np.isfinite(plan.loudness["stems"]):
        raise SkipSong(f"the stems are silent {window}")
    for key in plan.mixes:
        # the anchor is the stems' plain sum: the clip just measured
        audio = stem_sum if key == cfg.anchor else clip_audio(plan, key, sr, cfg.fade_seconds)
        plan.loudness[key], plan.peaks[key] = measure(audio, sr)
        if not np.isfinite(plan.loudness[key]):
            raise SkipSong(f"the {key} mix is silent {window}")
        if key == cfg.reference and cfg.anchor and same_up_to_gain(stem_sum, audio):
            raise ConfigError(
                f"anchor={cfg.anchor}: the stems of song {name} sum to its {cfg.reference} mixture (wet stems, as in "
                "MUSDB18), so the anchor would be a copy of the hidden reference; give the songs' dry stems, or "
                "anchor=null (the `sum` mix of evaluate_mix.py is then the low anchor)")
    return plan


def same_up_to_gain(audio: np.ndarray, reference: np.ndarray) -> bool:
    """Whether ``audio`` times its best gain leaves less than ``SAME_MIX_RESIDUAL`` of ``reference``'s energy."""
    audio, reference = audio.astype(np.float64).ravel(), reference.astype(np.float64).ravel()
    gain = np.dot(audio, reference) / np.dot(audio, audio)
    return float(np.sum(np.square(reference - gain * audio))) < SAME_MIX_RESIDUAL * float(np.dot(reference, reference))


def clip_audio(plan: SongPlan, key: str, sr: int, fade_seconds: float) -> np.ndarray:
    return fade_edges(read_excerpt(plan.sources[key], plan.start, plan.seconds, sr), sr, fade_seconds)


def check_config(cfg: DictConfig) -> None:
    for key in ("mixes", "stems"):
        if cfg[key] is None or not Path(cfg[key]).is_dir():
            raise ConfigError(f"{key}={cfg[key]}: not a folder ({'evaluate_mix.py output' if key == 'mixes' else 'song stem folders'})")
    if cfg.excerpt_seconds < MIN_EXCERPT_SECONDS or (cfg.excerpt_start is not None and cfg.excerpt_start < 0):
        raise ConfigError(f"excerpt_seconds={cfg.excerpt_seconds} must be at least {MIN_EXCERPT_SECONDS:g} and excerpt_start="
                          f"{cfg.excerpt_start} be null or >= 0")
    if not cfg.attributes or any(set(a) != {"name", "question"} for a in cfg.attributes):
        raise ConfigError("attributes must be a non-empty list of {name: ..., question: ...}")


def build_mixing_test(cfg: DictConfig) -> dict:
    """Cut, match and write the mixing test described by ``cfg``; return a summary."""
    check_config(cfg)
    root = mixes_root(cfg.mixes)
    systems = list_systems(root, cfg.systems, cfg.reference)
    if cfg.anchor in systems:
        raise ConfigError(f"anchor={cfg.anchor!r} is also the name of a system in {root}; choose another name")
    songs = list(cfg.songs) if cfg.songs else sorted(p.stem for p in (root / cfg.reference).glob("*.wav"))
    plans, skipped = [], {}
    for name in songs:
        try:
            plans.append(plan_song(name, systems, root, Path(cfg.stems), cfg))
        except SkipSong as reason:
            skipped[name] = str(reason)
    if not plans:
        raise ConfigError(f"no song of mixes={root} could be used ({len(skipped)} skipped; see above)")

    keys = [(plan, key) for plan in plans for key in [*plan.mixes, "stems"]]
    match = match_loudness([p.loudness[k] for p, k in keys], [p.peaks[k] for p, k in keys],
                           cfg.loudness_lufs, cfg.peak_ceiling_db)
    gains = {(p.name, k): gain for (p, k), gain in zip(keys, match.gains)}
    rng = np.random.default_rng(cfg.seed)
    definition_songs, clip_plan = [], []
    for number, plan in enumerate(plans, 1):
        mixes = [plan.mixes[i] for i in rng.permutation(len(plan.mixes))]  # ids in a shuffled order
        stimuli = [clip_entry(f"song{number}-m{k}", system=key) for k, key in enumerate(mixes, 1)]
        stems = [clip_entry(f"song{number}-{key[5:]}", name=key[5:]) for key in plan.stems]
        definition_songs.append({"name": plan.name, "seconds": plan.seconds, "stimuli": stimuli, "stems": stems})
        for entry, key in zip([*stimuli, *stems], [*mixes, *plan.stems]):
            clip_plan.append((entry["id"], plan, key, gains[plan.name, "stems" if key.startswith("stem:") else key]))

    def clips() -> Iterator[Clip]:
        for clip_id, plan, key, gain in clip_plan:
            yield Clip(clip_id, clip_audio(plan, key, cfg.sample_rate, cfg.fade_seconds) * np.float32(gain))

    definition = {
        "kind": "mixing", "title": cfg.title, "instructions": list(cfg.instructions), "post_url": cfg.post_url,
        "attributes": OmegaConf.to_container(cfg.attributes), "scale_labels": list(cfg.scale_labels),
        "reference_system": cfg.reference, "songs": definition_songs,
    }
    provenance = {
        "mixes": str(root), "stems": str(cfg.stems), "systems": systems, "anchor": cfg.anchor, "seed": cfg.seed,
        "excerpts": {plan.name: {"start_seconds": plan.start, "seconds": plan.seconds} for plan in plans},
        "skipped_songs": skipped,
        "loudness": {"target_lufs": match.target_lufs, "matched_lufs": match.matched_lufs,
                     "measured_lufs": {f"{p.name}/{k}": round(float(v), 2) for (p, k), v in zip(keys, match.measured_lufs)}},
    }
    test_id = write_kit(cfg.out, definition, clips(), cfg.sample_rate, provenance, total=len(clip_plan))
    return {"kind": "mixing", "out": str(cfg.out), "id": test_id, "songs": len(plans),
            "pages": len(plans) * len(cfg.attributes), "systems": [*systems, *([cfg.anchor] if cfg.anchor else [])],
            "matched_lufs": match.matched_lufs, "skipped_songs": skipped}
