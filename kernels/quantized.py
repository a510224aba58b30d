"""Frozen base weights stored quantized (bitsandbytes' 4-bit nf4/fp4, double-quantized or not, and 8-bit), as the
LoRA ops multiply by them: dequantized a tile of output rows at a time into each matmul, never kept.

`Quantized` stands in a `Projection` where a weight tensor would be (`kernels.lora`); `linear(x, w, bias)` is
`x W^T + b` and `matmul(g, w, out)` is `g W` (the input gradient), both tile by tile, in the layer's compute dtype
as bitsandbytes computes (results in the input's dtype). A base weight never trains, so nothing else is needed:
no weight gradient, nothing saved but the quantized weight the layer holds anyway.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from ._triton import cast, jit, launch, tl, triton

TILE_ELEMENTS = 1 << 22  # dequantized values per tile: 16 MiB in float32, whatever the layer's size


@dataclass(frozen=True)
class Quantized:
    """A quantized (out, in) weight. `data`: 4-bit: the packed bytes (two values a byte, row-major), with `absmax`
    per `blocksize` values (already dequantized where double-quantized) and `quant_type`; 8-bit: the int8 rows
    with `absmax` their scales. `dtype` is what products run in (None: the input's, as bitsandbytes' 8-bit
    matmul and a 4-bit layer without a compute dtype do)."""

    data: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int]
    dtype: torch.dtype | None
    bits: int
    blocksize: int = 0
    quant_type: str = ""

    requires_grad = False  # a frozen base: the ops give it no gradient

    @property
    def device(self) -> torch.device:
        return self.data.device

    def __getitem__(self, rows: slice) -> Quantized:
        """Rows of the weight (a tile; a fused projection's halves), still quantized: whole blocks only."""
        start, stop, step = rows.indices(self.shape[0])
        n_in = self.shape[1]
        if step != 1:
            raise ValueError("a quantized weight slices whole rows, in order")
        if (start, stop) == (0, self.shape[0]):
            return self
        if self.bits == 8:
            return replace(self, data=self.data[start:stop], absmax=self.absmax[start:stop], shape=(stop - start, n_in))
        if (start * n_in) % self.blocksize or (stop * n_in) % self.blocksize:
            raise ValueError(f"rows {start}..{stop} of a 4-bit weight split its blocks of {self.blocksize}")
        return replace(self, data=self.data.view(-1)[start * n_in // 2: stop * n_in // 2],
                       absmax=self.absmax[start * n_in // self.blocksize: stop * n_in // self.blocksize],
                       shape=(stop - start, n_in))

    def to(self, dtype: torch.dtype) -> Quantized:
        """The same weight, its products in `dtype` (autocast's)."""
        return replace(self, dtype=dtype)

    def tile_rows(self) -> int:
        """Output rows per tile: a multiple of what a 4-bit block spans, so a tile's blocks are whole."""
        rows = max(TILE_ELEMENTS // self.shape[1], 1)
        if self.bits == 4 and (self.shape[1] % self.blocksize or self.shape[1] % 2):
            return self.shape[0]  # blocks straddle rows: one tile
        return min(rows, self.shape[0])

    def tiles(self, dtype: torch.dtype):
        """(rows, their dequantized weight) for each tile of output rows, in order."""
        step = self.tile_rows()
        for start in range(0, self.shape[0], step):
            rows = slice(start, min(start + step, self.shape[0]))
            yield rows, self[rows].dequantized(dtype)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in `dtype`."""
        if self.bits == 8:
            return (self.data.to(torch.float32) * (self.absmax[:, None] / 127)).to(dtype)
        if self.device.type in ("cuda", "meta") and triton is not None:  # meta: a GPU's launches, recorded
            return dequantize_4bit_triton(self.data.view(-1), self.absmax, self.blocksize, self.quant_type,
                                          self.shape, dtype)
        return torch.ops.bitsandbytes.dequantize_4bit(self.data.view(-1), self.absmax, self.blocksize,
                                                      self.quant_type, list(self.shape), dtype)


def linear(x2: torch.Tensor, w: Quantized, bias: torch.Tensor | None) -> torch.Tensor:
    """x2 W^T + bias for (rows, in) `x2`, in x2's dtype, computed in w's dtype one tile of W at a time."""
    dtype = w.dtype or x2.dtype
    xc = x2.to(dtype)
    y = torch.empty(x2.shape[0], w.shape[0], dtype=dtype, device=x2.device)
    for rows, tile in w.tiles(dtype):
        torch.mm(xc, tile.t(), out=y[:, rows])
    if bias is not None:
        y.add_(bias.to(dtype))
    return y.to(x2.dtype)


def matmul(g2: torch.Tensor, w: Quantized, out: torch.Tensor | None = None) -> torch.Tensor:
    """g2 W for (rows, out) `g2`, added into `out` when given (else a new tensor of g2's dtype), one tile of W at a
    time."""
    dtype = w.dtype or g2.dtype
    gc = g2.to(dtype)
    acc = torch.zeros(g2.shape[0], w.shape[1], dtype=dtype, device=g2.device)
    for rows, tile in w.tiles(dtype):
        acc.addmm_(gc[:, rows], tile)
    if out is None:
        return acc.to(g2.dtype)
    return out.add_(acc)


def is_bitsandbytes(layer: torch.nn.Module) -> bool:
    """Whether `layer` is bitsandbytes' 4-bit or 8-bit linear layer."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def of(layer: torch.nn.Module) -> Quantized | None:
    """The quantized weight of a bitsandbytes `Linear4bit` or `Linear8bitLt`, or None: another layer, a weight not
    (yet) quantized, or one bitsandbytes repacked for its CPU inference kernel."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        state = getattr(weight, "quant_state", None)
        if state is None or getattr(state, "packing_format_for_cpu", False) or state.shape is None:
            return None
        absmax = state.absmax
        if state.nested:
            absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        return Quantized(weight.data, absmax.float(), tuple(state.shape), layer.compute_dtype, 4, state.blocksize,
                         state.quant_type)
    if isinstance(layer, bnb.nn.Linear8bitLt):
        scales = getattr(weight, "SCB", None)
        if scales is None:
            scales = getattr(layer.state, "SCB", None)
        if weight.dtype != torch.int8 or scales is None or layer.state.has_fp16_weights:
            return None
        return Quantized(weight.data, scales.float(), tuple(weight.shape), None, 8)
    return None


# --- triton ---------------------------------------------------------------------------------

@jit
def _dequantize_4bit_kernel(A, ABSMAX, CODE, OUT, n, blocksize, BLOCK: tl.constexpr):
    """BLOCK values of a 4-bit weight: value i is byte i // 2's high nibble (i even) or low nibble, looked up in
    the 16-value code and scaled by its block's absmax."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    byte = tl.load(A + i // 2, mask=ok, other=0).to(tl.int32)
    nibble = tl.where(i % 2 == 0, byte >> 4, byte & 15)
    value = tl.load(CODE + nibble, mask=ok, other=0.0) * tl.load(ABSMAX + i // blocksize, mask=ok, other=0.0)
    tl.store(OUT + i, cast(value, OUT.dtype.element_ty), mask=ok)


@functools.cache
def _code(quant_type: str, device: torch.device) -> torch.Tensor:
    from bitsandbytes.functional import get_4bit_type

    return get_4bit_type(quant_type, device=device).float()


def dequantize_4bit_triton(data: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                           shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' `dequantize_4bit` (packed bytes, float32 absmax per block) as one Triton launch."""
    n = shape[0] * shape[1]
    out = torch.empty(shape, dtype=dtype, device=data.device)
    launch(_dequantize_4bit_kernel, (triton.cdiv(n, 1024),), data, absmax, _code(quant_type, data.device), out, n,
           blocksize, BLOCK=1024)
    return out
