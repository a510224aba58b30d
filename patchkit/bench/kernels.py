"""`patchkit bench kernels`: each op, forward+backward, per implementation, against the unfused ops.

On CUDA it compares the unfused PyTorch ops (as transformers writes them), patchkit's `torch`
and `triton` providers and liger-kernel; elsewhere the unfused ops and the `torch` provider.
Each row also gives the bandwidth achieved on the op's minimum traffic (`MINIMUM`: the bytes any
implementation must read and write, forward and backward; docs/kernels.md), or for the fused
cross-entropy, whose matmuls dominate, its matmul throughput; and, where liger-kernel ran, the
time against liger's.
Implementations are interleaved per repetition, their order reversed every other one, so drift and the cost of
going first cancel; the median is reported.
"""

from __future__ import annotations

import time

import torch

from patchkit import kernels
from patchkit.kernels import reference

from ..system import reset_peak, status_bytes
from .stats import medians

# the ops with an unfused reference; the LoRA ops are measured inside `patchkit bench sft`
BENCHED = tuple(op for op in kernels.OPS if hasattr(reference, op))
# (tokens, hidden, intermediate, heads, kv heads, head dim, vocab) per device type
SHAPES = {"cuda": (8192, 4096, 14336, 32, 8, 128, 128256), "cpu": (2048, 1024, 2816, 8, 2, 64, 32000)}


def _inputs(op, device, dtype):
    tokens, hidden, inter, heads, kv, dim, vocab = SHAPES["cuda" if device.type == "cuda" else "cpu"]
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=g) * scale).to(dtype)

    if op == "rms_norm":
        return randn(tokens, hidden), randn(hidden), 1e-6
    if op == "apply_rope":
        seq = 2048 if device.type == "cuda" else 512
        batch = tokens // seq
        angle = torch.randn(batch, seq, dim // 2, device=device, generator=g).repeat(1, 1, 2)
        return (randn(batch, seq, heads, dim).transpose(1, 2), randn(batch, seq, kv, dim).transpose(1, 2),
                angle.cos().to(dtype)[:, None], angle.sin().to(dtype)[:, None])
    if op in ("swiglu", "geglu"):
        return randn(tokens, inter), randn(tokens, inter)
    labels = torch.randint(0, vocab, (1, tokens), device=device, generator=g)
    if op == "linear_log_probs":  # the tokens that count, flat, as TRL's head passes them
        return randn(tokens, hidden), randn(vocab, hidden, scale=0.02), labels[0]
    return randn(1, tokens, hidden), randn(vocab, hidden, scale=0.02), labels


def _size(t):
    return t.numel() * t.element_size()


# bytes any implementation must move, forward + backward, given the op's inputs: read each input and write its
# output in forward; read the output's gradient and the inputs, write the inputs' gradients in backward
MINIMUM = {
    "rms_norm": lambda x, w, eps: 5 * _size(x),  # fwd r x, w y; bwd r dy, x, w dx
    "apply_rope": lambda q, k, cos, sin: 4 * (_size(q) + _size(k)),  # fwd r, w; bwd r, w (cos/sin: per position)
    "swiglu": lambda g, u: 4 * _size(g),  # fwd r g, u, w y; bwd r dy, g, u, w dg, du: 8 per element
    "geglu": lambda g, u: 4 * _size(g),
}


def _flops(op, args):
    """The LM head's three matmuls (logits, and the gradients of hidden and weight)."""
    h, w, _ = args
    return 6 * h.shape[:-1].numel() * h.shape[-1] * w.shape[0] if op in HEADS else 0


HEADS = ("fused_linear_cross_entropy", "linear_log_probs")


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return reset_peak()


def _peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return status_bytes("VmHWM")


def _implementations(device):
    """Name -> the op's implementation there, or None where that provider has none (liger's log-probs)."""
    impls = {"unfused": lambda op: getattr(reference, op), "torch": lambda op: kernels.TORCH.ops[op]}
    if device.type == "cuda":
        impls["triton"] = lambda op: kernels.TRITON.ops.get(op)
        if kernels.LIGER.unavailable("cuda") is None:
            impls["liger"] = lambda op: kernels.LIGER.ops.get(op)
    return impls


def run(device: str | None = None, dtype: str | None = None, reps: int = 5) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = getattr(torch, dtype) if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    every = _implementations(dev)
    rows = []
    for op in BENCHED:
        impls = {name: get for name, get in every.items() if get(op) is not None}
        args = _inputs(op, dev, dt)  # the first two are differentiated in every op
        times = {name: [] for name in impls}
        peaks = {name: [] for name in impls}
        for rep in range(reps + 1):
            for name, get in list(impls.items())[::1 if rep % 2 else -1]:  # ABBA: neither always goes first
                leaves = [a.detach().requires_grad_() if i < 2 else a for i, a in enumerate(args)]
                before = _peak_reset(dev)
                start = time.perf_counter()
                out = get(op)(*leaves)
                # log-probs: backward through the log-probs, as RL losses weight them (the entropy masks)
                outs = out[:1] if op == "linear_log_probs" else out if isinstance(out, tuple) else (out,)
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if rep:  # the first repetition warms up
                    times[name].append(time.perf_counter() - start)
                    peaks[name].append(_peak(dev) - before)
                del out, outs, leaves
        figures = {name: medians({"ms": [1e3 * t for t in times[name]], "peak_mib": [b / 2**20 for b in peaks[name]]})
                   for name in impls}
        moved = MINIMUM[op](*args) if op in MINIMUM else 0
        for name, f in figures.items():
            rows.append({"op": op, "impl": name, **f, "speedup": figures["unfused"]["ms"] / f["ms"],
                         "gb_s": moved / f["ms"] / 1e6 if moved else None,
                         "tflop_s": _flops(op, args) / f["ms"] / 1e9 if not moved else None,
                         "vs_liger": figures["liger"]["ms"] / f["ms"] if "liger" in figures else None})
    return {"scenario": "kernels", "device": str(dev), "dtype": str(dt).replace("torch.", ""),
            "shapes": dict(zip(("tokens", "hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab"),
                               SHAPES["cuda" if dev.type == "cuda" else "cpu"])), "rows": rows}


def report(summary: dict) -> str:
    lines = [f"kernels, forward+backward, {summary['device']} {summary['dtype']}, shapes {summary['shapes']}",
             "| op | implementation | ms | speed-up vs unfused | vs liger | GB/s on the minimum traffic (TFLOP/s: "
             "matmuls) | peak memory added (MiB) |", "|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        rate = f"{r['gb_s']:.0f}" if r.get("gb_s") else f"{r['tflop_s']:.1f} TFLOP/s" if r.get("tflop_s") else ""
        liger = f"{r['vs_liger']:.2f}x" if r.get("vs_liger") else ""
        lines.append(f"| {r['op']} | {r['impl']} | {r['ms']:.1f} | {r['speedup']:.2f}x | {liger} | {rate} | "
                     f"{r['peak_mib']:.0f} |")
    return "\n".join(lines)
