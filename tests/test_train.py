"""train.py end to end: every experiment runs, checkpoints resume, loggers record, DDP works."""
from __future__ import annotations

import csv

import pytest
import torch

from framework.config import CONFIG_DIR, ConfigError
from tests.helpers import QUICK, assert_succeeded, run_torchrun, run_train, run_train_subprocess

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml") if not p.stem.startswith("_"))

# A small, fast experiment that exercises the whole runner.
SMALL = ["experiment=loop_detector", "model.pretrain_epochs=1", "model.svdd_epochs=1", "trainer.accelerator=cpu"]


def experiment_args(name: str, demo_root, tmp_path, request, accelerator: str = "cpu") -> list[str]:
    """Arguments that let ``name`` run on the session's demo data; stages that consume another
    stage's output get it from a fixture."""
    args = [f"experiment={name}", f"paths.demo={demo_root}", f"run_dir={tmp_path / name}",
            f"trainer.accelerator={accelerator}", "trainer.fast_dev_run=true"]
    args += QUICK.get(name, [])
    if name == "extract_loops":
        args += [f"detector={request.getfixturevalue('detector_ckpt')}", f"out={tmp_path / 'loops'}"]
    if name == "prior":
        args += [f"datamodule.codes={request.getfixturevalue('code_cache')}"]
    if name.startswith("mixer"):
        songs = request.getfixturevalue("multitrack_root")
        args += [f"datamodule.root={songs}/multitrack", f"datamodule.cache={songs}/normalised",
                 "datamodule.demo_root=null", "datamodule.segment_seconds=1.5", "datamodule.val_songs=1"]
    return args


def precisions():
    """Every experiment in float32 and in bf16-mixed. On CPUs without native bfloat16 (most x86
    ones) its convolutions are emulated and run about 8x slower than float32, which makes the
    mixers' bf16 runs (long audio convolutions) minutes long: those are marked slow."""
    for name in EXPERIMENTS:
        yield pytest.param(name, "32-true", id=f"{name}-32-true")
        yield pytest.param(name, "bf16-mixed", id=f"{name}-bf16-mixed",
                           marks=[pytest.mark.slow] if name.startswith("mixer") else [])


@pytest.mark.parametrize(("name", "precision"), precisions())
def test_every_experiment_passes_fast_dev_run(name, precision, demo_root, tmp_path, request):
    trainer, *_ = run_train([*experiment_args(name, demo_root, tmp_path, request), f"trainer.precision={precision}"])
    assert trainer.state.finished
    assert trainer.precision == precision
    assert all(torch.isfinite(value).all() for value in trainer.callback_metrics.values())


def test_batchnorm_sync_is_a_switch_that_needs_gpus(tmp_path):
    with pytest.raises(ConfigError, match="sync_batchnorm=true needs GPUs"):
        run_train([*SMALL, "trainer.sync_batchnorm=true", f"run_dir={tmp_path}"])


def test_misspelt_key_fails_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="max_epochs"):
        run_train([*SMALL, "trainer.max_epoch=1", f"run_dir={tmp_path}"])
    assert not any(tmp_path.iterdir())


def test_wandb_offline_run_records_metrics_and_checkpoint_carries_config(demo_root, tmp_path):
    trainer, module, _, cfg = run_train([*SMALL, f"paths.demo={demo_root}", f"run_dir={tmp_path}"])
    run = trainer.logger.experiment
    summary = dict(run.summary)
    assert any(key.startswith("train/") for key in summary), summary.keys()
    assert (tmp_path / "wandb").is_dir() and list((tmp_path / "wandb").glob("offline-run-*"))
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["config"]["experiment"] == "loop_detector"
    assert checkpoint["config"]["run_dir"] == str(tmp_path)
    assert (tmp_path / "config.yaml").is_file()


def test_csv_logger_writes_slash_namespaced_metrics(demo_root, tmp_path):
    run_train([*SMALL, "logger=csv", f"paths.demo={demo_root}", f"run_dir={tmp_path}"])
    with open(tmp_path / "csv" / "metrics.csv") as handle:
        columns = next(csv.reader(handle))
    namespaced = [c for c in columns if "/" in c]
    assert namespaced and all(c.split("/")[0] in ("train", "val", "test", "lr-AdamW") for c in namespaced), columns


@pytest.mark.slow
def test_resume_from_last_checkpoint_continues_at_saved_step(demo_root, tmp_path):
    first, *_ = run_train([*SMALL, "logger=none", f"paths.demo={demo_root}", f"run_dir={tmp_path / 'a'}"])
    saved = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == first.global_step > 0
    resumed, *_ = run_train([
        "experiment=loop_detector", "model.pretrain_epochs=1", "model.svdd_epochs=2", "trainer.accelerator=cpu",
        "logger=none", f"paths.demo={demo_root}", f"run_dir={tmp_path / 'b'}",
        f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}",
    ])
    per_epoch = first.global_step // 2
    assert resumed.current_epoch == 3
    assert resumed.global_step == saved["global_step"] + per_epoch


@pytest.mark.slow
def test_two_process_ddp_run_shares_rank_zeros_run_dir(demo_root, tmp_path):
    # A microsecond timestamp would differ between the ranks if each stamped its own run directory.
    run_train_subprocess([*SMALL[:-1], "logger=csv", f"paths.demo={demo_root}", f"run_dir={tmp_path}/stamp-${{now:%f}}"])
    (run_dir,) = tmp_path.glob("stamp-*")
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["config"]["trainer"]["devices"] == 2
    assert checkpoint["global_step"] > 0


@pytest.mark.slow
def test_torchrun_job_shares_rank_zeros_run_dir_and_draws_noise_per_rank(demo_root, tmp_path):
    # As with Lightning's own launcher, a microsecond stamp would differ between the ranks.
    assert_succeeded(run_torchrun([*SMALL[:-1], "logger=csv", f"paths.demo={demo_root}",
                                   f"run_dir={tmp_path}/stamp-${{now:%f}}", "+callbacks.noise._target_=tests.helpers.RecordNoise"]))
    (run_dir,) = tmp_path.glob("stamp-*")
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["config"]["run_dir"] == str(run_dir) and checkpoint["global_step"] > 0
    # Training noise (dropout, a VAE's reparameterisation) differs between the ranks.
    noise = [torch.load(run_dir / f"noise-rank{rank}.pt") for rank in range(2)]
    assert not torch.equal(noise[0], noise[1])


@pytest.mark.slow
def test_a_killed_rank_fails_the_whole_torchrun_job(demo_root, tmp_path):
    result = run_torchrun([*SMALL[:-1], "model.pretrain_epochs=3", "logger=none", f"paths.demo={demo_root}",
                           f"run_dir={tmp_path}", "datamodule.batch_size=16", "+callbacks.kill._target_=tests.helpers.KillRank"],
                          timeout=300)
    assert result.returncode != 0
    assert "SIGKILL" in result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mixer", "mixer_wave_u_net", "mixer_pretrain"])
def test_mixers_and_pretraining_train_on_two_processes_with_an_uneven_epoch(name, multitrack_root, tmp_path):
    """Plain DDP (no unused-parameter search) on two gloo ranks; 5 segments per epoch give each rank
    3 batches of one, where an uneven split would leave one rank waiting for the other."""
    from datamodules.multitrack import MultitrackDataModule

    data = [f"datamodule.root={multitrack_root}/multitrack", f"datamodule.cache={multitrack_root}/normalised",
            "datamodule.demo_root=null", "datamodule.segment_seconds=1.5", "datamodule.val_songs=1"]
    MultitrackDataModule(root=f"{multitrack_root}/multitrack", cache=f"{multitrack_root}/normalised",
                         demo_root=None, val_songs=1).prepare_data()  # once, before the ranks start
    stages = "stages=[fit,test]" if name == "mixer" else "stages=[fit]"  # one test song for two ranks
    run_train_subprocess([f"experiment={name}", *data, f"run_dir={tmp_path}", "logger=csv", stages,
                          "datamodule.segments_per_epoch=5", "datamodule.batch_size=1", "datamodule.num_workers=0",
                          "trainer.max_epochs=1", "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0"])
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 3
    if name == "mixer":
        with open(tmp_path / "csv" / "metrics.csv") as handle:
            rows = list(csv.DictReader(handle))
        assert any(row.get("test/mix/mape_mean") for row in rows) and any(row.get("test/mix/sum/mape_mean") for row in rows)
