"""The path users take: training and validation-time metrics on CUDA, on one GPU and on two.

Every test here is marked ``gpu`` and skipped without CUDA; ``make gpu-check`` runs them with the
GPU benchmark figures. The CPU suite covers the same classes of defect on the meta device
(tests/test_devices.py) and with gloo processes.
"""
from __future__ import annotations

import pytest
import torch

from callbacks.metrics import GenerativeMetrics, LoopScore, prdc
from lightning_modules.cnn_vae import CNNVAE
from lightning_modules.loop_detector import LoopDetector
from lightning_modules.prior import LSTMPrior
from lightning_modules.vqvae import VQVAE
from tests.helpers import assert_succeeded, run_torchrun, run_train, run_train_subprocess
from tests.test_generation_callback import TinyPhrases, fit, small_callback
from tests.test_train import EXPERIMENTS, SMALL, experiment_args
from tests.test_vqvae import loop_phrases

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_passes_fast_dev_run_on_cuda_in_16_mixed(name, demo_root, tmp_path, request):
    args = experiment_args(name, demo_root, tmp_path, request, accelerator="gpu")
    trainer, module, *_ = run_train([*args, "trainer.devices=1", "trainer.precision=16-mixed"])
    assert trainer.state.finished and trainer.precision == "16-mixed"
    assert next(module.parameters()).is_cuda
    assert all(torch.isfinite(value).all() for value in trainer.callback_metrics.values())


@pytest.mark.parametrize("model", ["vqvae", "cnn_vae", "prior"])
def test_training_steps_never_wait_for_the_device(model):
    """Per-step code with CUDA's sync debugging set to fail on any device-to-host wait."""
    if model == "vqvae":
        module, batch = VQVAE(channels=32), loop_phrases(64).float()
    elif model == "cnn_vae":
        module, batch = CNNVAE(channels=32, latent_dim=64), loop_phrases(64).float()
    else:
        module, batch = LSTMPrior(num_codes=512, hidden=64, layers=2), torch.randint(512, (64, 32))
    module.to(CUDA).train()
    batch = batch.to(CUDA)

    def step():
        if model == "vqvae":
            loss = module._loss(batch)[0]
        elif model == "cnn_vae":
            bce, kl, _ = module._losses(batch)
            loss = bce + kl
        else:
            loss = torch.nn.functional.cross_entropy(*module._next_index_logits(batch))
        loss.backward()

    step()  # the first step may read state once (the codebook's step counter)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_generation_callback_computes_on_the_gpu(tmp_path):
    detector = LoopDetector(pretrain_epochs=0, svdd_epochs=1)
    detector.center.copy_(torch.linspace(-0.5, 0.5, 7))
    callback = small_callback(detector=detector)
    trainer, module = fit(tmp_path, callback, accelerator="gpu")
    assert module.device.type == "cuda"
    metrics = {key: value for key, value in trainer.callback_metrics.items() if key.startswith("val/gen/")}
    assert "val/gen/loop_score" in metrics and all(torch.isfinite(v) for v in metrics.values())
    assert all(state.device.type == "cuda" for state in callback.per_phrase["loop_score"].detector.buffers())


def test_metrics_on_the_gpu_equal_the_cpu():
    detector = LoopDetector(pretrain_epochs=0, svdd_epochs=1)
    detector.center.copy_(torch.linspace(-0.5, 0.5, 7))
    phrases, real = loop_phrases(200, seed=1), TinyPhrases().phrases.repeat(5, 1, 1)
    values = {}
    for device in ("cpu", "cuda"):
        loop_score = LoopScore(detector).to(device)
        loop_score.update(phrases.to(device))
        generative = GenerativeMetrics(n_networks=2, max_samples=100, k=3).to(device)
        generative.update(real=real.to(device), fake=phrases.to(device))
        features = torch.randn(4000, 128, generator=torch.Generator().manual_seed(0)).to(device)
        values[device] = {"loop_score": loop_score.compute().item(),
                          **{k: v.item() for k, v in generative.compute().items()},
                          **{f"features_{k}": v.item() for k, v in prdc(features[:2000], features[2000:], 5).items()}}
    assert values["cuda"] == pytest.approx(values["cpu"], rel=1e-4, abs=1e-6)


@two_gpus
def test_two_gpu_ddp_with_synchronised_batchnorm(demo_root, tmp_path):
    run_train_subprocess(["experiment=vqvae", f"paths.demo={demo_root}", f"run_dir={tmp_path}", "logger=csv",
                          "trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
                          "datamodule.batch_size=256", "model.channels=32", "trainer.sync_batchnorm=true",
                          "trainer.precision=16-mixed"], accelerator="gpu")
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 4


@two_gpus
def test_two_gpu_torchrun_job(demo_root, tmp_path):
    assert_succeeded(run_torchrun([*SMALL[:-1], "logger=none", f"paths.demo={demo_root}", f"run_dir={tmp_path}"],
                                  accelerator="gpu"))
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
