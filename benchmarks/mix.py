"""Mixer speed: real-time factor of chunked inference, and Lightning's training overhead.

    python benchmarks/mix.py [--seconds 20] [--steps 12]

1. ``mix_song`` (the inference of ``mix.py``, effect normalisation excluded) with the full-size
   proposed network on synthetic 44.1 kHz stems: real-time factor (processing time / audio
   duration) on CPU, and on CUDA when available; the CPU and GPU mixes must agree.
2. Training samples/s of a reduced mixer through ``pl.Trainer.fit`` versus a bare PyTorch loop doing
   the same steps (same initial weights, data order, AMSGrad Adam, L2 clipping at 0.2) in this
   process; both must end with the same weights. The last line is Lightning's overhead ratio
   (Lightning time / bare time), target <= 1.10.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_modules.mixer import AutoMixer, mix_song  # noqa: E402

SR = 44100
TRAIN_NET = {"filters": 32, "kernel_size": 64, "envelope_kernel": 128, "pool": 64, "bottleneck": 64,
             "hidden": 32, "skip": 16, "repeats": 1, "blocks": 6, "lstm_layers": 1, "se_hidden": 256}


def inference_rtf(seconds: float, device: str) -> tuple[float, np.ndarray]:
    torch.manual_seed(0)
    model = AutoMixer().to(device)
    stems = np.random.default_rng(0).standard_normal((8, int(seconds * SR))).astype(np.float32) * 0.05
    mix_song(model, stems[:, :SR], SR, chunk_seconds=1.0, overlap_seconds=0.25, progress=False)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    mix = mix_song(model, stems, SR, chunk_seconds=10.0, overlap_seconds=1.0, progress=False)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / seconds, mix


def training_data(steps: int, batch_size: int = 4, seconds: float = 2.0) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    stems = torch.randn(steps * batch_size, 8, int(seconds * SR), generator=generator) * 0.05
    mixture = torch.tanh(stems.unflatten(1, (4, 2)).sum(1))
    return DataLoader(TensorDataset(stems, mixture), batch_size=batch_size, shuffle=False)


def bare_training(model: AutoMixer, data: DataLoader) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=model.hparams.lr,
                                 weight_decay=model.hparams.weight_decay, amsgrad=True)
    model.train()
    start = time.perf_counter()
    for batch in data:
        loss, _ = model._step(batch)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.2)
        optimizer.step()
    return time.perf_counter() - start


def lightning_training(model: AutoMixer, data: DataLoader) -> float:
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         gradient_clip_val=0.2, gradient_clip_algorithm="norm")
    start = time.perf_counter()
    trainer.fit(model, data)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="audio length for the RTF")
    parser.add_argument("--steps", type=int, default=12, help="training steps per method")
    args = parser.parse_args()

    rtf_cpu, mix_cpu = inference_rtf(args.seconds, "cpu")
    print(f"inference RTF on CPU ({torch.get_num_threads()} threads, full model, "
          f"{args.seconds:.0f} s): {rtf_cpu:.3f}")
    if torch.cuda.is_available():
        rtf_gpu, mix_gpu = inference_rtf(args.seconds, "cuda")
        difference = np.abs(mix_gpu - mix_cpu).max()
        assert difference < 1e-2, f"CPU and GPU mixes differ by {difference}"
        print(f"inference RTF on {torch.cuda.get_device_name()}: {rtf_gpu:.4f} "
              f"(max |CPU - GPU| = {difference:.1e})")

    torch.manual_seed(0)
    reference = AutoMixer(net=TRAIN_NET, sample_rate=SR)
    data = training_data(args.steps)
    warm_up = copy.deepcopy(reference)
    bare_training(warm_up, training_data(1))
    bare_model, lightning_model = copy.deepcopy(reference), copy.deepcopy(reference)
    bare_seconds = bare_training(bare_model, data)
    lightning_seconds = lightning_training(lightning_model, data)
    for (name, bare), lightning in zip(bare_model.state_dict().items(),
                                       lightning_model.state_dict().values()):
        assert torch.allclose(bare, lightning, atol=1e-5), f"{name} differs after training"
    samples = len(data.dataset)
    print(f"training, bare PyTorch: {samples / bare_seconds:.2f} samples/s ({bare_seconds:.1f} s)")
    print(f"training, Lightning:    {samples / lightning_seconds:.2f} samples/s ({lightning_seconds:.1f} s)")
    print(f"Lightning / bare training time: {lightning_seconds / bare_seconds:.3f}")


if __name__ == "__main__":
    main()
