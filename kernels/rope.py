"""Rotary position embedding: `x * cos + rotate_half(x) * sin` for q and k in one call.

`cos` and `sin` broadcast against q and k (transformers passes them unsqueezed on the head
axis). Backward keeps only cos and sin, which every layer shares: the op is linear in q and k.
"""

from __future__ import annotations

import functools

import torch

from ._dispatch import dispatch
from ._triton import block, cast, jit, tl


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


@functools.cache
def _half_signs(dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # a plain tensor, whichever mode first asks for it
        return torch.ones(dim, dtype=dtype, device=device).index_fill_(0, torch.arange(dim // 2, device=device), -1)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """`sin` with its first half negated: `rotate_half(x) * sin == x.roll(half, -1) * signed_sin(sin)`. One
    multiply by cached signs (exact: the same bits as negating), not a slice-negate-concatenate."""
    return sin * _half_signs(sin.shape[-1], sin.dtype, sin.device)


def rope_into(x, cos, signed, out=None):
    """`x` rotated (no autograd; inference; `signed` from `signed_sin`), three ops in all, written into `out` when
    given: a key straight into its cache slot."""
    return torch.mul(x, cos, out=out).addcmul_(x.roll(x.shape[-1] // 2, -1), signed)


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
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    if torch.compiler.is_compiling():  # the compiler fuses the composition and recomputes it in backward itself
        half = sin.shape[-1] // 2
        signed = torch.cat((-sin[..., :half], sin[..., half:]), -1)
        return rope_into(q, cos, signed), rope_into(k, cos, signed)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return _Rope.apply(q, k, cos, sin)
    signed = signed_sin(sin)  # inference: no autograd node to build, three ops per tensor
    return rope_into(q, cos, signed), rope_into(k, cos, signed)


# --- triton ---------------------------------------------------------------------------------

@jit
def _rope_kernel(X, C, S, Y, heads, seq, sxb, sxh, sxl, scb, sch, scl, ssb, ssh, ssl, half,
                 BACKWARD: tl.constexpr, BLOCK: tl.constexpr):
    """One (batch, head, position) row: y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2 (transposed when BACKWARD)."""
    row = tl.program_id(0)
    b, h, pos = row // (heads * seq), (row // seq) % heads, row % seq
    cols = tl.arange(0, BLOCK)
    mask = cols < half
    x = X + b * sxb + h * sxh + pos * sxl
    c = C + b * scb + h * sch + pos * scl
    s = S + b * ssb + h * ssh + pos * ssl
    x1 = tl.load(x + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + half + cols, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(c + cols, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(c + half + cols, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(s + cols, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(s + half + cols, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1, y2 = x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
    else:
        y1, y2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
    y = Y + row * 2 * half
    tl.store(y + cols, cast(y1, Y.dtype.element_ty), mask=mask)
    tl.store(y + half + cols, cast(y2, Y.dtype.element_ty), mask=mask)


def _as4d(t):
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() <= 4 else t.flatten(0, t.dim() - 4)


def _rope_triton_one(x, cos, sin, backward):
    x4 = _as4d(x)
    if x4.stride(-1) != 1:
        x4 = x4.contiguous()
    c4, s4 = (_as4d(t).expand(x4.shape) for t in (cos, sin))
    c4, s4 = (t if t.stride(-1) == 1 else t.contiguous() for t in (c4, s4))
    batch, heads, seq, dim = x4.shape
    y = torch.empty(x4.shape, dtype=x.dtype, device=x.device)
    _rope_kernel[(batch * heads * seq,)](x4, c4, s4, y, heads, seq, *x4.stride()[:3], *c4.stride()[:3],
                                         *s4.stride()[:3], dim // 2, BACKWARD=backward, BLOCK=block(dim // 2))
    return y.view(x.shape)


# Triton launches are custom ops, opaque to torch.compile. One op per tensor: its backward is the transposed rotation.

@torch.library.custom_op("patchkit::rope_triton", mutates_args=())
def _rope_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    return _rope_triton_one(x, cos, sin, backward)


@_rope_op.register_fake
def _(x, cos, sin, backward):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _rope_context(ctx, inputs, output):
    _, cos, sin, ctx.backward = inputs
    ctx.save_for_backward(cos, sin)


def _rope_grad(ctx, dy):
    cos, sin = ctx.saved_tensors
    return _rope_op(dy, cos, sin, not ctx.backward), None, None, None


_rope_op.register_autograd(_rope_grad, setup_context=_rope_context)


def apply_rope_triton(q, k, cos, sin):
    if q.shape[-1] % 2:
        raise ValueError(f"rotary head_dim must be even, got {q.shape[-1]}")
    return _rope_op(q, cos, sin, False), _rope_op(k, cos, sin, False)
