"""VQ-VAE training throughput: Lightning vs a bare PyTorch loop, same model, optimiser, data and steps.

Both runs train identical copies of one VQVAE for one epoch over the same synthetic phrase cache
(bit-packed, unpacked on the device per batch, as PhraseDataModule does), in the same shuffle
order, and must end with the same weights and codebook. Lightning runs with a CSV logger and the
module's own logging, no checkpointing and no progress bar. The first ``--warmup`` steps of each
epoch are not timed; each loop's fastest of ``--repeats`` epochs (run in alternating order) is
kept, which damps the noise of a shared machine. The last line is Lightning's overhead: its time
per step relative to the bare loop's.

    python benchmarks/train_step.py                                  # small CPU default
    python benchmarks/train_step.py --device cuda --phrases 16384 --batch-size 2048 --channels 128
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.loggers import CSVLogger  # noqa: E402

from datamodules.phrases import PhraseDataModule  # noqa: E402
from datamodules.pianoroll import pack_phrases, unpack_phrases, write_phrase_cache  # noqa: E402
from lightning_modules.vqvae import VQVAE  # noqa: E402


def synthetic_loops(n: int, seed: int = 0) -> np.ndarray:
    """``n`` bool loop phrases (n, 128, 57): a random bar (drum hits, one bass note per beat) tiled 8 times."""
    rng = np.random.default_rng(seed)
    bars = np.zeros((n, 16, 57), dtype=bool)
    bars[:, :, :9] = rng.random((n, 16, 9)) < 0.25
    pitch = np.repeat(rng.integers(9, 57, size=(n, 4)), 4, axis=1)
    np.put_along_axis(bars, pitch[:, :, None], True, axis=2)
    return np.tile(bars, (1, 8, 1))


class StepTimer(pl.Callback):
    """Wall time from the start of training step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device = warmup, device
        self.start = self.end = 0.0
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            synchronize(self.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))  # the bare loop reads its loss too
        synchronize(self.device)
        self.end = time.perf_counter()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lightning_epoch(model: VQVAE, datamodule: PhraseDataModule, device: torch.device, warmup: int, log_dir: str):
    timer = StepTimer(warmup, device)
    trainer = pl.Trainer(
        accelerator=device.type, devices=1, max_epochs=1, logger=CSVLogger(log_dir), log_every_n_steps=10,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer],
    )
    torch.manual_seed(1)  # shuffle order
    trainer.fit(model, datamodule=datamodule)
    return timer.end - timer.start, timer.losses


def bare_epoch(model: VQVAE, datamodule: PhraseDataModule, device: torch.device, warmup: int):
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=model.hparams.lr, weight_decay=model.hparams.weight_decay)
    losses, start = [], 0.0
    torch.manual_seed(1)  # shuffle order
    for step, packed in enumerate(datamodule.train_dataloader()):
        batch = unpack_phrases(packed.to(device)).float()
        if step == warmup:
            synchronize(device)
            start = time.perf_counter()
        loss, _, _ = model._loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    synchronize(device)
    return time.perf_counter() - start, losses


def assert_same_training(bare: VQVAE, bare_losses: list[float], lightning: VQVAE, lightning_losses: list[float]) -> None:
    """Both loops saw the same batches in the same order and ended with the same weights and codebook."""
    np.testing.assert_allclose(lightning_losses, bare_losses, rtol=1e-5)
    lightning_state = lightning.state_dict()
    for name, value in bare.state_dict().items():
        torch.testing.assert_close(lightning_state[name], value, rtol=1e-4, atol=1e-5, msg=f"{name} differs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phrases", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--channels", type=int, default=128, help="the paper's width; smaller widths make steps so short that a fixed per-step cost dominates")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each epoch")
    parser.add_argument("--repeats", type=int, default=3, help="epochs timed per loop (the fastest is kept)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    steps = -(-args.phrases // args.batch_size)
    if steps <= args.warmup:
        parser.error(f"{steps} steps per epoch leave none to time after {args.warmup} warm-up steps")

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "phrases"
        packed = pack_phrases(synthetic_loops(args.phrases + 1))  # one phrase (song) is the unused validation split
        write_phrase_cache(cache, packed, [f"synthetic/{i:06d}.mid" for i in range(len(packed))], np.zeros(len(packed), int))
        datamodule = PhraseDataModule(str(cache), batch_size=args.batch_size, val_fraction=1 / len(packed))
        datamodule.setup("fit")

        torch.manual_seed(0)
        reference = VQVAE(channels=args.channels)
        times: dict[str, list[float]] = {"bare": [], "lightning": []}
        for repeat in range(args.repeats):  # alternate which loop goes first
            models = {name: copy.deepcopy(reference) for name in times}
            losses = {}
            for name in (("bare", "lightning") if repeat % 2 == 0 else ("lightning", "bare")):
                if name == "bare":
                    elapsed, losses[name] = bare_epoch(models[name], datamodule, device, args.warmup)
                else:
                    elapsed, losses[name] = lightning_epoch(models[name], datamodule, device, args.warmup, tmp)
                times[name].append(elapsed)
            assert_same_training(models["bare"], losses["bare"], models["lightning"].to(device), losses["lightning"])

    bare_time, lightning_time = min(times["bare"]), min(times["lightning"])
    timed = steps - args.warmup
    samples = args.phrases - args.warmup * args.batch_size
    print(f"{timed} timed steps of {args.batch_size} phrases on {device}, channels {args.channels}, "
          f"fastest of {args.repeats} epochs per loop")
    print(f"bare PyTorch loop: {samples / bare_time:,.0f} samples/s ({bare_time / timed * 1e3:.1f} ms/step)")
    print(f"Lightning        : {samples / lightning_time:,.0f} samples/s ({lightning_time / timed * 1e3:.1f} ms/step)")
    print(f"Lightning overhead (time ratio Lightning / bare): {lightning_time / bare_time:.3f}")


if __name__ == "__main__":
    main()
