"""Loop detector: the two Deep SVDD phases, the threshold, checkpoints, bad input, Fig. 3 analysis."""
from __future__ import annotations

import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from callbacks.loop_analysis import draw_groups, group_statistics
from lightning_modules.loop_detector import LoopDetector
from lightning_modules.nets.svdd import SVDDDecoder, SVDDEncoder


class VectorDataModule(pl.LightningDataModule):
    """A fixed set of (N, 28) vectors split 80/20, with the ``train_vectors()`` the detector needs."""

    def __init__(self, vectors: torch.Tensor, batch_size: int = 64):
        super().__init__()
        order = torch.randperm(len(vectors), generator=torch.Generator().manual_seed(0))
        n_train = max(1, int(0.8 * len(vectors)))
        self.train, self.val = vectors[order[:n_train]], vectors[order[n_train:]]
        self.batch_size = batch_size

    def train_vectors(self) -> torch.Tensor:
        return self.train

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=self.batch_size)


def loop_like_vectors(n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (0.7 + 0.3 * torch.rand(n, 28, generator=generator)).clamp(max=1.0)


class Recorder(pl.Callback):
    """Centre, encoder weights and epoch losses at the end of every training epoch."""

    def __init__(self):
        self.centers, self.encoders, self.svdd_losses = [], [], []

    def on_train_epoch_end(self, trainer, pl_module):
        self.centers.append(pl_module.center.clone())
        self.encoders.append({k: v.clone() for k, v in pl_module.encoder.state_dict().items()})
        if "train/svdd_loss" in trainer.callback_metrics:
            self.svdd_losses.append(float(trainer.callback_metrics["train/svdd_loss"]))


def fit(module: LoopDetector, datamodule, tmp_path, callbacks=()) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=module.hparams.pretrain_epochs + module.hparams.svdd_epochs,
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path, callbacks=list(callbacks),
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer


def nudged_mean(encoder: SVDDEncoder, vectors: torch.Tensor, eps: float) -> torch.Tensor:
    with torch.no_grad():
        center = encoder(vectors).mean(dim=0)
    return torch.where(center.abs() < eps, torch.where(center < 0, -eps, eps), center)


def test_networks_have_the_specified_shape_and_no_biases():
    encoder, decoder = SVDDEncoder(), SVDDDecoder()
    assert [tuple(p.shape) for p in encoder.parameters()] == [(14, 28), (14, 14), (7, 14)]
    assert [tuple(p.shape) for p in decoder.parameters()] == [(14, 7), (14, 14), (28, 14)]
    assert all(not isinstance(m, torch.nn.Linear) or m.bias is None for m in [*encoder, *decoder])
    slopes = {m.negative_slope for m in [*encoder, *decoder] if isinstance(m, torch.nn.LeakyReLU)}
    assert slopes == {0.1} and not isinstance(encoder[-1], torch.nn.LeakyReLU)


def test_centre_is_fixed_after_pretraining_and_svdd_loss_falls(tmp_path):
    torch.manual_seed(0)
    datamodule = VectorDataModule(loop_like_vectors(320))
    module = LoopDetector(pretrain_epochs=2, svdd_epochs=4, center_eps=0.05)
    recorder = Recorder()
    fit(module, datamodule, tmp_path, [recorder])

    pretrained = SVDDEncoder()
    pretrained.load_state_dict(recorder.encoders[1])
    expected = nudged_mean(pretrained, datamodule.train, eps=0.05)
    assert torch.allclose(recorder.centers[2], expected, atol=1e-6)
    assert (recorder.centers[2].abs() >= 0.05 - 1e-7).all()
    for later in recorder.centers[3:]:
        assert torch.equal(later, recorder.centers[2])
    # The encoder kept learning in phase 2 while the centre stayed put.
    assert not torch.equal(recorder.encoders[-1]["0.weight"], recorder.encoders[1]["0.weight"])
    assert len(recorder.svdd_losses) == 4 and recorder.svdd_losses[-1] < recorder.svdd_losses[0]


def test_threshold_follows_the_formula_and_survives_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    datamodule = VectorDataModule(loop_like_vectors(200))
    module = LoopDetector(pretrain_epochs=1, svdd_epochs=2)
    trainer = fit(module, datamodule, tmp_path)

    scores = module.loop_score(datamodule.train).double()
    log_scores = scores.log().numpy()
    expected = float(np.exp(log_scores.mean() + log_scores.std()))
    assert module.threshold == pytest.approx(expected, rel=1e-5)
    assert torch.equal(module.training_scores, module.loop_score(datamodule.train))

    trainer.save_checkpoint(tmp_path / "detector.ckpt")
    loaded = LoopDetector.load_from_checkpoint(tmp_path / "detector.ckpt")
    probe = torch.rand(50, 28)
    assert torch.equal(loaded.loop_score(probe), module.loop_score(probe))
    assert loaded.threshold == module.threshold
    assert torch.equal(loaded.center, module.center)


def test_loop_score_is_the_mean_squared_latent_distance():
    module = LoopDetector(pretrain_epochs=0, svdd_epochs=1)
    module.center.copy_(torch.linspace(-1, 1, 7))
    x = torch.rand(5, 28)
    with torch.no_grad():
        expected = ((module.encoder(x) - module.center) ** 2).mean(dim=1)
    assert torch.allclose(module.loop_score(x), expected)
    assert torch.allclose(module.loop_score(x.numpy()), expected)


def test_score_phrases_and_score_packed_read_c_midi_of_the_configured_similarity():
    from datamodules.correlation import c_midi
    from datamodules.pianoroll import pack_phrases

    phrases = torch.rand(6, 128, 57) < 0.1
    packed = torch.from_numpy(pack_phrases(phrases.numpy()))
    for similarity in ("hamming", "iou"):
        module = LoopDetector(pretrain_epochs=0, svdd_epochs=1, similarity=similarity)
        expected = module.loop_score(c_midi(phrases, similarity=similarity))
        assert torch.equal(module.score_phrases(phrases), expected)
        assert torch.equal(module.score_packed(packed), expected)
    assert module.score_packed(packed[:0]).shape == (0,)


@pytest.mark.parametrize(
    "vectors",
    [torch.ones(40, 28), loop_like_vectors(1), loop_like_vectors(10)],
    ids=["silent-loops", "single-loop", "fewer-than-a-batch"],
)
def test_degenerate_training_sets_still_train(tmp_path, vectors):
    module = LoopDetector(pretrain_epochs=1, svdd_epochs=1)
    fit(module, VectorDataModule(vectors), tmp_path)
    assert np.isfinite(module.threshold) and module.threshold > 0
    assert torch.isfinite(module.center).all()


def test_misconfigured_runs_fail_with_the_key_named(tmp_path):
    with pytest.raises(ValueError, match="similarity"):
        LoopDetector(similarity="cosine")
    module = LoopDetector(pretrain_epochs=1, svdd_epochs=1)
    trainer = pl.Trainer(max_epochs=5, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="max_epochs"):
        trainer.fit(module, datamodule=VectorDataModule(loop_like_vectors(20)))


def test_group_statistics_match_scipy_and_groups_are_seeded():
    from scipy import stats

    scores = np.random.default_rng(0).lognormal(size=1000)
    loops = np.arange(50)
    scores[loops] *= 0.01
    groups = draw_groups(1000, loops, n_random_groups=4, group_size=100, seed=3)
    assert [len(g) for g in groups.values()] == [50, 100, 100, 100, 100]
    assert all(np.array_equal(a, b) for a, b in zip(groups.values(), draw_groups(1000, loops, 4, 100, 3).values()))
    report = group_statistics(scores, groups)
    assert report["loops"]["mean"] == pytest.approx(scores[loops].mean())
    assert report["random_2"]["std"] == pytest.approx(scores[groups["random_2"]].std(ddof=1))
    welch = stats.ttest_ind(scores[loops], scores[groups["random_0"]], equal_var=False)
    assert report["random_0"]["p_vs_loops"] == pytest.approx(welch.pvalue)
    assert report["random_0"]["p_vs_loops"] < 1e-3


def test_demo_run_separates_labelled_loops_and_writes_the_fig3_report(demo_root, tmp_path):
    """A short fit on the demo loops, then the test stage's Fig. 3 analysis on the labelled demo MIDI.

    Uses the IoU similarity: on the demo set the paper's scale-free Hamming variant needs far
    longer training to separate the labels (the report compares both).
    """
    from tests.helpers import run_train

    trainer, module, _, _ = run_train([
        "experiment=loop_detector", f"paths.demo={demo_root}", f"run_dir={tmp_path}", "logger=csv",
        "model.pretrain_epochs=3", "model.svdd_epochs=5", "trainer.max_epochs=8", "model.similarity=iou",
        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
    ])
    report = json.loads((tmp_path / "loop_analysis" / "report.json").read_text())
    assert report["auroc"] >= 0.9
    assert report["n_labelled_loops"] > 100 and report["n_labelled_non_loops"] > 100
    assert report["groups"]["loops"]["mean"] < min(g["mean"] for n, g in report["groups"].items() if n != "loops")
    assert set(report["similarity_comparison"]) == {"hamming", "iou"}
    assert trainer.callback_metrics["test/auroc"] == pytest.approx(report["auroc"])
    for png in ("loop_analysis/groups.png", "loop_analysis/scores.png", "loop_detector/train_scores.png"):
        assert (tmp_path / png).stat().st_size > 0
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert float(checkpoint["state_dict"]["score_threshold"]) == module.threshold


@pytest.mark.slow
def test_two_process_training_gives_one_detector(demo_root, tmp_path):
    """DDP on CPU: the SVDD phase leaves the decoder idle, which DDP must tolerate; the
    checkpoint carries a finite threshold that matches the training set scored afterwards."""
    from datamodules.audio_loops import AudioLoopDataModule
    from tests.helpers import run_train_subprocess

    run_train_subprocess([
        "experiment=loop_detector", f"paths.demo={demo_root}", f"run_dir={tmp_path}", "logger=none",
        "model.pretrain_epochs=1", "model.svdd_epochs=2", "trainer.max_epochs=3", "stages=[fit]",
    ])
    module = LoopDetector.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    datamodule = AudioLoopDataModule(loops=str(demo_root / "loops"), demo_root=str(demo_root))
    datamodule.setup("fit")
    log_scores = module.loop_score(datamodule.train_vectors()).double().log().numpy()
    assert module.threshold == pytest.approx(float(np.exp(log_scores.mean() + log_scores.std())), rel=1e-5)
