"""Benchmarks: patched and unpatched runs alternated in one process, so machine drift cancels.

`patchkit bench kernels`, `sft` and `decode` are in `bench_kernels.py`, `bench_sft.py`, `bench_decode.py`.

`patchkit bench train`: one full fine-tuning step (forward, backward, AdamW) of a Llama-shaped
model. Reports tokens/s and peak resident memory of the process: over the whole step, over
forward+backward (what patchkit changes; AdamW's own temporaries come after), and how much
forward+backward adds on top of what was resident before (weights, optimizer state). With
`compile=True` (`--compile`), the model compiled with `torch.compile` (inductor) too, patched and
unpatched, in the same alternation; the first step of each compiled variant is its compile time.
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

from .parity import text_vocab
from .vision import vision_language, with_images

TRAIN = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=1408, vocab_size=128256, max_position_embeddings=2048)
# mixture-of-experts families at that shape: 8 experts, 2 per token, each half the dense MLP's width (Mixtral's
# experts are `intermediate_size` wide), every layer sparse
MOE = dict(num_experts=8, num_local_experts=8, num_experts_per_tok=2, moe_intermediate_size=704)
# a vision-language model's tower (CLIP-style: 224-pixel images in 14-pixel patches, 256 image tokens), one image
# per row, its tokens in the text
VISION = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=224,
              patch_size=14)


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
    """A random model of architecture `arch` (its first head: `*ForCausalLM`; a vision-language
    `*ForConditionalGeneration` with a `VISION` tower) whose language model has Llama-style dimensions `dims`
    (head_dim = hidden / heads)."""
    from patchkit import _resolve

    family = _resolve(arch)[0]
    model_class = family.model_class()
    multimodal = vision_language(model_class.config_class)
    text_class = type(model_class.config_class().text_config) if multimodal else family.config_type()
    sparse = any(hasattr(text_class(), key) for key in ("num_experts", "num_local_experts"))
    head_dim = dims["hidden_size"] // dims["num_attention_heads"]
    config = text_class(**{"head_dim": head_dim, "tie_word_embeddings": False, **(MOE if sparse else {}), **dims})
    rope = getattr(config, "rope_parameters", None) or {}
    if "mrope_section" in rope:  # Qwen-VL: time, height, width sections over half the head, as its 16:24:24
        rope["mrope_section"] = [head_dim // 2 - 2 * (3 * head_dim // 16), 3 * head_dim // 16, 3 * head_dim // 16]
    for token in ("pad_token_id", "bos_token_id", "eos_token_id"):  # defaults of a larger vocabulary (GLM-4)
        if isinstance(getattr(config, token, None), int) and getattr(config, token) >= config.vocab_size:
            setattr(config, token, None)
    if multimodal:
        vision = {**family.tiny_multimodal["vision_config"], **VISION}
        config = model_class.config_class(**{**family.tiny_multimodal, "vision_config": vision,
                                             "text_config": config.to_dict(), "tie_word_embeddings": False})
    config._attn_implementation = "sdpa" if getattr(model_class, "_supports_sdpa", True) else "eager"
    torch.manual_seed(0)
    return family.name, model_class(config)


VARIANTS = ("unpatched", "patched")
COMPILED = ("compiled unpatched", "compiled patched")


def _patch_state(name: str, variant: str):
    return patchkit.patched(name) if variant.split()[-1] == "patched" else contextlib.nullcontext()


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

    def step(variant, record=None):
        """One training step; with `record`, the time and the peak RSS of forward+backward and of the optimizer."""
        forward = compiled if variant.startswith("compiled") else model
        before = _reset_peak()
        start = time.perf_counter()
        forward(**inputs).loss.backward()
        seconds = time.perf_counter() - start
        model_peak = _status("VmHWM")
        _reset_peak()
        start = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - start
        compile_s[variant] = compile_s.get(variant, seconds)  # the first step: compiling, for a compiled variant
        if record is not None:
            record["s"].append(seconds)
            record["peak"].append(max(model_peak, _status("VmHWM")))
            record["model_peak"].append(model_peak)
            record["model_added"].append(model_peak - before)

    order = [*VARIANTS, *(COMPILED if compile else ())]
    results = {v: {"s": [], "peak": [], "model_peak": [], "model_added": []} for v in order}
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
    peak_flops = _matmul_flops()
    summary = {"scenario": "train", "arch": name, "tokens_per_step": tokens, "params": n_params,
               "threads": torch.get_num_threads(), "matmul_gflops": peak_flops / 1e9}
    for variant, r in results.items():
        s = statistics.median(r["s"])
        memory = {f"{k}_gib": statistics.median(r[k]) / 2**30 for k in ("peak", "model_peak", "model_added")}
        summary[variant] = {"s_per_step": s, "tokens_per_s": tokens / s, "mfu": flops_per_step / s / peak_flops,
                            **memory}
    if compile:
        summary["compile_s"] = {v: compile_s[v] for v in COMPILED}
    for prefix, (unpatched, patched) in (("", VARIANTS), ("compiled_", COMPILED))[:2 if compile else 1]:
        u, p = summary[unpatched], summary[patched]
        summary[f"{prefix}speedup"] = p["tokens_per_s"] / u["tokens_per_s"]
        for k in ("peak", "model_peak", "model_added"):
            summary[f"{prefix}{k}_ratio"] = p[f"{k}_gib"] / u[f"{k}_gib"]
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
    for label, key, fmt in rows:
        lines.append(f"| {label} | " + " | ".join(fmt.format(summary[v][key]) for v in variants) + " | "
                     + " | ".join(f"{summary[p][key] / summary[u][key]:.2f}x" for u, p in pairs) + " |")
    if "compile_s" in summary:
        times = ", ".join(f"{v} {s:.0f} s" for v, s in summary["compile_s"].items())
        lines.append(f"\nfirst step (compiling): {times}")
    lines.append(f"\nmatmul measured in the same run: {summary['matmul_gflops']:.0f} GFLOP/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from patchkit import bench_run

    return bench_run.main(argv)


if __name__ == "__main__":
    sys.exit(main())
