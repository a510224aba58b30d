"""RMSNorm: `x / rms(x) * (offset + weight)`, computed in float32.

`cast="llama"` casts the normalised input back to its dtype before the weight multiply
(LlamaRMSNorm); `cast="gemma"` multiplies in float32 and casts at the end (GemmaRMSNorm).
Backward keeps only the input and the reciprocal RMS; the normalised input is recomputed.
"""

from __future__ import annotations

import torch

from ._dispatch import dispatch
from ._triton import block, cast, jit, rounded, rows2d, tl

CASTS = ("llama", "gemma")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, offset: float = 0.0,
             cast: str = "llama", backend: str = "auto") -> torch.Tensor:
    return dispatch("rms_norm", backend, x.device)(x, weight, eps, offset=offset, cast=cast)


def _scale(weight: torch.Tensor, offset: float, cast: str) -> torch.Tensor:
    w = weight.float() if cast == "gemma" else weight
    return w + offset if offset else w


def _forward(x, weight, eps, offset, cast):
    """(output, reciprocal RMS)."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    normed = xf * rstd
    if cast == "gemma":
        return (normed * _scale(weight, offset, cast)).to(x.dtype), rstd
    return _scale(weight, offset, cast) * normed.to(x.dtype), rstd


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset, cast):
        y, rstd = _forward(x, weight, eps, offset, cast)
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset, ctx.cast = offset, cast
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        offset, cast = ctx.offset, ctx.cast
        normed = x.float() * rstd
        scale = _scale(weight, offset, cast)
        if cast == "gemma":
            dyf = dy.float()
            dw = (dyf * normed).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
            dn = dyf * scale
        else:
            dw = (dy * normed.to(x.dtype)).flatten(0, -2).float().sum(0) if ctx.needs_input_grad[1] else None
            dn = (dy * scale).float()
        dx = None
        if ctx.needs_input_grad[0]:
            dot = (dn * normed).mean(-1, keepdim=True)
            dx = ((dn - normed * dot) * rstd).to(x.dtype)
        return dx, None if dw is None else dw.to(weight.dtype), None, None, None


def rms_norm_torch(x, weight, eps, *, offset=0.0, cast="llama"):
    if cast not in CASTS:
        raise ValueError(f"cast must be one of {CASTS}, got {cast!r}")
    if torch.compiler.is_compiling():  # the compiler fuses the composition and recomputes it in backward itself
        return _forward(x, weight, eps, offset, cast)[0]
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x, weight, eps, offset, cast)
    if cast == "llama" and not offset and x.dtype == weight.dtype == torch.float32:
        return torch.rms_norm(x, x.shape[-1:], weight, eps)  # one op, the same bits
    return _forward(x, weight, eps, offset, cast)[0]  # inference: no autograd node to build


# --- triton ---------------------------------------------------------------------------------

@jit
def _fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, n_cols, eps, offset, GEMMA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    normed = x * rstd
    w = tl.load(W + cols, mask=mask, other=0.0)
    if GEMMA:
        y = normed * (w.to(tl.float32) + offset)
    else:  # Llama: cast the normalised input first; (w + offset) in the weight's dtype
        scale = rounded(w.to(tl.float32) + offset, W.dtype.element_ty)
        y = scale * rounded(normed, X.dtype.element_ty)
    tl.store(Y + row * stride_y + cols, cast(y, Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@jit
def _bwd_kernel(DY, X, W, RSTD, DX, DW, stride_dy, stride_x, stride_dx, n_rows, n_cols, offset, rows_per_program,
                GEMMA: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    scale = w + offset
    if not GEMMA:
        scale = rounded(scale, W.dtype.element_ty)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid * rows_per_program
    for row in range(start, tl.minimum(start + rows_per_program, n_rows)):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        normed = x * rstd
        if GEMMA:
            dw += dy * normed
            dn = dy * scale
        else:
            dw += rounded(dy * rounded(normed, X.dtype.element_ty), DY.dtype.element_ty)
            dn = rounded(dy * scale, DY.dtype.element_ty)
        dot = tl.sum(dn * normed, axis=0) / n_cols
        tl.store(DX + row * stride_dx + cols, cast((dn - normed * dot) * rstd, DX.dtype.element_ty), mask=mask)
    tl.store(DW + pid * n_cols + cols, dw, mask=mask)


def _out_dtype(x, weight, cast):
    return x.dtype if cast == "gemma" else torch.promote_types(x.dtype, weight.dtype)


# Triton launches are custom ops, opaque to torch.compile: dynamo cannot trace a launch, least of all an interpreted one

@torch.library.custom_op("patchkit::rms_norm_triton", mutates_args=())
def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
                  cast: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, reciprocal RMS per row)."""
    x2 = rows2d(x)
    n_rows, n_cols = x2.shape
    y = torch.empty((n_rows, n_cols), dtype=_out_dtype(x, weight, cast), device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    _fwd_kernel[(n_rows,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), n_cols, eps, offset,
                           GEMMA=cast == "gemma", BLOCK=block(n_cols))
    return y.view(x.shape), rstd


@_rms_norm_fwd.register_fake
def _(x, weight, eps, offset, cast):
    return x.new_empty(x.shape, dtype=_out_dtype(x, weight, cast)), x.new_empty(x.shape[:-1].numel(),
                                                                               dtype=torch.float32)


@torch.library.custom_op("patchkit::rms_norm_triton_backward", mutates_args=())
def _rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float,
                  cast: str) -> tuple[torch.Tensor, torch.Tensor]:
    x2, dy2 = rows2d(x), rows2d(dy)
    n_rows, n_cols = x2.shape
    programs = max(min(n_rows, 128), 1)
    per_program = -(-n_rows // programs)
    dx = torch.empty_like(x2)
    dw = torch.zeros((programs, n_cols), dtype=torch.float32, device=x2.device)
    _bwd_kernel[(programs,)](dy2, x2, weight, rstd, dx, dw, dy2.stride(0), x2.stride(0), dx.stride(0), n_rows,
                             n_cols, offset, per_program, GEMMA=cast == "gemma", BLOCK=block(n_cols))
    return dx.view(x.shape), dw.sum(0).to(weight.dtype)


@_rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, offset, cast):
    return torch.empty_like(x), torch.empty_like(weight)


def _rms_norm_context(ctx, inputs, output):
    x, weight, _, ctx.offset, ctx.cast = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rms_norm_grad(ctx, dy, _):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_bwd(dy, x, weight, rstd, ctx.offset, ctx.cast)
    return dx, dw, None, None, None


_rms_norm_fwd.register_autograd(_rms_norm_grad, setup_context=_rms_norm_context)


def rms_norm_triton(x, weight, eps, *, offset=0.0, cast="llama"):
    if cast not in CASTS:
        raise ValueError(f"cast must be one of {CASTS}, got {cast!r}")
    return _rms_norm_fwd(x, weight, float(eps), float(offset), cast)[0]
