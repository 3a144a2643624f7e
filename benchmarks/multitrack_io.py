"""Training data rate of the MultitrackDataModule: examples/s of 10 s segments (8 + 2 channels).

    python benchmarks/multitrack_io.py [--songs 3] [--seconds 240] [--batches 40] [--data data/bench_multitrack]

The demo's wet multitrack songs are tiled to MUSDB18-HQ's song length (about 4 minutes) and cached
in the DataModule's layout (one memory-mapped (10, n) float32 array per song; effect normalisation
is skipped, it does not change what is read). The DataModule's training loader, with its default
workers and batch size 4, is timed after its workers have started. In the same run the reference is
the previous data path: five float WAVs per song read with soundfile per example (segment and
silence check as before), timed with the same workers and with none (its old default). The
authors' GPU consumed about 3 examples/s (batches of 4, 1,600 batches in about 35 minutes). The
CPU time per example of both paths in one process is printed too: wall-clock rates on a shared
machine mostly measure the other load. The last line is our examples/s; the target on two CPU
cores is at least 30. Timings are of the page
cache when the songs fit in memory, as they do here; a cold disk adds its read time (17.6 MB per
example).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from datamodules.demo.multitrack import write_multitrack_demo  # noqa: E402
from datamodules.fxnorm.songs import MIXTURE, STEMS, list_songs, read_song, write_song  # noqa: E402
from datamodules.multitrack import (EpochKeys, MultitrackDataModule, default_workers,  # noqa: E402
                                    write_packed_song)

SR = 44100
BATCH = 4
AUTHORS_EXAMPLES_PER_SECOND = 4 * 1600 / (35 * 60)


def build(data: Path, songs: int, seconds: float) -> None:
    """Wet demo songs tiled to ``seconds``, as per-stem float WAVs and in the DataModule's cache."""
    if (data / "ready").is_file():
        return
    write_multitrack_demo(data / "demo", seed=0, n_train=songs, n_test=0, n_dry=0, seconds=(30.0, 40.0))
    for folder in list_songs(data / "demo" / "multitrack" / "train"):
        stems, _ = read_song(folder, (*STEMS, MIXTURE))
        length = int(seconds * SR)
        tiled = {name: np.tile(audio, (1, -(-length // audio.shape[1])))[:, :length] for name, audio in stems.items()}
        write_song(data / "root" / "train" / folder.name, tiled, SR)
        write_packed_song(data / "root_fxnorm" / "train" / folder.name, tiled, SR)
    (data / "ready").touch()


class WavSegments(Dataset):
    """The previous data path: a random 10 s segment read from five WAV files per example."""

    def __init__(self, folders: list[Path], segment: int, seed: int = 0):
        self.folders, self.segment, self.seed = folders, segment, seed
        self.lengths = [sf.info(str(folder / "mixture.wav")).frames for folder in folders]

    def __getitem__(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(key)])
        while True:
            index = int(rng.integers(len(self.folders)))
            start = int(rng.integers(self.lengths[index] - self.segment + 1))
            audio = [sf.read(str(self.folders[index] / f"{name}.wav"), start=start, stop=start + self.segment,
                             dtype="float32", always_2d=True)[0].T for name in (*STEMS, MIXTURE)]
            stems, mixture = np.concatenate(audio[:-1]), np.ascontiguousarray(audio[-1])
            if np.abs(stems).max() > 10 ** (-50 / 20) and np.abs(mixture).max() > 10 ** (-50 / 20):
                return torch.from_numpy(stems), torch.from_numpy(mixture)


def cpu_per_example(dataset: Dataset, count: int) -> float:
    """CPU milliseconds this process spends per example (less sensitive to other load than wall time)."""
    dataset[count]  # open files, fault in code paths
    start = time.process_time()
    for key in range(count):
        dataset[key]
    return 1000 * (time.process_time() - start) / count


def rate(loader: DataLoader, batches: int, warmup: int = 3) -> float:
    """Examples per second over ``batches`` batches, after ``warmup`` batches (workers started)."""
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        stems, mixture = next(iterator)
        assert stems.shape == (BATCH, 8, 10 * SR) and mixture.shape == (BATCH, 2, 10 * SR)
    return batches * BATCH / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--songs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=240.0, help="song length (MUSDB18-HQ: about 4 minutes)")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--data", type=Path, default=Path("data/bench_multitrack"))
    args = parser.parse_args()
    build(args.data, args.songs, args.seconds)

    datamodule = MultitrackDataModule(root=str(args.data / "root"), segment_seconds=10.0, batch_size=BATCH,
                                      val_songs=0, segments_per_epoch=BATCH * (args.batches + 10), demo_root=None)
    datamodule.setup("fit")
    workers = default_workers()
    ours = rate(datamodule.train_dataloader(), args.batches)

    folders = list_songs(args.data / "root" / "train")
    reference = WavSegments(folders, 10 * SR)
    keys = EpochKeys(BATCH * (args.batches + 10))
    previous = {count: rate(DataLoader(reference, batch_size=BATCH, sampler=keys, num_workers=count, drop_last=True),
                            args.batches) for count in (0, workers)}

    ours_cpu, previous_cpu = cpu_per_example(datamodule.train_set, 20), cpu_per_example(reference, 20)

    print(f"{args.songs} songs of {args.seconds:.0f} s, batches of {BATCH} x 10 s (8 + 2 channels, float32)")
    print(f"CPU time per example in one process: {ours_cpu:.1f} ms, previous path {previous_cpu:.1f} ms "
          f"({previous_cpu / ours_cpu:.1f} x)")
    print(f"previous path, five WAV reads per example, 0 workers:  {previous[0]:7.1f} examples/s")
    print(f"previous path, five WAV reads per example, {workers} workers:  {previous[workers]:7.1f} examples/s")
    print(f"the authors' GPU consumed about {AUTHORS_EXAMPLES_PER_SECOND:.1f} examples/s; target here: >= 30")
    print(f"MultitrackDataModule training loader ({workers} workers, the default): {ours:.1f} examples/s")


if __name__ == "__main__":
    main()
