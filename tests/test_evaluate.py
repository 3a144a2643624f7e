"""evaluate.py with tiny checkpoints: Tables 2-3, the rejection sweep, skipped generators, config errors."""
from __future__ import annotations

import contextlib
import io
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import evaluate
from callbacks.evaluation import (
    ROW_FIELDS, TABLE3_FIELDS, TRAINING_SET, Evaluation, LatentSampler, LoopSource, PhraseSampler, read_csv,
    scientific,
)
from callbacks.metrics import GenerativeMetrics, note_density, unique_pitch
from datamodules.pianoroll import load_phrase_cache, pack_phrases, unpack_phrases, write_phrase_cache
from framework.seeding import sampling_generator
from lightning_modules.cnn_vae import CNNVAE
from lightning_modules.loop_detector import LoopDetector
from lightning_modules.musegan import MuseGAN
from lightning_modules.music_transformer import MusicTransformer
from lightning_modules.prior import generate_loops
from tests.helpers import load_packed_in_memory, save_checkpoint
from tests.test_prior import save_tiny_vqvae, tiny_prior

TOP_K = "VQ-VAE+LSTM (top-k sampling=30)"
BASELINES = ["CNN-VAE", "Music Transformer", "MuseGAN"]
TEMPERATURE = "VQ-VAE+LSTM (temperature sampling=0.7)"
# Scores of the random detector below lie in about [0.23, 0.26]: the middle thresholds reject part
# of the samples, the last one all of them.
THRESHOLDS = "[null,1.0,0.245,0.24,0.001]"
SMALL = ["n=12", "batch_size=12", "n_networks=2", "max_samples=20", "seed=4", "rejection.max_rounds=3"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 30-phrase training cache and untrained tiny prior, VQ-VAE, baseline and loop detector checkpoints."""
    root = tmp_path_factory.mktemp("evaluate")
    phrases = torch.rand(30, 128, 57, generator=torch.Generator().manual_seed(0)) < 0.3
    write_phrase_cache(root / "training", pack_phrases(phrases.numpy()), ["song.mid"] * 30, np.arange(30))
    save_tiny_vqvae(root / "vqvae.ckpt")
    torch.manual_seed(2)
    detector = LoopDetector(pretrain_epochs=1, svdd_epochs=1)
    detector.center.fill_(0.5)
    torch.manual_seed(3)
    transformer = MusicTransformer(hidden=16, layers=1, heads=2, feed_forward=32)
    transformer.set_first_steps(phrases[:, 0])
    return {
        "training": str(root / "training"),
        "prior": save_checkpoint(tiny_prior(vqvae_ckpt=str(root / "vqvae.ckpt")), root / "prior.ckpt"),
        "detector": save_checkpoint(detector, root / "detector.ckpt"),
        "cnn_vae": save_checkpoint(CNNVAE(channels=8, latent_dim=16), root / "cnn_vae.ckpt"),
        "music_transformer": save_checkpoint(transformer, root / "music_transformer.ckpt"),
        "musegan": save_checkpoint(MuseGAN(latent_dim=8, generator_width=16, critic_width=8), root / "musegan.ckpt"),
    }


def arguments(files: dict, out, *extra: str) -> list[str]:
    return [*(f"{key}={value}" for key, value in files.items()), f"out={out}", *SMALL, *extra]


@pytest.fixture(scope="module")
def evaluated(files, tmp_path_factory):
    """One full run (every baseline, two prior settings, a five-threshold sweep); its folder and output."""
    out = tmp_path_factory.mktemp("run") / "evaluation"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = evaluate.main(arguments(
            files, out, "prior_sampling=[{mode: top_k, k: 30},{mode: temperature, temperature: 0.7}]",
            f"rejection.thresholds={THRESHOLDS}", f"rejection.generators=['{TOP_K}',CNN-VAE]",
        ))
    assert code == 0, stderr.getvalue()
    stdout, stderr = stdout.getvalue(), stderr.getvalue()
    return out, stdout, stderr


def test_tables_list_every_generator_with_the_paper_columns(evaluated):
    out, stdout, _ = evaluated
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["table2.md", "table2.csv", "table3.md", "table3.csv", "rejection.md", "rejection.csv", "rejection.png",
         "config.yaml"])
    assert (out / "rejection.png").stat().st_size > 0

    table2 = read_csv(out / "table2.csv")
    assert [row["model"] for row in table2] == [TRAINING_SET, *BASELINES, TOP_K, TEMPERATURE]
    assert list(table2[0]) == list(ROW_FIELDS)
    training, *models = table2
    assert all(math.isnan(training[key]) for key in ("precision", "recall", "density", "coverage", "f1_pr"))
    for row in table2:
        assert row["requested"] == row["accepted"] == 12 and row["shortfall"] == 0
        assert all(math.isfinite(row[key]) for key in ("ls", "up", "nd"))
    for row in models:
        assert all(math.isfinite(row[key]) for key in ROW_FIELDS[7:])

    table3 = read_csv(out / "table3.csv")
    assert [row["model"] for row in table3] == [*BASELINES, TOP_K, TEMPERATURE]
    assert list(table3[0]) == list(TABLE3_FIELDS)

    markdown = (out / "table2.md").read_text()
    assert "| Model | LS | UP | ND | P | R | D | C |" in markdown
    assert f"| {TRAINING_SET} | {scientific(training['ls'])} | {training['up']:.3f} | {training['nd']:.3f} | - |" in markdown
    assert f"{models[0]['precision']:.3f} ± {models[0]['precision_std']:.3f}" in markdown
    assert markdown.strip() in stdout and (out / "table3.md").read_text().strip() in stdout


def test_f1_columns_are_the_f1_of_the_table_means(evaluated):
    out, _, _ = evaluated
    means = {row["model"]: row for row in read_csv(out / "table2.csv")}
    for row in read_csv(out / "table3.csv"):
        m = means[row["model"]]
        assert row["f1_pr"] == pytest.approx(2 * m["precision"] * m["recall"] / (m["precision"] + m["recall"]))
        assert row["f1_dc"] == pytest.approx(2 * m["density"] * m["coverage"] / (m["density"] + m["coverage"]))


def test_rejection_sweep_acceptance_falls_and_shortfalls_are_reported(evaluated):
    out, _, stderr = evaluated
    rows = read_csv(out / "rejection.csv")
    assert [(r["model"], r["threshold"]) for r in rows] == [
        (model, t) for model in (TOP_K, "CNN-VAE") for t in ("none", "1", "0.245", "0.24", "0.001")]
    table2 = {row["model"]: row for row in read_csv(out / "table2.csv")}
    for model in (TOP_K, "CNN-VAE"):
        sweep = [r for r in rows if r["model"] == model]
        rates = [r["acceptance_rate"] for r in sweep]
        assert rates[0] == 1.0 and all(a >= b for a, b in zip(rates, rates[1:])), rates
        assert 0 < rates[2] < 1 and rates[-1] == 0
        assert {key: sweep[0][key] for key in ROW_FIELDS[2:]} == {key: table2[model][key] for key in ROW_FIELDS[2:]}
        last = sweep[-1]
        assert (last["accepted"], last["shortfall"], last["generated"]) == (0, 12, 36)
        assert math.isnan(last["precision"]) and math.isnan(last["up"])
        assert "kept only 0 of 12 phrases below threshold 0.001" in stderr
    assert "0 of 12 (short by 12)" in (out / "rejection.md").read_text()


def test_kept_samples_score_below_their_threshold_and_rows_match_a_direct_computation(files):
    detector = LoopDetector.load_from_checkpoint(files["detector"]).eval()
    vae = CNNVAE.load_from_checkpoint(files["cnn_vae"])
    training = load_phrase_cache(files["training"]).packed
    evaluation = Evaluation(training, 10, seed=1, detector=detector, batch_size=10, max_rounds=4,
                            n_networks=2, max_samples=20, progress=False)
    source = LoopSource("CNN-VAE", LatentSampler(vae))
    for threshold in (0.25, 0.245):
        loops = evaluation.sample(source, threshold)
        assert len(loops.phrases) > 0
        # Equal up to the rounding of a matrix product whose rows sat in other batches.
        torch.testing.assert_close(loops.scores, detector.score_phrases(loops.phrases), rtol=1e-6, atol=0)
        assert (loops.scores < threshold).all()

    row = evaluation.row(source)
    reference = generate_loops(LatentSampler(vae), 10, sampling_generator(1), {}, 10, progress=False).phrases
    metric = GenerativeMetrics(n_networks=2, max_samples=20)
    metric.update(real=torch.from_numpy(np.unpackbits(training, axis=1).reshape(-1, 128, 57)).bool(), fake=reference)
    expected = {key: value.item() for key, value in metric.compute().items()}
    assert {key: row[key] for key in expected} == pytest.approx(expected)
    assert row["ls"] == pytest.approx(detector.score_phrases(reference).mean().item())
    assert row["up"] == pytest.approx(unique_pitch(reference).mean().item())
    assert row["nd"] == pytest.approx(note_density(reference).mean().item())


@pytest.mark.parametrize("key, model_class", [("music_transformer", MusicTransformer), ("musegan", MuseGAN)])
def test_phrase_generators_are_sampled_and_rejected_like_the_others(files, key, model_class):
    detector = LoopDetector.load_from_checkpoint(files["detector"]).eval()
    model = model_class.load_from_checkpoint(files[key]).eval()
    evaluation = Evaluation(load_phrase_cache(files["training"]).packed, 10, seed=2, detector=detector, batch_size=10,
                            max_rounds=4, n_networks=2, max_samples=20, progress=False)
    source = LoopSource(key, PhraseSampler(model))
    unfiltered = evaluation.sample(source)
    assert torch.equal(unfiltered.phrases, model.sample(10, sampling_generator(2)))
    threshold = unfiltered.scores.median().item()
    kept = evaluation.sample(source, threshold)
    assert 0 < len(kept.phrases) and kept.generated > len(kept.phrases)
    assert (kept.scores < threshold).all() and torch.equal(kept.scores, detector.score_phrases(kept.phrases))


def test_training_row_covers_the_whole_set_when_n_exceeds_it(files):
    training = load_phrase_cache(files["training"]).packed
    phrases = torch.from_numpy(np.unpackbits(training, axis=1).reshape(-1, 128, 57)).bool()
    row = Evaluation(training, 100, max_samples=20, progress=False).training_row()
    assert (row["accepted"], row["shortfall"]) == (30, 70) and math.isnan(row["ls"])
    assert row["up"] == pytest.approx(unique_pitch(phrases).mean().item())
    assert row["nd"] == pytest.approx(note_density(phrases).mean().item())


def test_generators_without_checkpoints_are_skipped_with_a_note(files, tmp_path, capsys):
    given = {"training": files["training"], "detector": files["detector"]}
    assert evaluate.main(arguments(given, tmp_path / "out", "rejection.generators=[CNN-VAE]")) == 0
    stderr = capsys.readouterr().err
    assert "cnn_vae=null: the CNN-VAE row is skipped" in stderr
    assert "music_transformer=null: the Music Transformer row is skipped" in stderr
    assert "musegan=null: the MuseGAN row is skipped" in stderr
    assert "prior=null: the VQ-VAE+LSTM rows are skipped" in stderr
    assert "rejection sweep: 'CNN-VAE' is skipped" in stderr
    assert [row["model"] for row in read_csv(tmp_path / "out" / "table2.csv")] == [TRAINING_SET]
    assert not (tmp_path / "out" / "rejection.csv").exists()


@pytest.mark.parametrize("argument, message", [
    ("bogus=1", "Valid keys at the top level: batch_size, cnn_vae, detector"),
    ("rejection.bogus=1", "Valid keys at rejection: generators, max_rounds, thresholds"),
    ("prior_sampling=[{mode: top_k, width: 3}]", "prior_sampling.0: unknown keys ['width']; valid keys: name, mode"),
    ("prior_sampling=[{mode: beam}]", "unknown sampling mode 'beam'"),
    ("rejection.generators=[MusicVAE]",
     "unknown model 'MusicVAE'; models: CNN-VAE, Music Transformer, MuseGAN, VQ-VAE+LSTM (temperature sampling)"),
    ("rejection.thresholds=[0.1,1.0]", "strictly decreasing"),
    ("max_samples=5", "max_samples=5 must exceed k=5"),
    ("prior=missing.ckpt", "prior=missing.ckpt: no such checkpoint file"),
])
def test_bad_configuration_fails_naming_the_key(files, tmp_path, capsys, argument, message):
    assert evaluate.main([f"training={files['training']}", f"out={tmp_path / 'out'}", argument]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("key, other", [("musegan", "cnn_vae"), ("music_transformer", "musegan"),
                                        ("detector", "prior"), ("vqvae", "cnn_vae"), ("cnn_vae", "training")])
def test_a_checkpoint_of_another_class_fails_in_one_line_naming_it(files, tmp_path, capsys, key, other):
    path = files[other] if other != "training" else str(tmp_path / "junk.ckpt")
    if other == "training":
        (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    given = [f"prior={files['prior']}"] if key == "vqvae" else []
    assert evaluate.main([f"training={files['training']}", f"out={tmp_path / 'out'}", f"{key}={path}", *given]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("note:")]
    assert len(errors) == 1 and errors[0].startswith(f"input error: {key}={path}: not a readable ")
    assert not (tmp_path / "out").exists()


def test_missing_training_cache_and_occupied_output_fail_clearly(tmp_path, capsys):
    assert evaluate.main([f"training={tmp_path / 'none'}", f"out={tmp_path / 'out'}"]) == 2
    assert f"training={tmp_path / 'none'}: no phrase cache" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert evaluate.main([f"training={tmp_path / 'none'}", f"out={tmp_path / 'out'}"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


class Resampler:
    """A stand-in generator in ``generate_loops``' protocol that draws phrases of a packed set (so P/R/D/C are not 0)."""

    def __init__(self, packed: np.ndarray):
        self.packed = torch.from_numpy(packed)
        self.hparams = SimpleNamespace(seq_len=1)

    def sample_codes(self, n, generator, batch_size=None):
        return torch.randint(len(self.packed), (n, 1), generator=generator)

    def decode(self, codes, batch_size=None):
        return unpack_phrases(self.packed[codes[:, 0]])


def test_rows_are_the_same_from_the_cache_on_disk_and_in_memory(phrase_cache):
    """Demo phrases: every table value read on demand equals the one from the whole cache in memory."""
    in_memory = load_packed_in_memory(phrase_cache)
    torch.manual_seed(2)
    detector = LoopDetector(pretrain_epochs=1, svdd_epochs=1).eval()
    detector.center.fill_(0.5)
    source = LoopSource("copies", Resampler(in_memory[::3]))
    rows = []
    for training in (load_phrase_cache(phrase_cache).packed, in_memory):
        evaluation = Evaluation(training, 300, seed=3, detector=detector, batch_size=128, max_rounds=3,
                                n_networks=2, max_samples=250, progress=False)
        rows.append([evaluation.training_row(), evaluation.row(source), evaluation.row(source, threshold=0.25)])
    assert rows[0][1]["precision"] > 0.5 and 0 < rows[0][2]["acceptance_rate"] < 1
    for on_disk, in_ram in zip(*rows):
        assert on_disk.keys() == in_ram.keys()
        assert all(on_disk[key] == in_ram[key] or (math.isnan(on_disk[key]) and math.isnan(in_ram[key]))
                   for key in on_disk if key not in ("model", "threshold"))
