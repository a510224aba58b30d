"""The experts' share of a mixture-of-experts training step, unpatched and patched, side by side.

    python benchmarks/experts_share.py [--arch qwen3_moe] [--rounds 3]

At `patchkit bench train`'s shape (2048 tokens, every layer sparse), it times one sparse block's forward and
backward (router and experts) and the whole model's forward and backward, alternating unpatched and patched runs
in one process, and prints the blocks' share (one block's time times the number of layers) of each.
"""

import argparse
import statistics
import time

import torch

import patchkit
from patchkit.bench.models import TRAIN, model_for


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args).float().sum().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="qwen3_moe")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    name, model = model_for(args.arch, TRAIN)
    ids = torch.randint(0, model.config.vocab_size, (4, 512))
    layers = model.model.layers
    block = layers[-1].mlp
    x = torch.randn(4, 512, model.config.hidden_size, requires_grad=True)
    times = {v: {"block": [], "step": []} for v in ("unpatched", "patched")}

    def sparse(x):
        out = block(x)
        return out[0] if isinstance(out, tuple) else out

    for round_ in range(args.rounds + 1):  # the first round warms up
        for variant in ("unpatched", "patched") if round_ % 2 else ("patched", "unpatched"):
            with patchkit.patched(name) if variant == "patched" else torch.enable_grad():
                block_s = _timed(sparse, x)
                step_s = _timed(lambda: model(input_ids=ids, labels=ids).loss)
            model.zero_grad(set_to_none=True)
            if round_:
                times[variant]["block"].append(block_s)
                times[variant]["step"].append(step_s)
    for variant, t in times.items():
        block_s, step_s = statistics.median(t["block"]), statistics.median(t["step"])
        share = block_s * len(layers) / step_s
        print(f"{name} {variant}: sparse block {block_s:.3f} s x {len(layers)} layers of a {step_s:.2f} s "
              f"forward+backward: {share:.0%}")


if __name__ == "__main__":
    main()
