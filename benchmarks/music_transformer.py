"""Music Transformer sampling: one cached step per position vs re-running the whole prefix each step.

``python benchmarks/music_transformer.py [--n 64] [--hidden 128] [--layers 4] [--device cpu]``

Ours: :meth:`MusicTransformer.sample`, where every new step attends to the keys and values cached
from the earlier ones (:class:`~lightning_modules.nets.relative_attention.KeyValueCache`). Reference:
the sampler written without a cache, which runs the full causal forward over the prefix generated
so far to get each next step - the obvious loop, O(L^2) layer passes per phrase instead of O(L).
Both start from the same first steps and use the same uniforms (drawn from identically seeded
generators), so they must produce the same phrases up to rare cells whose uniform lies within float
rounding of their probability. Throughput is compared in phrases per second; the ratio is printed last.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.generate import timed  # noqa: E402
from lightning_modules.music_transformer import MusicTransformer  # noqa: E402
from lightning_modules.vqvae import PHRASE_COLUMNS, PHRASE_STEPS  # noqa: E402


@torch.no_grad()
def sample_without_cache(model: MusicTransformer, n: int, generator: torch.Generator) -> torch.Tensor:
    """The reference: the same draws as ``model.sample(n, generator)``, each step from a full forward."""
    device = model.first_steps.device
    first = torch.multinomial(model.first_step_counts, n, replacement=True, generator=generator)
    phrases = torch.zeros(n, PHRASE_STEPS, PHRASE_COLUMNS, dtype=torch.bool, device=device)
    phrases[:, 0] = model.first_steps[first].bool()
    for position in range(1, PHRASE_STEPS):
        logits = model.net(phrases[:, :position].float())[:, -1]
        uniforms = torch.rand(logits.shape, generator=generator, device=device)
        phrases[:, position] = uniforms < torch.sigmoid(logits / model.hparams.sample_temperature)
    return phrases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=64, help="phrases sampled by each method, in one batch")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = MusicTransformer(hidden=args.hidden, layers=args.layers, sample_batch_size=args.n).to(args.device).eval()
    model.set_first_steps(torch.rand(64, PHRASE_COLUMNS) < 0.1)
    with torch.no_grad():  # a head biased towards sparse steps, as a trained model's is
        model.net.head.bias.fill_(-3.0)

    def generator() -> torch.Generator:
        return torch.Generator(args.device).manual_seed(1)

    ours, ours_seconds = timed(lambda: model.sample(args.n, generator()))
    reference, reference_seconds = timed(lambda: sample_without_cache(model, args.n, generator()))
    differing = (ours != reference).float().mean().item()
    if differing > 1e-4:
        raise AssertionError(f"cached and uncached sampling disagree on {differing:.2%} of the cells")
    print(f"model: hidden {args.hidden}, {args.layers} layers; {args.n} phrases of {PHRASE_STEPS} steps on "
          f"{args.device}; cells that differ: {differing:.1e}")
    print(f"cached (ours):       {ours_seconds:7.2f} s  {args.n / ours_seconds:8.1f} phrases/s")
    print(f"full prefix (ref.):  {reference_seconds:7.2f} s  {args.n / reference_seconds:8.1f} phrases/s")
    print(f"speed-up: {reference_seconds / ours_seconds:.1f}x")


if __name__ == "__main__":
    main()
