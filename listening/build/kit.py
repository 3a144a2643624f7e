"""The listening-test folder: ``index.html`` with its script and style, the test description and the audio.

    DIR/index.html, app.js, style.css   the page (copied from listening/web)
    DIR/test.js                         window.LISTENING_TEST: pages, stimuli, texts
    DIR/audio/<clip id>.js              window.LISTENING_AUDIO[<clip id>]: one FLAC file in base64
    DIR/manifest.json                   the description again, with how each stimulus was made

Audio travels in script files because a page opened from ``file://`` may load scripts from its
folder but may not ``fetch`` files; base64 costs a third more space and lets the same folder work
from a disk, a USB stick or any static web server.
"""
from __future__ import annotations

import base64
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

from framework.io import atomic_path
from listening.build.audio import flac_bytes

WEB = Path(__file__).resolve().parent.parent / "web"
PAGE_FILES = ("index.html", "app.js", "style.css")
FORMAT_VERSION = 1


@dataclass
class Clip:
    """One sound the page can play: the id the page knows it by and its (channels, samples) audio."""

    id: str
    audio: np.ndarray


def clip_entry(clip_id: str, **fields) -> dict:
    """A clip as the test description lists it: its id, the script holding its audio, other fields."""
    return {"id": clip_id, "audio": f"audio/{clip_id}.js", **fields}


def write_kit(out: str | Path, definition: dict, clips: Iterable[Clip], sample_rate: int,
              provenance: dict, total: int | None = None) -> str:
    """Write the folder ``out`` atomically; return the test id.

    ``definition`` is what the page reads (see ``listening/web/app.js``); it gains ``id``,
    ``format`` and ``sample_rate`` here. The test id is a digest of the description and the audio,
    so two different kits never share a participant's saved progress in one browser.
    ``provenance`` (sources, measured loudness, skips) goes to ``manifest.json`` only. ``clips``
    may be a generator (``total`` clips long), so only one clip's audio need be in memory at a time.
    """
    digest = hashlib.sha256(json.dumps(definition, sort_keys=True).encode())
    with atomic_path(out) as folder:
        (folder / "audio").mkdir(parents=True)
        for name in PAGE_FILES:
            shutil.copyfile(WEB / name, folder / name)
        for clip in tqdm(clips, total=total, desc="encoding stimuli", unit="clip"):
            data = flac_bytes(clip.audio, sample_rate)
            digest.update(clip.id.encode() + data)
            text = base64.b64encode(data).decode("ascii")
            (folder / "audio" / f"{clip.id}.js").write_text(
                f'(window.LISTENING_AUDIO = window.LISTENING_AUDIO || {{}})["{clip.id}"] = "{text}";\n')
        test = {"format": FORMAT_VERSION, "id": digest.hexdigest()[:12], "sample_rate": int(sample_rate), **definition}
        (folder / "test.js").write_text(f"window.LISTENING_TEST = {json.dumps(test, indent=1)};\n")
        (folder / "manifest.json").write_text(json.dumps({"test": test, **provenance}, indent=2) + "\n")
    return test["id"]
