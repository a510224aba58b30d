"""The `liger` provider: liger-kernel's ops behind patchkit's signatures (CUDA only).

liger-kernel is imported on first use, never by `import patchkit`.
"""

from __future__ import annotations

import importlib.util

import torch

from .cross_entropy import _flatten


def unavailable(device_type: str) -> str | None:
    if importlib.util.find_spec("liger_kernel") is None:
        return "backend 'liger' needs liger-kernel: pip install 'patchkit-llm[triton]'"
    if device_type != "cuda":
        return f"backend 'liger' runs on cuda only (liger-kernel has no CPU path), not on {device_type!r}"
    return None


def _functional():
    from liger_kernel.transformers import functional

    return functional


def rms_norm_liger(x, weight, eps, *, offset=0.0, cast="llama"):
    return _functional().liger_rms_norm(x, weight, eps, offset=offset, casting_mode=cast, in_place=False)


def apply_rope_liger(q, k, cos, sin):
    if cos.dim() != 4 or cos.shape[1] != 1:
        raise ValueError("backend 'liger' applies RoPE to (batch, heads, seq, dim) with cos/sin of "
                         "(batch, 1, seq, dim)")
    rotary = cos.shape[-1]
    if rotary < q.shape[-1]:  # partial rotary: liger rotates whole heads, so rotate the leading features only
        q2, k2 = _functional().liger_rope(q[..., :rotary].contiguous(), k[..., :rotary].contiguous(),
                                          cos.squeeze(1), sin.squeeze(1))
        return torch.cat((q2, q[..., rotary:]), -1), torch.cat((k2, k[..., rotary:]), -1)
    return _functional().liger_rope(q, k, cos.squeeze(1), sin.squeeze(1))


def swiglu_liger(gate, up):
    return _functional().liger_swiglu(gate, up)


def geglu_liger(gate, up):
    return _functional().liger_geglu(gate, up)


def fused_linear_cross_entropy_liger(hidden, weight, labels, *, ignore_index=-100, softcap=None,
                                     num_items_in_batch=None, reduction="mean", shift_labels=None):
    h, targets, shape = _flatten(hidden, labels, shift_labels, ignore_index)
    per_token = reduction == "none" and num_items_in_batch is None
    loss = _functional().liger_fused_linear_cross_entropy(
        h, weight, targets, ignore_index=ignore_index, reduction="none" if per_token else "sum", softcap=softcap)
    if per_token:
        return loss.view(shape)
    if num_items_in_batch is not None:
        return loss / num_items_in_batch
    return loss / (targets != ignore_index).sum().clamp(min=1) if reduction == "mean" else loss
