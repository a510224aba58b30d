"""`patchkit bench decode`: token-by-token generation, float32, patched vs unpatched, in one process.

Llama-shaped models of about 20 M and 125 M parameters (vocab 32000), a 32-token prompt (left-padded by
0, 2, 4, ... tokens per row in a batch), 128 new tokens, batch 1 and 8. Every variant makes the same
call, `model.generate(ids, attention_mask=mask, max_new_tokens=128, min_new_tokens=128, do_sample=False)`
(`min_new_tokens` holds EOS back, so every variant decodes the same count), but for "EOS off", which
passes `eos_token_id=None` instead of `min_new_tokens`. Variants: unpatched, with transformers' dynamic
cache and with its static cache; a patched model (transformers' loop over the fused ops); the same after
`for_inference` (patchkit's decode loop), with `min_new_tokens` and with EOS off; `patchkit.generate`.
Each round runs every variant once, in an order reversed every other round so the machine's drift
cancels; tokens/s (prefill included) is the median over rounds.

The bandwidth limit is what batch-1 decoding could reach if it did nothing but read every weight
once per token: a streaming read measured in the same run (the sum of a touched 1 GiB tensor, the
fastest of 5, at the start and at the end of the run) divided by the bytes of weights a token reads
(all but the embedding, of which it reads a row). At batch b the same read serves b tokens: the limit is b times higher.
"""

from __future__ import annotations

import contextlib
import time

import torch

import patchkit

from .models import model_for
from .stats import medians, ratio

SIZES = {
    "20M": dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=768),
    "125M": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                 intermediate_size=2048),
}
VOCAB, PROMPT = 32000, 32
VARIANTS = ("unpatched", "unpatched static cache", "patched model.generate", "for_inference model.generate",
            "for_inference, EOS off", "patchkit.generate")


def _model(size: str, arch: str = "llama"):
    name, model = model_for(arch, {"vocab_size": VOCAB, "max_position_embeddings": 1024, **SIZES[size]})
    return name, model.eval()


def stream_read_bytes_per_s(gib: float = 1.0, reps: int = 5) -> float:
    """A streaming read: the sum of a touched float32 tensor far larger than the caches (the fastest of `reps`)."""
    x = torch.rand(int(gib * 2**28))
    x.sum()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * 4 / min(times)


def _generate(variant: str, model, ids, mask, new: int):
    call = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    if variant == "patchkit.generate":
        return patchkit.generate(model, ids, **call)
    if variant.startswith("for_inference"):
        if variant.endswith("EOS off"):
            del call["min_new_tokens"]
            call["eos_token_id"] = None
        patchkit.for_inference(model)
        try:
            return model.generate(ids, **call)
        finally:
            patchkit.for_training(model).eval()
    if variant == "unpatched static cache":
        return model.generate(ids, cache_implementation="static", **call)
    return model.generate(ids, **call)


def _timed(variant: str, model, ids, mask, new: int) -> float:
    patched = variant not in ("unpatched", "unpatched static cache")
    with patchkit.patched(model.config.model_type) if patched else contextlib.nullcontext():
        start = time.perf_counter()
        out = _generate(variant, model, ids, mask, new)
        seconds = time.perf_counter() - start
    if out.shape[1] != ids.shape[1] + new:
        raise RuntimeError(f"{variant} decoded {out.shape[1] - ids.shape[1]} tokens, not {new}")
    return ids.shape[0] * new / seconds


def prompts(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` random prompts of PROMPT tokens, row i left-padded by 2i tokens."""
    ids = torch.randint(3, VOCAB, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))
    mask = (torch.arange(PROMPT) >= 2 * torch.arange(batch)[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


def run(sizes=("20M", "125M"), batches=(1, 8), new: int = 128, rounds: int = 3, variants=VARIANTS,
        arch: str = "llama", progress=None) -> dict:
    bandwidth = stream_read_bytes_per_s()  # and again at the end: the faster of the two sets the limit
    summary = {"scenario": "decode", "new_tokens": new, "prompt": PROMPT, "threads": torch.get_num_threads(),
               "rows": []}
    for size in sizes:
        name, model = _model(size, arch)
        params = sum(p.numel() for p in model.parameters())
        read = (params - model.get_input_embeddings().weight.numel()) * 4
        for batch in batches:
            ids, mask = prompts(batch)
            speeds = {v: [] for v in variants}
            for v in variants:  # warm-up: first calls allocate, dispatch and time the products (patchkit.products)
                _timed(v, model, ids, mask, 4)
            for round_ in range(rounds):
                for v in variants if round_ % 2 == 0 else variants[::-1]:
                    speeds[v].append(_timed(v, model, ids, mask, new))
                if progress:
                    progress(f"{size} batch {batch} round {round_ + 1}/{rounds}: " + ", ".join(
                        f"{v} {s[-1]:.0f}" for v, s in speeds.items()) + " tok/s")
            tok_s = medians(speeds)
            samples = tok_s.pop("samples")
            summary["rows"].append({"arch": name, "size": size, "params": params, "batch": batch,
                                    "weight_mb_per_token": read / 1e6, "tok_s": tok_s, "samples": samples,
                                    "vs_unpatched": {v: ratio(samples["unpatched"], samples[v])["ratio"] for v in tok_s}
                                    if "unpatched" in tok_s else {}})
        del model
    summary["stream_read_gb_s"] = max(bandwidth, stream_read_bytes_per_s()) / 1e9
    for row in summary["rows"]:
        limit = row["batch"] * summary["stream_read_gb_s"] * 1e9 / (row["weight_mb_per_token"] * 1e6)
        row["limit_tok_s"], row["of_limit"] = limit, {v: s / limit for v, s in row["tok_s"].items()}
    return summary


def report(summary: dict) -> str:
    variants = list(summary["rows"][0]["tok_s"])
    lines = [f"| float32, {summary['prompt']}-token prompt + {summary['new_tokens']} new, {summary['threads']} "
             f"threads: tokens/s (x unpatched; % of bandwidth limit) | limit | " + " | ".join(variants) + " |",
             "|---" * (len(variants) + 2) + "|"]
    for row in summary["rows"]:
        cells = [f"{row['tok_s'][v]:.0f} ({row['vs_unpatched'].get(v, float('nan')):.2f}x; {row['of_limit'][v]:.0%})"
                 for v in variants]
        lines.append(f"| {row.get('arch', 'llama')} {row['size']} params, batch {row['batch']} | "
                     f"{row['limit_tok_s']:.0f} | " + " | ".join(cells)
                     + " |")
    lines.append(f"\nstreaming read measured in the same run: {summary['stream_read_gb_s']:.1f} GB/s; limit = batch x "
                 "read rate / weight bytes per token")
    return "\n".join(lines)

