"""GenerationMetrics in tiny training runs: logged keys and values, media on disk and in W&B, skipped epochs."""
from __future__ import annotations

from types import SimpleNamespace

import pretty_midi
import pytest
import pytorch_lightning as pl
import soundfile
import torch
from pytorch_lightning.loggers import Logger, WandbLogger
from torch.utils.data import DataLoader, TensorDataset

from callbacks import GenerationMetrics
from callbacks.metrics import GenerativeMetrics, note_density, unique_pitch
from datamodules.pianoroll import unpack_phrases
from framework.seeding import sampling_generator

KEYS = {
    "loop_score", "unique_pitch", "note_density", "f1_pr", "f1_dc",
    *(f"{name}{suffix}" for name in ("precision", "recall", "density", "coverage") for suffix in ("", "_std")),
}


class TinyGenerator(pl.LightningModule):
    """Samples independent Bernoulli cells; records every ``sample`` call."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.calls: list[tuple[int, int, bool]] = []

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        self.calls.append((self.current_epoch, n, self.trainer.sanity_checking))
        return torch.rand(n, 128, 57, generator=generator, device=self.device) < 0.08

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).square().mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.layer(batch[0]).square().mean(), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class BareSampler:
    """Just the sampling protocol, for calling the callback's helpers without a trainer."""

    device = torch.device("cpu")

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.rand(n, 128, 57, generator=generator) < 0.08


class TinyPhrases(pl.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.phrases = torch.rand(40, 128, 57, generator=torch.Generator().manual_seed(1)) < 0.1

    def _loader(self):
        return DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()

    def val_phrases(self) -> torch.Tensor:
        return self.phrases


class StandInDetector(torch.nn.Module):
    def loop_score(self, correlations: torch.Tensor) -> torch.Tensor:
        return correlations.mean(dim=1)


class RecordingLogger(Logger):
    """Keeps every logged metric dict in memory."""

    def __init__(self):
        super().__init__()
        self.history: list[dict[str, float]] = []

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.history.append(dict(metrics))


def fit(tmp_path, callback: GenerationMetrics, max_epochs: int = 1, loggers=()):
    module = TinyGenerator()
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_epochs=max_epochs, limit_train_batches=2, limit_val_batches=1,
        num_sanity_val_steps=1, logger=list(loggers) or False, callbacks=[callback], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
    )
    trainer.fit(module, datamodule=TinyPhrases())
    return trainer, module


def small_callback(**kwargs) -> GenerationMetrics:
    defaults = dict(n_samples=24, n_networks=2, max_samples=100, k=3, n_media=2, sample_rate=8000, seed=3)
    return GenerationMetrics(**{**defaults, **kwargs})


def test_logs_every_metric_and_writes_media(tmp_path):
    recorder = RecordingLogger()
    wandb_logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="test")
    trainer, module = fit(tmp_path, small_callback(detector=StandInDetector()), loggers=[recorder, wandb_logger])

    # Sampled once per validation epoch, never during the sanity check.
    assert module.calls == [(0, 24, False)]
    logged = {key for row in recorder.history for key in row}
    assert {f"val/gen/{key}" for key in KEYS} <= logged
    # The values describe the samples the callback's generator produced.
    expected = torch.rand(24, 128, 57, generator=sampling_generator(3 + 0, 0)) < 0.08
    metrics = trainer.callback_metrics
    assert metrics["val/gen/unique_pitch"].item() == pytest.approx(unique_pitch(expected).mean().item(), rel=1e-6)
    assert metrics["val/gen/note_density"].item() == pytest.approx(note_density(expected).mean().item(), rel=1e-6)
    for key in ("precision", "recall", "coverage"):
        assert 0 <= metrics[f"val/gen/{key}"].item() <= 1
    p, r = metrics["val/gen/precision"].item(), metrics["val/gen/recall"].item()
    assert metrics["val/gen/f1_pr"].item() == pytest.approx(2 * p * r / (p + r) if p + r else 0.0, abs=1e-6)

    folder = tmp_path / "samples" / "epoch=000"
    names = sorted(path.name for path in folder.iterdir())
    assert names == ["pianoroll.png", "sample_00.mid", "sample_00.wav", "sample_01.mid", "sample_01.wav"]
    # 8 bars of 4/4 at 120 bpm last 16 s; the MIDI file holds the sampled phrase.
    assert soundfile.info(str(folder / "sample_00.wav")).duration == pytest.approx(16.0, abs=1e-3)
    assert soundfile.info(str(folder / "sample_00.wav")).samplerate == 8000
    midi = pretty_midi.PrettyMIDI(str(folder / "sample_00.mid"))
    drum_hits = sum(len(instrument.notes) for instrument in midi.instruments if instrument.is_drum)
    assert drum_hits == int(expected[0, :, :9].sum())

    wandb_logger.experiment.finish()
    run_files = next((tmp_path / "wandb").glob("offline-run-*")) / "files"
    assert list((run_files / "media" / "images").rglob("*.png"))
    assert len(list((run_files / "media" / "audio").rglob("*.wav"))) == 2
    midi_files = sorted(p.name for p in (run_files / "samples" / "epoch=000").glob("*.mid"))
    assert midi_files == ["sample_00.mid", "sample_01.mid"]


def test_runs_only_every_n_epochs_and_not_at_all_when_disabled(tmp_path):
    trainer, module = fit(tmp_path / "every", small_callback(every_n_epochs=2, n_media=1), max_epochs=2)
    assert module.calls == [(1, 24, False)]
    assert [p.name for p in (tmp_path / "every" / "samples").iterdir()] == ["epoch=001"]
    assert "val/gen/unique_pitch" in trainer.callback_metrics

    trainer, module = fit(tmp_path / "off", small_callback(enabled=False), max_epochs=1)
    assert module.calls == []
    assert not (tmp_path / "off" / "samples").exists()
    assert not any(key.startswith("val/gen/") for key in trainer.callback_metrics)


def test_ranks_share_samples_and_validation_phrases_without_overlap():
    callback = small_callback(n_samples=7, batch_size=2)
    module = BareSampler()
    datamodule = TinyPhrases()
    fakes, fake_indices, real_indices = [], [], []
    for rank in range(2):
        callback._real = None
        trainer = SimpleNamespace(global_rank=rank, world_size=2, current_epoch=0, datamodule=datamodule)
        fake, fake_index = callback._generate(trainer, module)
        real, real_index = callback._real_shard(trainer)
        assert torch.equal(unpack_phrases(real), datamodule.phrases[real_index])
        fakes.append(fake)
        fake_indices.append(fake_index)
        real_indices.append(real_index)
    assert [len(f) for f in fakes] == [4, 3]
    assert torch.cat(fake_indices).tolist() == list(range(7))
    assert sorted(torch.cat(real_indices).tolist()) == list(range(40))
    # Different ranks draw from differently seeded generators.
    assert not torch.equal(fakes[0][:3], fakes[1])


def test_missing_val_phrases_and_bad_samples_fail_clearly(tmp_path):
    callback = small_callback()
    trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=0, datamodule=object())
    with pytest.raises(AttributeError, match="val_phrases"):
        callback._real_shard(trainer)

    class WrongShape(BareSampler):
        def sample(self, n, generator):
            return torch.zeros(n, 57, 128, dtype=torch.bool)

    module = WrongShape()
    with pytest.raises(ValueError, match=r"WrongShape.sample returned shape \(24, 57, 128\)"):
        callback._generate(SimpleNamespace(global_rank=0, world_size=1, current_epoch=0), module)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        small_callback(detector=str(tmp_path / "missing.ckpt")).setup(None, None, "fit")


def test_detector_checkpoint_is_loaded_and_scores_with_its_similarity(tmp_path):
    from lightning_modules.loop_detector import LoopDetector

    detector = LoopDetector(similarity="iou")
    with torch.no_grad():
        detector.center.fill_(0.3)
    path = tmp_path / "detector.ckpt"
    torch.save({"state_dict": detector.state_dict(), "hyper_parameters": dict(detector.hparams),
                "pytorch-lightning_version": pl.__version__}, path)
    callback = small_callback(detector=str(path))
    callback.setup(None, None, "fit")
    phrases = torch.rand(5, 128, 57, generator=torch.Generator().manual_seed(2)) < 0.1
    metric = callback.per_phrase["loop_score"]
    metric.update(phrases)
    assert metric.compute().item() == pytest.approx(detector.score_phrases(phrases).mean().item(), rel=1e-6)


@pytest.mark.slow
def test_two_ranks_log_the_metrics_of_all_their_samples(tmp_path):
    callback = small_callback(n_samples=24, n_media=1)
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1,
        num_sanity_val_steps=0, logger=False, callbacks=[callback], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=2, strategy="ddp_spawn",
    )
    trainer.fit(TinyGenerator(), datamodule=TinyPhrases())

    # Each rank drew 12 samples from its own generator; the logged values cover all 24 once.
    fake = torch.cat([torch.rand(12, 128, 57, generator=sampling_generator(3, rank)) < 0.08 for rank in range(2)])
    expected = GenerativeMetrics(n_networks=2, max_samples=100, k=3)
    expected.update(real=TinyPhrases().phrases, fake=fake)
    expected = {f"val/gen/{key}": value.item() for key, value in expected.compute().items()}
    expected["val/gen/unique_pitch"] = unique_pitch(fake).mean().item()
    expected["val/gen/note_density"] = note_density(fake).mean().item()
    logged = {key: value.item() for key, value in trainer.callback_metrics.items() if key.startswith("val/gen/")}
    assert logged == pytest.approx(expected, abs=1e-6)
    assert (tmp_path / "samples" / "epoch=000" / "sample_00.wav").is_file()
