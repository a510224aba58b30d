"""Matrix products of the decode loop: `project(linear, x)`, with the fastest CPU kernel for its shape.

Decoding multiplies every weight by a few rows per step, and which BLAS call does that fastest depends on
the machine: on 2-core cloud CPUs, oneDNN's or MKL's packed copy of a weight beats `x @ W^T` by 1.5-2.3x at
1-8 rows, and `W @ x^T` often comes second. So inside a decode call (`Products` set by `Decoding.step`), the
first product of each float32 CPU (weight shape, row count) in a process times the candidates — `x @ W^T`
(`F.linear`), `W @ x^T`, and MKL's and oneDNN's packed copies where torch has them — from a cold cache
(logged once per process), and every later product uses the fastest. Packed copies cost as much memory
again as their weights: a decode call makes them on first use, only where one is the fastest, while they fit
in half the memory available when it began, and frees them when it ends. `PATCHKIT_TIMED_PRODUCTS=0` turns
the timing off (every product is `F.linear`). Outside a decode call `project` is `linear(x)`: a user's own
forwards time nothing and allocate nothing. The timing draws no random numbers from the user's generator.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from .system import proc_field

log = logging.getLogger("patchkit")
_ranked: dict[tuple, tuple[str, ...]] = {}  # (out, in, rows, bias, threads) -> kernels, fastest first


def _wxt(x2, weight, bias):
    """`x2 @ W^T` as `(W @ x2^T)^T`: for a few rows the BLAS then blocks the weight's long side."""
    out = torch.mm(weight, x2.T) if bias is None else torch.addmm(bias[:, None], weight, x2.T)
    return out.T


def _mkl(packed, x2, weight, bias):
    return torch.ops.mkl._mkl_linear(x2, packed, weight, bias, x2.shape[0])


def _onednn(packed, x2, weight, bias):
    return torch.ops.mkldnn._linear_pointwise(x2, packed, bias, "none", [], "")


# name -> (product of (rows, in) inputs, the weight copy it multiplies by or None, whether this torch has it)
KERNELS = {
    "linear": (lambda packed, x2, weight, bias: F.linear(x2, weight, bias), None, lambda: True),
    "wxt": (lambda packed, x2, weight, bias: _wxt(x2, weight, bias), None, lambda: True),
    "mkl": (_mkl, lambda weight, rows: torch.ops.mkl._mkl_reorder_linear_weight(weight, rows),
            torch.backends.mkl.is_available),
    "onednn": (_onednn, lambda weight, rows: torch.ops.mkldnn._reorder_linear_weight(weight, rows),
               torch.backends.mkldnn.is_available),
}
MEASURED = 1 << 14  # weight elements (64 KiB in float32): smaller ones differ too little to be worth timing


def available() -> list[str]:
    return [name for name, (_, _, here) in KERNELS.items() if here()]


def copy_for(name: str, weight: torch.Tensor, rows: int) -> torch.Tensor | None:
    """The weight copy kernel `name` multiplies `rows` rows by (None: it reads the weight as it is)."""
    make = KERNELS[name][1]
    return None if make is None else make(weight, rows)


def ranking(weight: torch.Tensor, bias: torch.Tensor | None, rows: int) -> tuple[str, ...]:
    """The kernels for `rows` rows times `weight`, fastest first: measured once per process and shape. A decode
    step streams every weight of the model from memory, one after another; so each timing runs the kernel over
    a row of distinct copies of the weight (about 32 MiB of them, 1 to 8) after reading the caches clean, and
    each kernel's figure is its best of 3 interleaved timings after one to warm up."""
    key = (*weight.shape, rows, bias is None, torch.get_num_threads())
    if key not in _ranked:
        if not _ranked:
            log.info("patchkit: the decode loop times %s for each weight shape's first product in this process and "
                     "uses the fastest (PATCHKIT_TIMED_PRODUCTS=0: F.linear only)", ", ".join(available()))
        x2 = torch.randn(rows, weight.shape[1], dtype=weight.dtype, generator=torch.Generator().manual_seed(0))
        weights = [weight, *(weight.clone() for _ in range(min(7, (32 << 20) // weight.nbytes)))]
        names = available()
        copies = {name: [copy_for(name, w, rows) for w in weights] for name in names}
        best = dict.fromkeys(names, float("inf"))
        for rep in range(4):
            for name in names:
                kernel = KERNELS[name][0]
                _evict_caches()
                start = time.perf_counter()
                for w, copy in zip(weights, copies[name]):
                    kernel(copy, x2, w, bias)
                if rep:
                    best[name] = min(best[name], time.perf_counter() - start)
        _ranked[key] = tuple(sorted(names, key=best.get))
    return _ranked[key]


@functools.cache
def _cache_sized_buffer() -> torch.Tensor:
    """Twice the last-level cache (Linux's sysfs; 32 MiB where unknown), at least 32 MiB, written once."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            cache = int(f.read().strip().rstrip("K")) * 1024
    except (OSError, ValueError):
        cache = 32 << 20
    return torch.ones(max(2 * cache, 32 << 20) // 4)


def _evict_caches() -> None:
    _cache_sized_buffer().sum()  # a read: no dirty lines left for the timed kernel to write back


def timed() -> bool:
    """Whether decode calls time their products (`PATCHKIT_TIMED_PRODUCTS`, on unless "0")."""
    return os.environ.get("PATCHKIT_TIMED_PRODUCTS", "1") != "0"


def _measurable(weight: torch.Tensor, rows: int) -> bool:
    return (rows <= 64 and weight.numel() >= MEASURED and weight.device.type == "cpu" and weight.dtype == torch.float32
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling())


class Products(dict):
    """For one decode call of `rows` rows: each plain `nn.Linear`'s fastest product, `f(x2, weight, bias)` over
    (rows, in) inputs, where that is not `F.linear` (None: `F.linear`). A kernel that multiplies by a packed copy
    of the weight (MKL's, oneDNN's) gets it on first use, while it fits the budget: half the memory available
    when the call began (Linux; elsewhere none), or none where `packed` is False (a trainer's generation, where
    memory is the training's); past it, the next fastest kernel serves."""

    def __init__(self, rows: int, packed: bool = True):
        super().__init__()
        self.rows, self.timed = rows, timed()
        self.budget = _available_memory() // 2 if rows <= 64 and packed else 0

    def __missing__(self, linear: nn.Linear):
        weight, bias = linear.weight, linear.bias
        choice = None
        if self.timed and _measurable(weight, self.rows):
            copies = {name for name, (_, make, _) in KERNELS.items() if make is not None}
            name = next(n for n in ranking(weight, bias, self.rows) if n not in copies or weight.nbytes <= self.budget)
            if name in copies:
                self.budget -= weight.nbytes
            if name != "linear":
                choice = functools.partial(KERNELS[name][0], copy_for(name, weight, self.rows))
        self[linear] = choice
        return choice


def _available_memory() -> int:
    """Linux's estimate of the memory available without swapping (MemAvailable), in bytes; 0 where unknown."""
    available = proc_field("/proc/meminfo", "MemAvailable")
    return int(available.split()[0]) * 1024 if available else 0


_products: ContextVar[Products | None] = ContextVar("patchkit_products", default=None)  # set by `Decoding.step`


def project(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`linear(x)`; in a decode step (`Products` set), a plain float32 `nn.Linear` on a CPU runs the fastest product
    for its shape (a packed copy where that is the fastest). Anything else (PEFT LoRA, a quantized layer, autograd,
    a graph being compiled, a user's own forward) calls the layer, hooks and all."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled() or type(linear) is not nn.Linear:
        return linear(x)  # before the context variable: dynamo cannot read one
    products = _products.get()
    if products is None or x.dim() != 2 or x.shape[0] != products.rows:  # not a decode step's rows
        return linear(x)
    weight, bias = linear._parameters["weight"], linear._parameters["bias"]  # a plain Linear: no module lookup
    choice = products[linear]
    return F.linear(x, weight, bias) if choice is None else choice(x, weight, bias)
