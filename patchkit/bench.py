"""Benchmarks: patched and unpatched runs alternated in one process, so machine drift cancels.

`patchkit bench kernels`, `sft` and `decode` are in `bench_kernels.py`, `bench_sft.py`, `bench_decode.py`.

`patchkit bench train`: one full fine-tuning step (forward, backward, AdamW) of a Llama-shaped
model. Reports tokens/s and peak resident memory of the process: over the whole step, over
forward+backward (what patchkit changes; AdamW's own temporaries come after), and how much
forward+backward adds on top of what was resident before (weights, optimizer state).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import statistics
import sys
import time

import torch

import patchkit

TRAIN = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=1408, vocab_size=128256, max_position_embeddings=2048)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> int:
    """Release free heap to the OS, reset the peak-RSS mark; return the resident bytes now."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _matmul_flops() -> float:
    a, b = torch.randn(2048, 512), torch.randn(512, 16384)
    a @ b
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 2048 * 512 * 16384 / (time.perf_counter() - start)


def train(args) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**TRAIN, "vocab_size": args.vocab})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    tokens = ids.numel()
    n_params = sum(p.numel() for p in model.parameters())
    matmul_params = n_params - model.get_input_embeddings().weight.numel()  # a lookup, not a matmul
    causal_attention = 6 * config.num_hidden_layers * args.seq * tokens * config.hidden_size
    flops_per_step = 6 * matmul_params * tokens + causal_attention

    def step(record=None):
        """One training step; with `record`, the time and the peak RSS of forward+backward and of the optimizer."""
        before = _reset_peak()
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        seconds = time.perf_counter() - start
        model_peak = _status("VmHWM")
        _reset_peak()
        start = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - start
        if record is not None:
            record["s"].append(seconds)
            record["peak"].append(max(model_peak, _status("VmHWM")))
            record["model_peak"].append(model_peak)
            record["model_added"].append(model_peak - before)

    results = {v: {"s": [], "peak": [], "model_peak": [], "model_added": []} for v in ("unpatched", "patched")}
    order = ["unpatched", "patched"]
    for variant in order:  # warm-up: allocator, optimizer state, one step each
        with patchkit.patched("llama") if variant == "patched" else contextlib.nullcontext():
            step()
    for round_ in range(args.rounds):
        for variant in order if round_ % 2 == 0 else order[::-1]:
            with patchkit.patched("llama") if variant == "patched" else contextlib.nullcontext():
                for _ in range(args.steps):
                    step(results[variant])
            print(f"  round {round_ + 1}/{args.rounds} {variant}: {results[variant]['s'][-1]:.2f} s/step",
                  file=sys.stderr)
    peak_flops = _matmul_flops()
    summary = {"scenario": "train", "tokens_per_step": tokens, "params": n_params, "threads": torch.get_num_threads(),
               "matmul_gflops": peak_flops / 1e9}
    for variant, r in results.items():
        s = statistics.median(r["s"])
        memory = {f"{k}_gib": statistics.median(r[k]) / 2**30 for k in ("peak", "model_peak", "model_added")}
        summary[variant] = {"s_per_step": s, "tokens_per_s": tokens / s, "mfu": flops_per_step / s / peak_flops,
                            **memory}
    u, p = summary["unpatched"], summary["patched"]
    summary["speedup"] = p["tokens_per_s"] / u["tokens_per_s"]
    for k in ("peak", "model_peak", "model_added"):
        summary[f"{k}_ratio"] = p[f"{k}_gib"] / u[f"{k}_gib"]
    return summary


def report(summary: dict) -> str:
    u, p = summary["unpatched"], summary["patched"]
    rows = [("tokens/s", "tokens_per_s", "{:.0f}"), ("s/step", "s_per_step", "{:.2f}"),
            ("MFU vs measured matmul", "mfu", "{:.0%}"),
            ("peak RSS, whole step (GiB)", "peak_gib", "{:.2f}"),
            ("peak RSS, forward+backward (GiB)", "model_peak_gib", "{:.2f}"),
            ("forward+backward memory above weights+optimizer state (GiB)", "model_added_gib", "{:.2f}")]
    lines = [f"| train step ({summary['tokens_per_step']} tokens, {summary['params'] / 1e6:.0f} M params, "
             f"{summary['threads']} threads) | unpatched | patched | patched / unpatched |", "|---|---|---|---|"]
    for label, key, fmt in rows:
        lines.append(f"| {label} | {fmt.format(u[key])} | {fmt.format(p[key])} | {p[key] / u[key]:.2f}x |")
    lines.append(f"\nmatmul measured in the same run: {summary['matmul_gflops']:.0f} GFLOP/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="patchkit bench")
    parser.add_argument("scenario", choices=["train", "sft", "kernels", "decode"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=TRAIN["vocab_size"])
    parser.add_argument("--rounds", type=int, default=4, help="alternations of unpatched and patched")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    parser.add_argument("--only", choices=["lora", "full"], help="sft: one fine-tuning scenario")
    parser.add_argument("--device", help="kernels: cuda or cpu (default: cuda if there is one)")
    parser.add_argument("--dtype", help="kernels: float32 or bfloat16 (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--sizes", nargs="+", default=["20M", "125M"], help="decode: model sizes (20M, 125M)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="decode: batch sizes")
    parser.add_argument("--new-tokens", type=int, default=128, help="decode: tokens generated per row")
    parser.add_argument("--json", help="also write the summary as JSON to this path")
    args = parser.parse_args(argv)
    if args.scenario == "kernels":
        from patchkit import bench_kernels

        summary = bench_kernels.run(args.device, args.dtype, reps=args.rounds)
        print(bench_kernels.report(summary))
    elif args.scenario == "decode":
        from patchkit import bench_decode

        summary = bench_decode.run(sizes=args.sizes, batches=args.batches, new=args.new_tokens, rounds=args.rounds,
                                   progress=lambda line: print(" ", line, file=sys.stderr))
        print(bench_decode.report(summary))
    elif args.scenario == "sft":
        from patchkit import bench_sft

        summary = bench_sft.run(steps=args.steps, rounds=args.rounds, batch=args.batch, seq=args.seq,
                                scenarios=(args.only,) if args.only else ("lora", "full"),
                                progress=lambda line: print(" ", line, file=sys.stderr))
        print(bench_sft.report(summary))
    else:
        summary = train(args)
        print(report(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
