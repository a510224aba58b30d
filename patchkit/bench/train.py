"""`patchkit bench train`: one full fine-tuning step (forward, backward, AdamW) of a Llama-shaped
model. Reports tokens/s and peak resident memory of the process: over the whole step, over
forward+backward (what patchkit changes; AdamW's own temporaries come after), and how much
forward+backward adds on top of what was resident before (weights, optimizer state). With
`compile=True` (`--compile`), the model compiled with `torch.compile` (inductor) too, patched and
unpatched, in the same alternation; the first step of each compiled variant is its compile time. For a
mixture-of-experts model, each eager step also times one sparse block's forward and backward (router and
experts) over the step's tokens: the sparse blocks' share of the forward and backward.
"""

from __future__ import annotations

import contextlib
import time

import torch

import patchkit

from ..parity import text_vocab
from ..system import reset_peak, status_bytes
from ..vision import vision_language, with_images
from .machine import matmul_flops
from .models import TRAIN, model_for
from .stats import cell, medians, ratio

VARIANTS = ("unpatched", "patched")
COMPILED = ("compiled unpatched", "compiled patched")


def _patch_state(name: str, variant: str):
    return patchkit.patched(name) if variant.split()[-1] == "patched" else contextlib.nullcontext()


def _sparse_blocks(model) -> list[torch.nn.Module]:
    """The model's sparse blocks: the modules holding an `experts` module (none in a dense model)."""
    return [m for m in model.modules() if isinstance(getattr(m, "experts", None), torch.nn.Module)]


def _time_block(block: torch.nn.Module, x: torch.Tensor) -> float:
    """Seconds of one forward and backward of `block` on `x`; the gradients it leaves are dropped."""
    start = time.perf_counter()
    out = block(x)
    (out[0] if isinstance(out, tuple) else out).float().sum().backward()
    seconds = time.perf_counter() - start
    block.zero_grad(set_to_none=True)
    x.grad = None
    return seconds


def train(arch: str = "llama", batch: int = 4, seq: int = 512, dims: dict = TRAIN, rounds: int = 4, steps: int = 2,
          progress=None, compile: bool = False) -> dict:
    name, model = model_for(arch, dims)
    compiled = torch.compile(model) if compile else None  # one module: dynamo keeps a graph per patch state
    config = model.config.get_text_config()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, text_vocab(model.config), (batch, seq))
    inputs = {"input_ids": ids, "labels": ids}
    if vision_language(model.config):
        inputs = with_images(model.config, {**inputs, "attention_mask": torch.ones_like(ids)})
    tokens = ids.numel()
    n_params = sum(p.numel() for p in model.parameters())
    matmul_params = n_params - model.get_input_embeddings().weight.numel()  # a lookup, not a matmul
    causal_attention = 6 * config.num_hidden_layers * seq * tokens * config.hidden_size
    flops_per_step = 6 * matmul_params * tokens + causal_attention
    blocks = _sparse_blocks(model)
    block_input = torch.randn(batch, seq, config.hidden_size, requires_grad=True) if blocks else None

    def step(variant, record=None):
        """One training step; with `record`, the time and the peak RSS of forward+backward and of the optimizer."""
        forward = compiled if variant.startswith("compiled") else model
        if record is not None and "block" in record:
            record["block"].append(_time_block(blocks[-1], block_input))
        before = reset_peak()
        start = time.perf_counter()
        forward(**inputs).loss.backward()
        seconds = time.perf_counter() - start
        if record is not None and "block" in record:
            record["fwd_bwd"].append(seconds)
        model_peak = status_bytes("VmHWM")
        reset_peak()
        start = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - start
        compile_s[variant] = compile_s.get(variant, seconds)  # the first step: compiling, for a compiled variant
        if record is not None:
            record["s"].append(seconds)
            record["peak"].append(max(model_peak, status_bytes("VmHWM")))
            record["model_peak"].append(model_peak)
            record["model_added"].append(model_peak - before)

    order = [*VARIANTS, *(COMPILED if compile else ())]
    results = {v: {"s": [], "peak": [], "model_peak": [], "model_added": [],
                   **({"block": [], "fwd_bwd": []} if blocks and v in VARIANTS else {})} for v in order}
    compile_s: dict[str, float] = {}
    for variant in order:  # warm-up: allocator, optimizer state, compiling (caches off: a cold compile), two steps
        with _patch_state(name, variant), torch.compiler.config.patch(force_disable_caches=True):
            step(variant)
            step(variant)
    for round_ in range(rounds):
        for variant in order if round_ % 2 == 0 else order[::-1]:
            with _patch_state(name, variant):
                for _ in range(steps):
                    step(variant, results[variant])
            if progress:
                progress(f"{name} round {round_ + 1}/{rounds} {variant}: {results[variant]['s'][-1]:.2f} s/step")
    peak_flops = matmul_flops()
    summary = {"scenario": "train", "arch": name, "tokens_per_step": tokens, "params": n_params,
               "threads": torch.get_num_threads(), "matmul_gflops": peak_flops / 1e9}
    for variant, r in results.items():
        summary[variant] = medians({"tokens_per_s": [tokens / s for s in r["s"]], "s_per_step": r["s"],
                                    "mfu": [flops_per_step / s / peak_flops for s in r["s"]],
                                    **{f"{k}_gib": [b / 2**30 for b in r[k]]
                                       for k in ("peak", "model_peak", "model_added")},
                                    **({"block_s": r["block"], "fwd_bwd_s": r["fwd_bwd"]} if "block" in r else {})})
    if blocks:
        summary["sparse_blocks"] = len(blocks)
    if compile:
        summary["compile_s"] = {v: compile_s[v] for v in COMPILED}
    for prefix, (unpatched, patched) in (("", VARIANTS), ("compiled_", COMPILED))[:2 if compile else 1]:
        u, p = summary[unpatched]["samples"], summary[patched]["samples"]
        summary[f"{prefix}speedup"] = ratio(u["tokens_per_s"], p["tokens_per_s"])["ratio"]
        for k in ("peak", "model_peak", "model_added"):
            summary[f"{prefix}{k}_ratio"] = ratio(u[f"{k}_gib"], p[f"{k}_gib"])["ratio"]
    return summary


def report(summary: dict) -> str:
    variants = [v for v in (*VARIANTS, *COMPILED) if v in summary]
    rows = [("tokens/s", "tokens_per_s", "{:.0f}"), ("s/step", "s_per_step", "{:.2f}"),
            ("MFU vs measured matmul", "mfu", "{:.0%}"),
            ("peak RSS, whole step (GiB)", "peak_gib", "{:.2f}"),
            ("peak RSS, forward+backward (GiB)", "model_peak_gib", "{:.2f}"),
            ("forward+backward memory above weights+optimizer state (GiB)", "model_added_gib", "{:.2f}")]
    pairs = [(u, p) for u, p in (VARIANTS, COMPILED) if p in summary]
    lines = [f"| {summary['arch']} train step ({summary['tokens_per_step']} tokens, "
             f"{summary['params'] / 1e6:.0f} M params, {summary['threads']} threads) | " + " | ".join(variants)
             + " | " + " | ".join(f"{p} / {u}" for u, p in pairs) + " |", "|---" * (1 + len(variants) + len(pairs))
             + "|"]
    for label, key, fmt in rows:  # the ratio: median over rounds (min-max)
        ratios = [cell(summary[u]["samples"][key], summary[p]["samples"][key]) for u, p in pairs]
        lines.append(f"| {label} | " + " | ".join(fmt.format(summary[v][key]) for v in variants) + " | "
                     + " | ".join(ratios) + " |")
    if "compile_s" in summary:
        times = ", ".join(f"{v} {s:.0f} s" for v, s in summary["compile_s"].items())
        lines.append(f"\nfirst step (compiling): {times}")
    for v in VARIANTS if "sparse_blocks" in summary else ():
        block, whole, n = summary[v]["block_s"], summary[v]["fwd_bwd_s"], summary["sparse_blocks"]
        lines.append(f"\n{v}: one sparse block (router and experts) {block:.3f} s x {n} blocks of a {whole:.2f} s "
                     f"forward+backward: {block * n / whole:.0%}")
    lines.append(f"\nmatmul measured in the same run: {summary['matmul_gflops']:.0f} GFLOP/s")
    return "\n".join(lines)

