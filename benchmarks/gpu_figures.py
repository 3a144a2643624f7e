"""The loop-generation chain's throughput on one device, at the paper's sizes.

- training steps per second of the VQ-VAE, the LSTM prior and the CNN-VAE at the paper's width
  and batch size (2048), through Lightning with the project's data path (packed phrases unpacked
  on the device), ``--warmup`` untimed steps first;
- loop extraction: phrases scored per second by the detector straight from packed bytes, batches
  of 8,192 copied from host memory as the extraction job does, and the projected time for the
  paper's 5,687,274 phrases;
- P/R/D/C seconds on 10,000 x 10,000 random 128-d features.

The device waits (``synchronize``) only where a timing starts and ends. ``make gpu-check`` runs
this after the ``gpu`` tests. A dry run on the CPU at small sizes checks the script itself:

    python benchmarks/gpu_figures.py                  # CUDA, paper sizes, 16-mixed
    python benchmarks/gpu_figures.py --device cpu --quick
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from benchmarks.train_step import synchronize, synthetic_loops  # noqa: E402
from callbacks.metrics import prdc  # noqa: E402
from datamodules.phrases import PhraseDataModule  # noqa: E402
from datamodules.pianoroll import pack_phrases, write_phrase_cache  # noqa: E402
from lightning_modules.cnn_vae import CNNVAE  # noqa: E402
from lightning_modules.loop_detector import LoopDetector  # noqa: E402
from lightning_modules.prior import LSTMPrior  # noqa: E402
from lightning_modules.vqvae import VQVAE  # noqa: E402

PAPER_PHRASES = 5_687_274
EXTRACTION_BATCH = 8192


class StepClock(pl.Callback):
    """Wall time from the start of training step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device = warmup, device
        self.start = self.end = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            synchronize(self.device)
            self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        synchronize(self.device)
        self.end = time.perf_counter()


class RandomCodes(pl.LightningDataModule):
    """Uniformly random code sequences (N, 32) for the prior; the step cost does not depend on them."""

    def __init__(self, n: int, batch_size: int, num_codes: int = 512):
        super().__init__()
        self.codes = torch.randint(num_codes, (n, 32), generator=torch.Generator().manual_seed(0))
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.codes, batch_size=self.batch_size, shuffle=True, drop_last=True)


def steps_per_second(module: pl.LightningModule, datamodule, steps: int, warmup: int, args) -> float:
    clock = StepClock(warmup, args.device)
    trainer = pl.Trainer(
        accelerator="gpu" if args.device.type == "cuda" else "cpu", devices=1, precision=args.precision,
        max_epochs=1, limit_train_batches=warmup + steps, limit_val_batches=0, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[clock],
    )
    trainer.fit(module, datamodule=datamodule)
    return steps / (clock.end - clock.start)


def training_figures(args, folder: Path) -> dict[str, float]:
    n = (args.steps + args.warmup) * args.batch_size + 1  # one phrase is the (unused) validation split
    packed = pack_phrases(synthetic_loops(min(n, 20_000)))
    packed = np.tile(packed, (-(-n // len(packed)), 1))[:n]
    # one song per phrase: the split by song then holds one phrase out, whatever n is
    write_phrase_cache(folder / "phrases", packed, [f"synthetic_{i}.mid" for i in range(n)], np.zeros(n, np.int64))
    phrases = PhraseDataModule(str(folder / "phrases"), batch_size=args.batch_size, val_fraction=1 / n)
    width = 16 if args.quick else 128
    models = {
        "VQ-VAE": (lambda: VQVAE(channels=width), phrases),
        "LSTM prior": (lambda: LSTMPrior(num_codes=512, hidden=32 if args.quick else 512, layers=1 if args.quick else 4,
                                         first_index_distribution=torch.ones(512)),
                       RandomCodes(n, args.batch_size)),
        "CNN-VAE": (lambda: CNNVAE(channels=width, latent_dim=32 if args.quick else 512), phrases),
    }
    figures = {}
    for name, (build, datamodule) in models.items():
        torch.manual_seed(0)
        figures[f"{name} training steps/s (batch {args.batch_size})"] = steps_per_second(
            build(), datamodule, args.steps, args.warmup, args)
        print(f"{name}: {figures[f'{name} training steps/s (batch {args.batch_size})']:.2f} steps/s", flush=True)
    return figures


def extraction_figure(args) -> float:
    detector = LoopDetector(pretrain_epochs=0, svdd_epochs=1).to(args.device).eval()
    packed = torch.from_numpy(pack_phrases(synthetic_loops(EXTRACTION_BATCH)))
    batches = -(-args.phrases // EXTRACTION_BATCH)
    detector.score_packed(packed.to(args.device))  # warm-up
    synchronize(args.device)
    start = time.perf_counter()
    for _ in range(batches):
        scores = detector.score_packed(packed.to(args.device))
    synchronize(args.device)
    assert torch.isfinite(scores).all()
    return batches * EXTRACTION_BATCH / (time.perf_counter() - start)


def prdc_seconds(args) -> float:
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(args.prdc, 128, generator=generator).to(args.device)
    fake = (torch.randn(args.prdc, 128, generator=generator) * 1.05 + 0.05).to(args.device)
    prdc(real[:100], fake[:100])  # warm-up
    synchronize(args.device)
    start = time.perf_counter()
    values = prdc(real, fake, 5)
    synchronize(args.device)
    assert all(0 <= values[key].item() for key in ("precision", "recall", "coverage"))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, help="Lightning precision (default: 16-mixed on CUDA, 32-true on CPU)")
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=50, help="timed training steps per model")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--phrases", type=int, default=2_000_000, help="phrases scored for the extraction rate")
    parser.add_argument("--prdc", type=int, default=10_000, help="samples per side for P/R/D/C")
    parser.add_argument("--quick", action="store_true", help="small sizes and narrow models: a dry run of the script")
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.steps, args.warmup, args.phrases, args.prdc = 64, 3, 1, 20_000, 1000
    args.device = torch.device(args.device)
    args.precision = args.precision or ("16-mixed" if args.device.type == "cuda" else "32-true")
    name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "CPU"

    with tempfile.TemporaryDirectory() as tmp:
        figures = training_figures(args, Path(tmp))
    rate = extraction_figure(args)
    figures["extraction phrases/s"] = rate
    figures[f"extraction of {PAPER_PHRASES:,} phrases, minutes"] = PAPER_PHRASES / rate / 60
    figures[f"P/R/D/C {args.prdc:,} x {args.prdc:,} x 128, seconds"] = prdc_seconds(args)

    print(f"\nFigures on {name} ({args.precision}{', quick dry run' if args.quick else ''}):")
    for label, value in figures.items():
        print(f"  {label:48s} {value:14,.2f}")


if __name__ == "__main__":
    main()
