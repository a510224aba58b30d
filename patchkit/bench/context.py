"""`patchkit bench context`: the longest sequence one training step fits in under a memory cap.

One step (forward, backward, AdamW) at batch 1 of a Llama-shaped model with a 128256-token
vocabulary, full fine-tune and PEFT LoRA r=16, patched and unpatched, no gradient checkpointing.
Each probe runs in a child process; the parent samples the child's resident memory every 20 ms
and stops it the moment it passes the cap, so a probe that does not fit never takes the machine
down. A probe fits when the child finishes with its peak resident memory (VmHWM, the whole
process: interpreter, torch, weights, optimizer state, activations) under the cap. The longest
fitting length is found by doubling, then bisection to within 5 %; a variant that still fits at
65536 tokens is reported as "65536+".
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from ..system import status_bytes

MODEL = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=688, vocab_size=128256, max_position_embeddings=1 << 17)


def _probe(variant: str, scenario: str, seq: int, dims: dict) -> dict:
    """In the child: one training step; returns its peak resident bytes and seconds."""
    import torch

    import patchkit

    from .models import LORA_TARGETS, model_for

    model = model_for("llama", dims)[1]
    if scenario == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS))
    if variant == "patched":
        patchkit.patch("llama")
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, dims["vocab_size"], (1, seq))
    start = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return {"peak": status_bytes("VmHWM"), "seconds": time.perf_counter() - start}


def fits(variant: str, scenario: str, seq: int, cap: int, dims: dict = MODEL) -> dict:
    """Run one probe in a child process, stopped at the cap. {"fits", "peak", "seconds"}."""
    args = json.dumps({"variant": variant, "scenario": scenario, "seq": seq, "dims": dims})
    child = subprocess.Popen([sys.executable, "-m", "patchkit.bench.context", args], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    peak = 0
    while child.poll() is None:
        peak = max(peak, status_bytes("VmRSS", child.pid))
        if peak > cap:
            child.kill()
            child.wait()
            return {"fits": False, "peak": peak, "seconds": None}
        time.sleep(0.02)
    out = child.stdout.read()
    if child.returncode != 0:
        return {"fits": False, "peak": peak, "seconds": None}
    result = json.loads(out.strip().splitlines()[-1])
    return {"fits": result["peak"] <= cap, **result}


def longest(variant: str, scenario: str, cap: int, dims: dict = MODEL, start: int = 512, limit: int = 1 << 16,
            progress=None) -> dict:
    """The longest sequence that fits, by doubling from `start` and then bisecting to within 5 %."""
    lo, hi, probes = 0, None, []

    def probe(seq):
        result = fits(variant, scenario, seq, cap, dims)
        probes.append({"seq": seq, **result})
        if progress:
            progress(f"{scenario} {variant}: {seq} tokens {'fits' if result['fits'] else 'does not fit'} "
                     f"(peak {result['peak'] / 2**30:.2f} GiB)")
        return result["fits"]

    seq = start
    while seq <= limit and probe(seq):
        lo, seq = seq, seq * 2
    if seq > limit:  # fits at the longest length probed: a lower bound
        return {"longest": lo, "failed_at": None, "probes": probes}
    hi = seq
    while hi - lo > max(64, lo // 20):
        mid = (lo + hi) // 2 // 64 * 64
        lo, hi = (mid, hi) if probe(mid) else (lo, mid)
    return {"longest": lo, "failed_at": hi, "probes": probes}


def run(cap_gib: float = 8.0, scenarios=("full", "lora"), dims: dict = MODEL, start: int = 512,
        progress=None) -> dict:
    cap = int(cap_gib * 2**30)
    summary = {"scenario": "context", "cap_gib": cap_gib, "dims": dims, "rows": []}
    for scenario in scenarios:
        found = {v: longest(v, scenario, cap, dims, start, progress=progress) for v in ("unpatched", "patched")}
        summary["rows"].append({"fine_tune": scenario, "unpatched": found["unpatched"]["longest"],
                                "patched": found["patched"]["longest"],
                                "ratio": found["patched"]["longest"] / max(found["unpatched"]["longest"], 1),
                                "at_limit": found["patched"]["failed_at"] is None,
                                "probes": {v: f["probes"] for v, f in found.items()}})
    return summary


def report(summary: dict) -> str:
    d = summary["dims"]
    lines = [f"| longest sequence, one training step at batch 1 under {summary['cap_gib']:g} GiB peak RSS (hidden "
             f"{d['hidden_size']}, {d['num_hidden_layers']} layers, vocab {d['vocab_size']}) | unpatched | patched "
             "| patched / unpatched | Unsloth's headline |", "|---|---|---|---|---|"]
    for r in summary["rows"]:
        more = "+" if r["at_limit"] else ""
        lines.append(f"| {r['fine_tune']} fine-tune | {r['unpatched']} | {r['patched']}{more} | "
                     f"{r['ratio']:.1f}x{more} | 12x (Llama 3.1 8B, its own setup) |")
    return "\n".join(lines)


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    print(json.dumps(_probe(spec["variant"], spec["scenario"], spec["seq"], spec["dims"])))
