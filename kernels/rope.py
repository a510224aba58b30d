"""Rotary position embedding: `x * cos + rotate_half(x) * sin` for q and k in one call.

`cos` and `sin` broadcast against q and k (transformers passes them unsqueezed on the head
axis). They may be narrower than the head (partial rotary, `partial_rotary_factor` < 1: Phi-4-mini,
GLM): the first `cos.shape[-1]` features rotate, the rest pass through unchanged. Backward keeps
only cos and sin, which every layer shares: the op is linear in q and k.
"""

from __future__ import annotations

import functools

import torch

from ._dispatch import dispatch
from ._triton import block, cast, jit, launch, rounded, tl, warps


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    return dispatch("apply_rope", backend, q.device)(q, k, cos, sin)


def _check(q, cos):
    rotary = cos.shape[-1]
    if rotary % 2 or rotary > q.shape[-1]:
        raise ValueError(f"rotary dim (cos.shape[-1] = {rotary}) must be even and at most head_dim ({q.shape[-1]})")


def _rotate(x, cos, sin, sign):
    """`x * cos + sign * rotate_half(x) * sin` over the first `cos.shape[-1]` features, the rest passed through;
    sign=-1 applies the transpose (the backward)."""
    rotary = cos.shape[-1]
    half = rotary // 2
    if rotary == x.shape[-1]:
        out = x * cos
    else:
        out = x.clone()
        out[..., :rotary].mul_(cos)
    part = x[..., :rotary]
    # products rounded before the sum, as transformers' `q * cos + rotate_half(q) * sin` rounds them
    low = part[..., half:] * (sin[..., :half] if sign > 0 else sin[..., half:])
    high = part[..., :half] * (sin[..., half:] if sign > 0 else sin[..., :half])
    (out[..., :half].sub_ if sign > 0 else out[..., :half].add_)(low)
    (out[..., half:rotary].add_ if sign > 0 else out[..., half:rotary].sub_)(high)
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
    """`x` rotated (`signed` from `signed_sin`), four ops in all, written into `out` when given (no autograd;
    inference: a key straight into its cache slot). A `cos` narrower than `x` rotates only the leading features."""
    rotary = cos.shape[-1]  # products rounded before the sum, as transformers rounds them
    if rotary == x.shape[-1]:
        if out is None:  # differentiable (the compiled composition)
            return x * cos + x.roll(rotary // 2, -1) * signed
        return torch.mul(x, cos, out=out).add_(x.roll(rotary // 2, -1).mul_(signed))
    part, rest = x[..., :rotary], x[..., rotary:]
    if out is None:
        return torch.cat((part * cos + part.roll(rotary // 2, -1) * signed, rest), -1)
    out[..., rotary:].copy_(rest)
    torch.mul(part, cos, out=out[..., :rotary]).add_(part.roll(rotary // 2, -1).mul_(signed))
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
    _check(q, cos)
    dtype = torch.promote_types(q.dtype, cos.dtype)
    if dtype != q.dtype:  # float32 tables on half-precision q/k (OLMo 2): the reference computes in float32
        q2, k2 = apply_rope_torch(q.to(dtype), k.to(dtype), cos, sin)
        return q2.to(q.dtype), k2.to(k.dtype)
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
def _rotate_heads(X, sxh, Y, syh, C, sch, S, ssh, heads, half, dim, BACKWARD: tl.constexpr, HEADS: tl.constexpr,
                  BLOCK: tl.constexpr, PASS: tl.constexpr):
    """Every head of one (batch, position): y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2 (transposed when BACKWARD)
    over the first 2 * half features; the other `dim - 2 * half` (PASS > 0: partial rotary) are copied."""
    h = tl.arange(0, HEADS)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (h < heads) & (cols < half)
    x = X + h * sxh
    c, s = C + h * sch, S + h * ssh  # a head stride of 0 (the usual broadcast): one row, read once from memory
    x1 = tl.load(x + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + half + cols, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(c + cols, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(c + half + cols, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(s + cols, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(s + half + cols, mask=mask, other=0.0).to(tl.float32)
    T: tl.constexpr = C.dtype.element_ty  # products rounded to the tables' precision before the sum, as the
    # reference rounds them (float32 tables on half-precision q/k: transformers computes in float32)
    if T == tl.float32:  # nothing to round (and no helper calls, which Triton's interpreter makes dear)
        if BACKWARD:
            y1, y2 = x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
        else:
            y1, y2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
    elif BACKWARD:
        y1 = rounded(x1 * c1, T) + rounded(x2 * s2, T)
        y2 = rounded(x2 * c2, T) - rounded(x1 * s1, T)
    else:
        y1 = rounded(x1 * c1, T) - rounded(x2 * s1, T)
        y2 = rounded(x2 * c2, T) + rounded(x1 * s2, T)
    y = Y + h * syh
    tl.store(y + cols, cast(y1, Y.dtype.element_ty), mask=mask)
    tl.store(y + half + cols, cast(y2, Y.dtype.element_ty), mask=mask)
    if PASS > 0:
        rest = tl.arange(0, PASS)[None, :]
        keep = (h < heads) & (rest < dim - 2 * half)
        tl.store(y + 2 * half + rest, tl.load(x + 2 * half + rest, mask=keep), mask=keep)


@jit
def _rope_kernel(Q, K, C, S, YQ, YK, seq, sqb, sqh, sql, skb, skh, skl, syqb, syqh, syql, sykb, sykh, sykl,
                 scb, scl, sch, q_heads, k_heads, half, dim, BACKWARD: tl.constexpr, QH: tl.constexpr,
                 KH: tl.constexpr, BLOCK: tl.constexpr, PASS: tl.constexpr):
    """One (batch, position): every q head, then every k head, against that position's cos and sin. Strides are
    in elements, per (batch, head, position); cos and sin share theirs."""
    pid = tl.program_id(0).to(tl.int64)
    b, pos = pid // seq, pid % seq
    table = b * scb + pos * scl
    _rotate_heads(Q + b * sqb + pos * sql, sqh, YQ + b * syqb + pos * syql, syqh, C + table, sch, S + table, sch,
                  q_heads, half, dim, BACKWARD, QH, BLOCK, PASS)
    _rotate_heads(K + b * skb + pos * skl, skh, YK + b * sykb + pos * sykl, sykh, C + table, sch, S + table, sch,
                  k_heads, half, dim, BACKWARD, KH, BLOCK, PASS)


def _as4d(t):
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() <= 4 else t.flatten(0, t.dim() - 4)


def _unit_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _rope_triton(q, k, cos, sin, backward):
    """q and k rotated by one launch; outputs keep their inputs' layout (transformers' q is a transposed view)."""
    q4, k4 = _unit_stride(_as4d(q)), _unit_stride(_as4d(k))
    batch, q_heads, seq, dim = q4.shape
    k_heads = k4.shape[1]
    if k4.shape[0] != batch or k4.shape[2:] != q4.shape[2:]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch, positions and head_dim")
    rotary = cos.shape[-1]
    c4 = _as4d(cos).expand(batch, -1, seq, rotary)
    s4 = _as4d(sin).expand(batch, -1, seq, rotary)
    if c4.stride() != s4.stride() or c4.stride(-1) != 1:  # one set of strides for both tables
        c4, s4 = c4.contiguous(), s4.contiguous()
    head_stride = c4.stride(1) if c4.shape[1] > 1 else 0  # tables per head, or one row every head shares
    yq, yk = torch.empty_like(q4), torch.empty_like(k4)
    rest = dim - rotary
    half = rotary // 2
    width = block(half)
    launch(_rope_kernel, (batch * seq,), q4, k4, c4, s4, yq, yk, seq, q4.stride(0), q4.stride(1), q4.stride(2),
           k4.stride(0), k4.stride(1), k4.stride(2), yq.stride(0), yq.stride(1), yq.stride(2), yk.stride(0),
           yk.stride(1), yk.stride(2), c4.stride(0), c4.stride(2), head_stride, q_heads, k_heads, half, dim,
           BACKWARD=backward, QH=block(q_heads), KH=block(k_heads), BLOCK=width, PASS=block(rest) if rest else 0,
           num_warps=warps(2 * block(q_heads) * width))
    return yq.view(q.shape), yk.view(k.shape)


# Triton launches are custom ops, opaque to torch.compile. Backward is the transposed rotation: the same op.

@torch.library.custom_op("patchkit::rope_triton", mutates_args=())
def _rope_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _rope_triton(q, k, cos, sin, backward)


@_rope_op.register_fake
def _(q, k, cos, sin, backward):
    return (torch.empty_like(_unit_stride(_as4d(q))).view(q.shape),
            torch.empty_like(_unit_stride(_as4d(k))).view(k.shape))


def _rope_context(ctx, inputs, output):
    ctx.backward = inputs[4]
    ctx.save_for_backward(*inputs[2:4])


def _rope_grad(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    return *_rope_op(dq, dk, cos, sin, not ctx.backward), None, None, None


_rope_op.register_autograd(_rope_grad, setup_context=_rope_context)


def apply_rope_triton(q, k, cos, sin):
    _check(q, cos)
    if torch.promote_types(q.dtype, cos.dtype) == q.dtype:
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    return _rope_op(q, k, cos, sin, False)
