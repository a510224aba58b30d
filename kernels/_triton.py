"""Optional Triton. Kernels are defined whether or not triton imports, and launched only when the
`triton` provider can run them: on CUDA, or on CPU tensors when TRITON_INTERPRET=1 was set before
patchkit was imported (triton decides at definition time whether a kernel is interpreted).
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    jit = triton.jit
except ImportError:  # kernel definitions still import; they are never launched
    triton = None

    class tl:  # noqa: N801 - stands in for triton.language in annotations
        constexpr = None

    def jit(fn):
        return fn


INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable(device_type: str) -> str | None:
    """Why the triton kernels cannot run on `device_type`, or None when they can."""
    if triton is None:
        return "backend 'triton' needs the triton package: pip install 'patchkit-llm[triton]'"
    if device_type == "cuda" or (device_type == "cpu" and INTERPRETED):
        return None
    return (f"backend 'triton' runs on cuda (or on cpu tensors under TRITON_INTERPRET=1, set before importing "
            f"patchkit), not on {device_type!r}")


def block(n: int) -> int:
    """The power of two that covers `n` columns."""
    return 1 << max(n - 1, 0).bit_length()


def rows2d(x):
    """`x` as (rows, last dim) with unit stride on the last dim (a copy only when needed)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


@jit
def cast(x, DTYPE: tl.constexpr):
    """float32 `x` as DTYPE, rounded to nearest even. Spelled out for bfloat16 because Triton's
    interpreter truncates there, while GPUs round: CI must check what GPUs compute."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@jit
def tanh(x):
    """tanh through sigmoid, which every Triton backend and the interpreter have."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@jit
def rounded(x, DTYPE: tl.constexpr):
    """float32 `x` rounded to DTYPE's precision, kept in float32 (a reference's intermediate cast)."""
    return cast(x, DTYPE).to(tl.float32)
