"""Benchmarks: patched and unpatched runs alternated in one process, so machine drift cancels.

`patchkit bench kernels`, `sft` and `decode` are in `bench_kernels.py`, `bench_sft.py`, `bench_decode.py`.

`patchkit bench train`: one full fine-tuning step (forward, backward, AdamW) of a Llama-shaped
model. Reports tokens/s and peak resident memory of the process: over the whole step, over
forward+backward (what patchkit changes; AdamW's own temporaries come after), and how much
forward+backward adds on top of what was resident before (weights, optimizer state).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
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


def model_for(arch: str, dims: dict):
    """A random `*ForCausalLM` of architecture `arch` with Llama-style dimensions `dims` (head_dim = hidden / heads)."""
    from patchkit import _resolve

    family = _resolve(arch)[0]
    config = family.config_type()(**{"head_dim": dims["hidden_size"] // dims["num_attention_heads"],
                                     "tie_word_embeddings": False, **dims})
    model_class = family.model_class()
    config._attn_implementation = "sdpa" if getattr(model_class, "_supports_sdpa", True) else "eager"
    torch.manual_seed(0)
    return family.name, model_class(config)


def train(arch: str = "llama", batch: int = 4, seq: int = 512, dims: dict = TRAIN, rounds: int = 4, steps: int = 2,
          progress=None) -> dict:
    name, model = model_for(arch, dims)
    config = model.config
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    tokens = ids.numel()
    n_params = sum(p.numel() for p in model.parameters())
    matmul_params = n_params - model.get_input_embeddings().weight.numel()  # a lookup, not a matmul
    causal_attention = 6 * config.num_hidden_layers * seq * tokens * config.hidden_size
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
        with patchkit.patched(name) if variant == "patched" else contextlib.nullcontext():
            step()
    for round_ in range(rounds):
        for variant in order if round_ % 2 == 0 else order[::-1]:
            with patchkit.patched(name) if variant == "patched" else contextlib.nullcontext():
                for _ in range(steps):
                    step(results[variant])
            if progress:
                progress(f"{name} round {round_ + 1}/{rounds} {variant}: {results[variant]['s'][-1]:.2f} s/step")
    peak_flops = _matmul_flops()
    summary = {"scenario": "train", "arch": name, "tokens_per_step": tokens, "params": n_params,
               "threads": torch.get_num_threads(), "matmul_gflops": peak_flops / 1e9}
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
    lines = [f"| {summary['arch']} train step ({summary['tokens_per_step']} tokens, "
             f"{summary['params'] / 1e6:.0f} M params, {summary['threads']} threads) | unpatched | patched | "
             "patched / unpatched |", "|---|---|---|---|"]
    for label, key, fmt in rows:
        lines.append(f"| {label} | {fmt.format(u[key])} | {fmt.format(p[key])} | {p[key] / u[key]:.2f}x |")
    lines.append(f"\nmatmul measured in the same run: {summary['matmul_gflops']:.0f} GFLOP/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from patchkit import bench_run

    return bench_run.main(argv)


if __name__ == "__main__":
    sys.exit(main())
