"""Rotary position embedding: `x * cos + rotate_half(x) * sin` for q and k in one call.

`cos` and `sin` broadcast against q and k (transformers passes them unsqueezed on the head
axis). Backward keeps only cos and sin, which every layer shares: the op is linear in q and k.
"""

from __future__ import annotations

import torch

from ._dispatch import dispatch


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    return dispatch("apply_rope", backend, q.device)(q, k, cos, sin)


def _rotate(x, cos, sin, sign):
    """`x * cos + sign * rotate_half(x) * sin`; sign=-1 applies the transpose (the backward)."""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half] if sign > 0 else sin[..., half:], value=-sign)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:] if sign > 0 else sin[..., :half], value=sign)
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(q, cos, sin, 1), _rotate(k, cos, sin, 1)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq = _rotate(dq, cos, sin, -1) if ctx.needs_input_grad[0] and dq is not None else None
        dk = _rotate(dk, cos, sin, -1) if ctx.needs_input_grad[1] and dk is not None else None
        return dq, dk, None, None


def apply_rope_torch(q, k, cos, sin):
    if q.shape[-1] % 2:
        raise ValueError(f"rotary head_dim must be even, got {q.shape[-1]}")
    return _Rope.apply(q, k, cos.to(q.dtype), sin.to(q.dtype))
