"""RMSNorm: `x / rms(x) * (offset + weight)`, computed in float32.

`cast="llama"` casts the normalised input back to its dtype before the weight multiply
(LlamaRMSNorm); `cast="gemma"` multiplies in float32 and casts at the end (GemmaRMSNorm).
Backward keeps only the input and the reciprocal RMS; the normalised input is recomputed.
"""

from __future__ import annotations

import torch

from ._dispatch import dispatch
from ._triton import block, cast, jit, launch, processors, rounded, rows2d, tl, triton, warps

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
def _fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, n_rows, n_cols, eps, offset, GEMMA: tl.constexpr,
                BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """ROWS rows of BLOCK columns per program: many for narrow rows (q/k norms), one for a model's hidden."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    normed = x * rstd[:, None]
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0)[None, :]
    if GEMMA:
        y = normed * (w.to(tl.float32) + offset)
    else:  # Llama: cast the normalised input first; (w + offset) in the weight's dtype
        scale = rounded(w.to(tl.float32) + offset, W.dtype.element_ty)
        y = scale * rounded(normed, X.dtype.element_ty)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], cast(y, Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@jit
def _scale_of(W, cols, col_ok, offset, GEMMA: tl.constexpr):
    """(offset + weight) in float32, rounded to the weight's dtype first for Llama's cast."""
    scale = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :] + offset
    return scale if GEMMA else rounded(scale, W.dtype.element_ty)


@jit
def _bwd_row(X, DY, RSTD, rows, cols, mask, row_ok, stride_x, stride_dy, scale, GEMMA: tl.constexpr):
    """Rows of the output gradient, d(normalised) and the normalised input."""
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    normed = x * tl.load(RSTD + rows, mask=row_ok, other=0.0)[:, None]
    dn = dy * scale if GEMMA else rounded(dy * scale, DY.dtype.element_ty)
    return dy, dn, normed


@jit
def _dx_dw(X, DY, RSTD, DOT, DX, W, start, end, rows_per_program, cols, n_cols, offset, stride_x, stride_dy, stride_dx,
           GEMMA: tl.constexpr, ROWS: tl.constexpr, WIDTH: tl.constexpr, DOT_KNOWN: tl.constexpr):
    """The input gradient of rows start..end over `cols`, ROWS at a time, and their weight-gradient sum there.
    Each row's dot(d normalised, normalised) is summed here, or with DOT_KNOWN read from DOT."""
    col_ok = cols < n_cols
    scale = _scale_of(W, cols, col_ok, offset, GEMMA)
    dw = tl.zeros([ROWS, WIDTH], dtype=tl.float32)
    for first in range(0, rows_per_program, ROWS):
        rows = start + first + tl.arange(0, ROWS)
        row_ok = rows < end
        mask = row_ok[:, None] & col_ok[None, :]
        dy, dn, normed = _bwd_row(X, DY, RSTD, rows, cols, mask, row_ok, stride_x, stride_dy, scale, GEMMA)
        if GEMMA:
            dw += dy * normed
        else:
            dw += rounded(dy * rounded(normed, X.dtype.element_ty), DY.dtype.element_ty)
        dot = tl.load(DOT + rows, mask=row_ok, other=0.0) if DOT_KNOWN else tl.sum(dn * normed, axis=1)
        dx = (dn - normed * (dot / n_cols)[:, None]) * tl.load(RSTD + rows, mask=row_ok, other=0.0)[:, None]
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], cast(dx, DX.dtype.element_ty), mask=mask)
    return tl.sum(dw, axis=0)


@jit
def _bwd_kernel(DY, X, W, RSTD, DOT, DX, DW, stride_dy, stride_x, stride_dx, n_rows, n_cols, offset,
                rows_per_program, GEMMA: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, TILES: tl.constexpr):
    """`rows_per_program` consecutive rows; the program's weight-gradient partial sum to DW. A row too wide for
    registers beside that sum (TILES > 1) goes in column tiles: first every row's dot product, tile by tile (to
    DOT), then per tile the input gradient and the weight gradient's share."""
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * rows_per_program
    end = tl.minimum(start + rows_per_program, n_rows)
    out = DW + pid.to(tl.int64) * n_cols
    if TILES == 1:
        cols = tl.arange(0, BLOCK)
        dw = _dx_dw(X, DY, RSTD, DOT, DX, W, start, end, rows_per_program, cols, n_cols, offset, stride_x, stride_dy,
                    stride_dx, GEMMA, ROWS, BLOCK, False)
        tl.store(out + cols, dw, mask=cols < n_cols)
    else:
        for first in range(0, rows_per_program, ROWS):
            rows = start + first + tl.arange(0, ROWS)
            row_ok = rows < end
            dot = tl.zeros([ROWS], dtype=tl.float32)
            for tile in tl.static_range(TILES):
                part = tile * (BLOCK // TILES) + tl.arange(0, BLOCK // TILES)
                part_ok = part < n_cols
                _, dn, normed = _bwd_row(X, DY, RSTD, rows, part, row_ok[:, None] & part_ok[None, :], row_ok,
                                         stride_x, stride_dy, _scale_of(W, part, part_ok, offset, GEMMA), GEMMA)
                dot += tl.sum(dn * normed, axis=1)
            tl.store(DOT + rows, dot, mask=row_ok)
        for tile in tl.static_range(TILES):
            part = tile * (BLOCK // TILES) + tl.arange(0, BLOCK // TILES)
            dw = _dx_dw(X, DY, RSTD, DOT, DX, W, start, end, rows_per_program, part, n_cols, offset, stride_x,
                        stride_dy, stride_dx, GEMMA, ROWS, BLOCK // TILES, True)
            tl.store(out + part, dw, mask=part < n_cols)


def _shape(n_rows, n_cols):
    """(BLOCK, ROWS): a program covers whole rows, and narrow ones (q/k norms over a head) 2048 values' worth at
    a time, so a program is not a lone short row."""
    width = block(n_cols)
    return width, max(1, min(2048 // width, block(n_rows)))


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
    width, rows = _shape(n_rows, n_cols)
    launch(_fwd_kernel, (triton.cdiv(n_rows, rows),), x2, weight, y, rstd, x2.stride(0), y.stride(0), n_rows, n_cols,
           eps, offset, GEMMA=cast == "gemma", BLOCK=width, ROWS=rows, num_warps=warps(width * rows))
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
    width, rows = _shape(n_rows, n_cols)
    # a few programs per multiprocessor, each summing its rows' weight gradient: fewer partial sums to add
    programs = max(min(4 * processors(x.device), triton.cdiv(n_rows, rows)), 1)
    per_program = triton.cdiv(triton.cdiv(n_rows, programs), rows) * rows
    dx = torch.empty_like(x2)
    dw = torch.empty((programs, n_cols), dtype=torch.float32, device=x2.device)
    tiles = 4 if width * rows > 8192 else 1  # past 8192 values a row no longer fits beside its weight gradient
    dot = torch.empty(n_rows, dtype=torch.float32, device=x2.device) if tiles > 1 else rstd  # else unread
    launch(_bwd_kernel, (programs,), dy2, x2, weight, rstd, dot, dx, dw, dy2.stride(0), x2.stride(0), dx.stride(0),
           n_rows, n_cols, offset, per_program, GEMMA=cast == "gemma", BLOCK=width, ROWS=rows, TILES=tiles,
           num_warps=warps(width * rows // tiles, per_thread=8 if tiles == 1 else 4))
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
