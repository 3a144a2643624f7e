"""listening_test.py build: loop and mixing kits from generated fixtures, loudness matching, bad inputs."""
from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf
import soxr
import torch

import listening_test
from datamodules.pianoroll import load_phrases, pack_phrases, write_phrase_cache
from datamodules.fxnorm.songs import STEMS
from datamodules.pianoroll.cache import write_report, write_shard
from lightning_modules.cnn_vae import CNNVAE
from listening.build.audio import match_loudness
from lightning_modules.prior import LSTMPrior
from listening.build.loop_sources import GeneratorCheckpoint, PhraseCacheFolder, resolve_source
from tests.helpers import save_checkpoint
from tests.test_prior import save_tiny_vqvae, tiny_prior

SR = 44100


def run_listening_test(*args) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = listening_test.main([*map(str, args)])
    return code, stdout.getvalue(), stderr.getvalue()


def kit_test(folder) -> dict:
    text = (folder / "test.js").read_text()
    return json.loads(text[text.index("=") + 1:].rstrip().rstrip(";"))


def kit_audio(folder, clip_id) -> tuple[np.ndarray, int]:
    """A clip's audio as the page gets it: the base64 FLAC inside audio/<id>.js, decoded."""
    text = (folder / "audio" / f"{clip_id}.js").read_text()
    data = base64.b64decode(re.search(r'= "([A-Za-z0-9+/=]+)";', text).group(1))
    audio, sr = sf.read(io.BytesIO(data), dtype="float64")
    return audio, sr


def groove(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` phrases, one bar of kick, snare, hats and two bass notes repeated eight times."""
    phrases = np.zeros((n, 128, 57), dtype=bool)
    for phrase in phrases:
        bar = np.zeros((16, 57), dtype=bool)
        bar[::4, 0] = bar[4::8, 1] = bar[::2, 2] = True
        bar[:8, 9 + rng.integers(48)] = bar[8:14, 9 + rng.integers(48)] = True
        phrase[:] = np.tile(bar, (8, 1))
    return phrases


def test_match_loudness_equals_pyloudnorm_and_lowers_everything_under_the_peak_ceiling():
    rng = np.random.default_rng(0)
    t = np.arange(3 * SR) / SR
    quiet = 0.01 * np.sin(2 * np.pi * 220 * t)
    loud = 0.5 * rng.standard_normal(len(t)) * np.sin(2 * np.pi * 0.5 * t) ** 2
    spiky = 0.001 * np.sin(2 * np.pi * 440 * t)
    spiky[SR] = 0.5  # a click: at the target loudness its peak would clip
    meter = pyloudnorm.Meter(SR)
    signals = [quiet, loud]
    loudness = [meter.integrated_loudness(s) for s in signals]
    match = match_loudness(loudness, [np.abs(s).max() for s in signals], -23.0, -1.0)
    assert match.matched_lufs == -23.0
    assert [meter.integrated_loudness(s * g) for s, g in zip(signals, match.gains)] == pytest.approx([-23.0] * 2, abs=1e-6)

    signals.append(spiky)
    loudness.append(meter.integrated_loudness(spiky))
    match = match_loudness(loudness, [np.abs(s).max() for s in signals], -23.0, -1.0)
    assert match.matched_lufs < -23.0
    matched = [meter.integrated_loudness(s * g) for s, g in zip(signals, match.gains)]
    assert matched == pytest.approx([match.matched_lufs] * 3, abs=1e-6)
    assert max(np.abs(s * g).max() for s, g in zip(signals, match.gains)) == pytest.approx(10 ** (-1 / 20))
    with pytest.raises(ValueError, match="audible"):
        match_loudness([-20.0, -np.inf], [0.5, 0.0], -23.0, -1.0)


def test_phrase_cache_draws_equal_the_cache_and_read_only_the_rows_they_need(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    phrases = rng.random((25, 128, 57)) < 0.2
    shards = []
    for number, part in enumerate(np.array_split(np.arange(25), 3)):
        shards.append(f"shard-{number:06d}.npz")
        write_shard(tmp_path / shards[-1], pack_phrases(phrases[part]), np.zeros(len(part)), part, ["a.mid"], [len(part)], [""])
    write_report(tmp_path, {"phrases": 25, "shards": shards})
    assert np.array_equal(load_phrases(tmp_path), phrases)
    drawn = PhraseCacheFolder(tmp_path).draw(25, seed=3)
    flat = lambda x: {row.tobytes() for row in x.reshape(len(x), -1)}  # noqa: E731
    assert len(drawn) == 25 and flat(drawn) == flat(phrases)
    few = PhraseCacheFolder(tmp_path).draw(4, seed=3)
    assert np.array_equal(few, drawn[:4])  # the same seed draws the same phrases in the same order
    reads, real_preadv = [], os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, views, at: reads.append(sum(map(len, views))) or real_preadv(fd, views, at))
    one = PhraseCacheFolder(tmp_path).draw(1, seed=3)
    assert np.array_equal(one, drawn[:1]) and reads == [912]  # the packed bytes of one phrase


@pytest.fixture(scope="module")
def loop_inputs(tmp_path_factory):
    """A training cache, a generate.py output with some empty phrases, a CNN-VAE and an LSTM prior."""
    root = tmp_path_factory.mktemp("loop_inputs")
    rng = np.random.default_rng(0)
    write_phrase_cache(root / "loops", pack_phrases(groove(rng, 30)), [f"s{i % 6}.mid" for i in range(30)], np.arange(30))
    generated = groove(rng, 24)
    generated[::2] = False  # half of them silent
    (root / "generated").mkdir()
    np.savez_compressed(root / "generated" / "phrases.npz", packed=pack_phrases(generated))
    torch.manual_seed(0)
    vae = root / "cnn_vae.ckpt"
    save_checkpoint(CNNVAE(channels=8, latent_dim=16), vae)
    checkpoint = torch.load(vae, weights_only=False)
    checkpoint["config"] = {"model": {"_target_": "lightning_modules.cnn_vae.CNNVAE"}}  # as train.py records it
    torch.save(checkpoint, vae)
    save_tiny_vqvae(root / "vqvae.ckpt")
    save_checkpoint(tiny_prior(vqvae_ckpt=str(root / "vqvae.ckpt")), root / "prior.ckpt")
    return root


def loop_systems(root) -> str:
    return "systems={Training set: %s, VQ-VAE+LSTM: %s}" % (root / "loops", root / "generated")


def test_checkpoint_sources_sample_as_the_module_does(loop_inputs):
    """A checkpoint's class comes from its recorded config or from `class`; `sampling` reaches sample()."""
    vae_source = resolve_source("CNN-VAE", str(loop_inputs / "cnn_vae.ckpt"))
    assert isinstance(vae_source, GeneratorCheckpoint) and vae_source.module_class is CNNVAE
    vae = CNNVAE.load_from_checkpoint(loop_inputs / "cnn_vae.ckpt", map_location="cpu").eval()
    assert np.array_equal(vae_source.draw(3, seed=11), vae.sample(3, torch.Generator().manual_seed(11)).numpy())

    spec = {"path": str(loop_inputs / "prior.ckpt"), "class": "lightning_modules.prior.LSTMPrior",
            "sampling": {"mode": "top_k", "top_k": 2}}
    prior_source = resolve_source("prior", spec)
    prior = LSTMPrior.load_from_checkpoint(loop_inputs / "prior.ckpt", map_location="cpu").eval()
    expected = prior.sample(4, torch.Generator().manual_seed(5), mode="top_k", top_k=2).numpy()
    assert np.array_equal(prior_source.draw(4, seed=5), expected)
    assert not np.array_equal(expected, prior.sample(4, torch.Generator().manual_seed(5), mode="top_k", top_k=50).numpy())


def test_loop_kit_has_every_system_loudness_matched_and_familiarisation_apart(loop_inputs, tmp_path):
    out = tmp_path / "kit"
    code, stdout, stderr = run_listening_test("build", "kind=loops", loop_systems(loop_inputs), f"out={out}",
                                              "samples=4", "tempo=240")
    assert code == 0, stderr
    assert "VQ-VAE+LSTM: " in stdout and "silent loops skipped" in stdout and out.as_uri() in stdout
    test = kit_test(out)
    assert test["kind"] == "loops" and len(test["familiarisation"]) == 3
    systems = [s["system"] for s in test["stimuli"]]
    assert sorted(set(systems)) == ["Training set", "VQ-VAE+LSTM"]
    assert all(systems.count(s) == 4 for s in set(systems))
    assert test["min_listen_seconds"] == pytest.approx(8.0)  # one pass: 8 bars at 240 BPM
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["systems"]["VQ-VAE+LSTM"]["silent_skipped"] > 0

    meter = pyloudnorm.Meter(SR)
    audio = {clip["id"]: kit_audio(out, clip["id"]) for clip in test["familiarisation"] + test["stimuli"]}
    for samples, sr in audio.values():
        assert sr == SR and len(samples) == 8 * SR
        assert meter.integrated_loudness(samples) == pytest.approx(manifest["loudness"]["matched_lufs"], abs=0.05)
    training = [audio[s["id"]][0] for s in test["stimuli"] if s["system"] == "Training set"]
    for clip in test["familiarisation"]:
        assert not any(np.allclose(audio[clip["id"]][0], rated) for rated in training)
    # a rebuild with the same seed is the same test
    code, _, _ = run_listening_test("build", "kind=loops", loop_systems(loop_inputs), f"out={tmp_path / 'again'}",
                                    "samples=4", "tempo=240")
    assert code == 0 and kit_test(tmp_path / "again")["id"] == test["id"]


def test_loop_build_errors_name_the_system_and_the_key(loop_inputs, tmp_path, monkeypatch):
    root = loop_inputs
    plain = tmp_path / "plain.ckpt"
    save_checkpoint(CNNVAE(channels=8, latent_dim=16), plain)
    broken = tmp_path / "broken_cache"
    shutil.copytree(root / "loops", broken)
    next(broken.glob("shard-*.npz")).write_bytes(b"truncated")
    no_report, no_shards = tmp_path / "no_report", tmp_path / "no_shards"
    for folder, report in ((no_report, "{truncated"), (no_shards, "{}")):
        folder.mkdir()
        (folder / "report.json").write_text(report)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "broken.npz").write_bytes(b"PK")
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    cases = [
        (["systems={A: %s}" % broken], f"phrase cache {broken} cannot be read"),
        (["systems={A: %s}" % no_report], f"phrase cache {no_report}: report.json cannot be read"),
        (["systems={A: %s}" % no_shards], f"phrase cache {no_shards}: report.json lists no shards"),
        (["systems={A: {path: %s, class: lightning_modules.prior.LSTMPrior}}" % plain],
         f"systems.A: {plain} cannot be loaded as lightning_modules.prior.LSTMPrior"),
        (["systems={A: {path: %s, sampling: {temperature: 2}}}" % (root / "cnn_vae.ckpt")],
         "systems.A: sampling: unknown keys ['temperature']; CNNVAE.sample takes none"),
        (["systems={A: {path: %s, class: lightning_modules.prior.LSTMPrior, sampling: {mode: greedy}}}"
          % (root / "prior.ckpt")], "systems.A: sampling {'mode': 'greedy'}: "),
        (["systems={A: %s}" % (root / "cnn_vae.ckpt"), "device=cuda"], "device=cuda but CUDA is not available"),
        (["systems={A: %s}" % (root / "loops"), "device=gpu0"], "device=gpu0 is not a torch device"),
        (["systems={A: %s}" % (tmp_path / "broken.npz")], "holds no readable `packed` phrases"),
        (["systems={A: %s}" % (tmp_path / "broken.ckpt")], "cannot be read as a checkpoint"),
        (["systems=[%s]" % (root / "loops")], "systems=... is required: a mapping"),
        (["systems={Gen: %s}" % (root / "generated"), "samples=13", "familiarisation=0"],
         "systems.Gen: only 12 audible loops of 24 drawn (12 silent), 13 needed"),
        (["systems={A: %s}" % plain], "records no model class"),
        (["systems={A: %s}" % (tmp_path / "nothing")], "not a phrase cache folder"),
        (["systems={A: {path: %s, sampling: {top_k: 3}}}" % (root / "loops")], "apply to checkpoints only"),
        (["systems={A: {path: %s, class: os.path}}" % plain], "has no sample(n, generator)"),
        (["systems={A: %s}" % (root / "loops"), "familiarisation_from=B"], "is not one of the systems"),
        (["systems={A: %s}" % (root / "loops"), "sample=3"], "Valid keys at the top level"),
        ([], "systems=... is required"),
    ]
    for args, message in cases:
        code, _, stderr = run_listening_test("build", "kind=loops", *args, f"out={tmp_path / 'kit'}")
        assert code == 2 and message in stderr and stderr.count("\n") == 1, (args, stderr)
    assert not (tmp_path / "kit").exists()
    code, _, stderr = run_listening_test("build", "kind=songs", f"out={tmp_path / 'kit'}")
    assert code == 2 and "kind='songs'" in stderr


def write_wav(path, audio: np.ndarray, sr: int = SR) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.asarray(audio, dtype=np.float32).T, sr, subtype="FLOAT")


@pytest.fixture(scope="module")
def mix_inputs(tmp_path_factory):
    """evaluate_mix.py's layout for three songs (one with a NaN mix, one lacking a system) and their stems.

    The songs are quiet for 2 s and loud from 2 s to 5 s, so the loudest 3-second excerpt starts at 2 s.
    """
    root = tmp_path_factory.mktemp("mix_inputs")
    rng = np.random.default_rng(5)
    t = np.arange(6 * SR) / SR
    envelope = np.where((t >= 2) & (t < 5), 1.0, 0.05)
    for song in ("song_a", "song_b", "song_c"):
        stems = {"vocals": 0.2 * np.sin(2 * np.pi * 440 * t), "bass": 0.3 * np.sin(2 * np.pi * 55 * t),
                 "drums": 0.1 * rng.standard_normal(len(t)), "other": 0.1 * np.sin(2 * np.pi * 330 * t)}
        for name, audio in stems.items():
            write_wav(root / "stems" / song / f"{name}.wav", np.stack([audio, audio]) * envelope)
        total = sum(stems.values()) * envelope
        mixes = {"target": np.stack([total, 0.7 * total]), "sum": 0.5 * np.stack([total, total]),
                 "fxnorm": 1.5 * np.stack([0.8 * total, total])}
        if song == "song_c":
            del mixes["fxnorm"]
        for system, audio in mixes.items():
            if song == "song_b" and system == "sum":
                audio = audio.copy()
                audio[0, int(2.5 * SR)] = np.nan
            write_wav(root / "evaluation" / "mixes" / system / f"{song}.wav", audio)
    # a 48 kHz mono mix is resampled and duplicated to stereo
    song_a = sf.read(root / "evaluation" / "mixes" / "sum" / "song_a.wav")[0].T[0]
    write_wav(root / "evaluation" / "mixes" / "sum" / "song_a.wav", soxr.resample(song_a, SR, 48000)[None], sr=48000)
    return root


def test_mixing_kit_pages_excerpts_loudness_and_skipped_songs(mix_inputs, tmp_path):
    out = tmp_path / "kit"
    code, stdout, stderr = run_listening_test(
        "build", "kind=mixing", f"mixes={mix_inputs / 'evaluation'}", f"stems={mix_inputs / 'stems'}", f"out={out}",
        "excerpt_seconds=3", "post_url=http://127.0.0.1:9/answers")
    assert code == 0, stderr
    assert "song song_b skipped" in stdout and "NaN" in stdout and "song song_c skipped" in stdout
    test = kit_test(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert test["post_url"] == "http://127.0.0.1:9/answers"
    assert [song["name"] for song in test["songs"]] == ["song_a"]
    assert set(manifest["skipped_songs"]) == {"song_b", "song_c"}
    assert "fxnorm" in manifest["skipped_songs"]["song_c"] and "missing" in manifest["skipped_songs"]["song_c"]
    assert manifest["excerpts"]["song_a"] == {"start_seconds": 2.0, "seconds": 3.0}
    song = test["songs"][0]
    assert sorted(s["system"] for s in song["stimuli"]) == ["anchor", "fxnorm", "sum", "target"]
    assert [s["name"] for s in song["stems"]] == ["vocals", "bass", "drums", "other"]
    assert [a["name"] for a in test["attributes"]] == ["Production Value", "Clarity", "Excitement"]

    meter = pyloudnorm.Meter(SR)
    matched = manifest["loudness"]["matched_lufs"]
    for stimulus in song["stimuli"]:
        audio, sr = kit_audio(out, stimulus["id"])
        assert sr == SR and audio.shape == (3 * SR, 2)
        assert meter.integrated_loudness(audio) == pytest.approx(matched, abs=0.05)
    stems = [kit_audio(out, stem["id"])[0] for stem in song["stems"]]
    assert meter.integrated_loudness(sum(stems)) == pytest.approx(matched, abs=0.05)
    anchor = next(s for s in song["stimuli"] if s["system"] == "anchor")
    anchor_audio = kit_audio(out, anchor["id"])[0]
    # the anchor is the plain sum of the stems: the same waveform as the stems' sum, up to one gain
    scale = np.dot(anchor_audio.ravel(), sum(stems).ravel()) / np.dot(sum(stems).ravel(), sum(stems).ravel())
    assert np.abs(anchor_audio - scale * sum(stems)).max() < 1e-3


def test_mixing_build_skips_a_song_whose_reference_is_truncated_or_too_short(mix_inputs, tmp_path):
    evaluation = tmp_path / "evaluation"
    shutil.copytree(mix_inputs / "evaluation", evaluation)
    stems = tmp_path / "stems"
    shutil.copytree(mix_inputs / "stems", stems)
    for song in ("song_d", "song_e"):
        shutil.copytree(stems / "song_a", stems / song)
        for system in ("target", "sum", "fxnorm"):
            shutil.copyfile(evaluation / "mixes" / system / "song_a.wav", evaluation / "mixes" / system / f"{song}.wav")
    truncated = evaluation / "mixes" / "target" / "song_d.wav"
    truncated.write_bytes(truncated.read_bytes()[:100])  # a header and no samples
    write_wav(evaluation / "mixes" / "target" / "song_e.wav", 0.1 * np.ones((2, SR // 2)))
    code, stdout, stderr = run_listening_test(
        "build", "kind=mixing", f"mixes={evaluation}", f"stems={stems}", f"out={tmp_path / 'kit'}", "excerpt_seconds=3")
    assert code == 0, stderr
    assert "song song_d skipped: " in stdout and "song song_e skipped: " in stdout and "lasts 0.50 s" in stdout
    assert [song["name"] for song in kit_test(tmp_path / "kit")["songs"]] == ["song_a"]


def wet_reference(evaluation, stems, song: str) -> None:
    """Make the song's reference mixture the plain sum of its stems, as MUSDB18's (and the demo's) wet stems are."""
    total = sum(sf.read(stems / song / f"{stem}.wav", dtype="float64")[0] for stem in STEMS)
    write_wav(evaluation / "mixes" / "target" / f"{song}.wav", total.T)


def test_mixing_build_errors(mix_inputs, tmp_path):
    evaluation, stems = mix_inputs / "evaluation", mix_inputs / "stems"
    wet = tmp_path / "wet"
    shutil.copytree(evaluation, wet)
    wet_reference(wet, stems, "song_a")
    cases = [
        ([f"mixes={evaluation}", f"stems={stems}", "reference=professional"], "no professional/ folder"),
        ([f"mixes={evaluation}", f"stems={stems}", "systems=[wave_u_net]"], "have no folder"),
        ([f"mixes={evaluation}", f"stems={stems}", "anchor=sum"], "is also the name of a system"),
        ([f"mixes={evaluation}", f"stems={stems}", "songs=[song_b]"], "no song of mixes"),
        ([f"mixes={tmp_path}", f"stems={stems}"], "no target/ folder"),
        ([f"stems={stems}"], "mixes=None: not a folder"),
        ([f"mixes={wet}", f"stems={stems}"], "anchor=anchor: the stems of song song_a sum to its target mixture"),
    ]
    for args, message in cases:
        code, _, stderr = run_listening_test("build", "kind=mixing", *args, f"out={tmp_path / 'kit'}")
        assert code == 2 and message in stderr and stderr.count("\n") == 1, (args, stderr)
    code, _, stderr = run_listening_test("build", "kind=mixing", f"mixes={wet}", f"stems={stems}", "anchor=null",
                                         f"out={tmp_path / 'kit'}", "excerpt_seconds=3")
    assert code == 0, stderr
    assert sorted(s["system"] for s in kit_test(tmp_path / "kit")["songs"][0]["stimuli"]) == ["fxnorm", "sum", "target"]


def test_demo_takes_the_checkpoint_each_generator_run_selected(tmp_path):
    """The best recorded in last.ckpt when a monitor chose one (not merely a newer file), else last.ckpt."""
    best = "epoch=003-step=0000040.ckpt"
    selections = {"cnn_vae": {"monitor": "val/hamming", "best_model_path": f"elsewhere/{best}"},
                  "musegan": {"monitor": None, "best_model_path": "last.ckpt"}}
    for step, state in selections.items():
        folder = tmp_path / step / "checkpoints"
        folder.mkdir(parents=True)
        torch.save({"callbacks": {f"ModelCheckpoint{{'monitor': {state['monitor']!r}}}": state}}, folder / "last.ckpt")
        (folder / best).touch()
        (folder / "epoch=009-step=0000090.ckpt").touch()  # a newer leftover file chooses nothing
    (tmp_path / "music_transformer" / "checkpoints").mkdir(parents=True)
    assert listening_test.demo_loop_systems(tmp_path) == {
        "Training set": str(tmp_path / "loops"), "VQ-VAE+LSTM": str(tmp_path / "generated"),
        "CNN-VAE": str(tmp_path / "cnn_vae" / "checkpoints" / "epoch=003-step=0000040.ckpt"),
        "MuseGAN": str(tmp_path / "musegan" / "checkpoints" / "last.ckpt"),
    }


def test_demo_builds_both_tests_from_the_newest_runs_or_names_what_to_run_first(loop_inputs, mix_inputs, tmp_path):
    runs, kits = tmp_path / "runs", tmp_path / "kits"
    code, _, stderr = run_listening_test("demo", f"runs={runs}", f"out={kits}")
    assert code == 1 and "run `make demo` first" in stderr and "`make demo-mixing`" in stderr
    run = runs / "pipeline" / "2026-01-01_00-00-00"
    shutil.copytree(loop_inputs / "loops", run / "loops")
    shutil.copytree(loop_inputs / "generated", run / "generated")
    shutil.copytree(mix_inputs / "evaluation" / "mixes", runs / "mixer_evaluation" / "mixes")
    wet_reference(runs / "mixer_evaluation", mix_inputs / "stems", "song_a")  # the demo's test songs are wet
    code, stdout, stderr = run_listening_test("demo", f"runs={runs}", f"stems={mix_inputs / 'stems'}", f"out={kits}")
    assert code == 0, stderr
    assert (kits / "loops" / "index.html").as_uri() in stdout and (kits / "mixing" / "index.html").as_uri() in stdout
    assert len(kit_test(kits / "loops")["stimuli"]) == 20
    songs = kit_test(kits / "mixing")["songs"]
    assert len(songs) == 1 and sorted(s["system"] for s in songs[0]["stimuli"]) == ["fxnorm", "sum", "target"]
