"""RMSNorm: `x / rms(x) * (offset + weight)`, computed in float32.

`cast="llama"` casts the normalised input back to its dtype before the weight multiply
(LlamaRMSNorm); `cast="gemma"` multiplies in float32 and casts at the end (GemmaRMSNorm).
Backward keeps only the input and the reciprocal RMS; the normalised input is recomputed.
"""

from __future__ import annotations

import torch

from ._dispatch import dispatch

CASTS = ("llama", "gemma")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, offset: float = 0.0,
             cast: str = "llama", backend: str = "auto") -> torch.Tensor:
    return dispatch("rms_norm", backend, x.device)(x, weight, eps, offset=offset, cast=cast)


def _scale(weight: torch.Tensor, offset: float, cast: str) -> torch.Tensor:
    w = weight.float() if cast == "gemma" else weight
    return w + offset if offset else w


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset, cast):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        normed = xf * rstd
        if cast == "gemma":
            y = (normed * _scale(weight, offset, cast)).to(x.dtype)
        else:
            y = _scale(weight, offset, cast) * normed.to(x.dtype)
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
    return _RMSNorm.apply(x, weight, eps, offset, cast)
