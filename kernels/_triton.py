"""Optional Triton. Kernels are defined whether or not triton imports, and launched only when the
`triton` provider can run them: on CUDA, or on CPU tensors when TRITON_INTERPRET=1 was set before
patchkit was imported (triton decides at definition time whether a kernel is interpreted).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

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
_EXACT_BF16 = tl.constexpr(INTERPRETED) if triton is not None else INTERPRETED  # see `cast`


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


def launch(kernel, grid, *args, **kwargs) -> None:
    """`kernel[grid](*args, **kwargs)` in the context of its tensors' device. Triton launches on the current
    device: without the guard, a model on cuda:1 (or split by `device_map="auto"`) would run in cuda:0's."""
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    with on(device):
        kernel[grid](*args, **kwargs)


def on(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def warp_size() -> int:
    """Threads per warp of the target launches go to: 64 on AMD's CDNA, 32 on NVIDIA (and the interpreter)."""
    try:
        return triton.runtime.driver.active.get_current_target().warp_size
    except Exception:  # noqa: BLE001 - the interpreter's driver, no driver: a warp size is moot there
        return 32


def warps(elements: int, per_thread: int = 16) -> int:
    """Warps for a program that holds `elements` float32 values of a row at once: about `per_thread` each, so
    a wide row spreads over more threads instead of spilling (4 to 1024 threads' worth)."""
    size = warp_size()
    return max(min(block(max(elements // (per_thread * size), 1)), 1024 // size), 4 if size == 32 else 2)


@functools.cache
def processors(device: torch.device) -> int:
    """Streaming multiprocessors (compute units) of `device`; 132 (an H100's) where there is no GPU to ask."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


ROW_BLOCK = 16384  # logits a vocabulary-streaming program takes at once: 16 a thread over 1024 threads


def rows2d(x):
    """`x` as (rows, last dim) with unit stride on the last dim (a copy only when needed)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


@jit
def cast(x, DTYPE: tl.constexpr):
    """float32 `x` as DTYPE, rounded to nearest even, NaN kept NaN. GPUs do that in one instruction
    (`cvt.rn.bf16.f32`); Triton's interpreter truncates to bfloat16, so there it is spelled out: CI checks
    what GPUs compute."""
    if DTYPE == tl.bfloat16 and _EXACT_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        even = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(x == x, even, (bits >> 16) | 0x40)  # a NaN's rounding could carry into -0.0 or inf
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
