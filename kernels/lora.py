"""LoRA projections folded into the fused ops: `y = x W^T + b + s (x A^T) B^T` in one autograd node.

A `Projection` is a linear layer as the kernels see it: the base weight (frozen in LoRA, or
trainable), an optional bias, and optionally one LoRA adapter (A: r x in, B: out x r, scale s),
which may be kept in float32 over a half-precision base, as PEFT does by default.
- `lora_linear(x, proj)`: one projection. The adapter's output is added by `addmm_` into the
  base output (no scaled copy, no sum tensor); saved for backward: `x` and the small `x A^T`.
- `lora_mlp(x, gate, up, down, activation=...)`: the gated MLP with any of its three projections
  adapted. Saved: `x`, the gate and up outputs and the small adapter inputs; the activation and
  the down projection's input are recomputed in backward, where unfused PEFT keeps both.
Gradients go only where `requires_grad` asks (frozen base weights get none). Under autocast the
inputs are cast to its dtype first, as `F.linear` would be. These are matmuls with in-place
epilogues, so every backend runs this same composition.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import quantized
from ._dispatch import dispatch
from .mlp import _gelu_tanh, _gelu_tanh_backward_, _silu_backward_

ACTIVATIONS = {"swiglu": (F.silu, _silu_backward_), "geglu": (_gelu_tanh, _gelu_tanh_backward_)}


class Projection(NamedTuple):
    weight: torch.Tensor | quantized.Quantized  # a quantized base (bitsandbytes): dequantized tile by tile
    bias: torch.Tensor | None = None
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    scaling: float = 1.0


def lora_linear(x: torch.Tensor, proj: Projection, *, backend: str = "auto") -> torch.Tensor:
    fn = dispatch("lora_linear", backend, x.device)
    return _autocast(lambda x, proj: fn(x, proj), x, proj)


def lora_mlp(x: torch.Tensor, gate: Projection, up: Projection, down: Projection, *, activation: str = "swiglu",
             backend: str = "auto") -> torch.Tensor:
    fn = dispatch("lora_mlp", backend, x.device)
    return _autocast(lambda x, *p: fn(x, *p, activation=activation), x, gate, up, down)


def _autocast(fn, x, *projections):
    """Under autocast, run in its dtype as `F.linear` would (casts are differentiable; master weights stay)."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return fn(x, *projections)
    dtype = torch.get_autocast_dtype(device)
    cast = [Projection(*(t if t is None else t.to(dtype) for t in p[:4]), p.scaling) for p in projections]
    with torch.autocast(device, enabled=False):
        return fn(x.to(dtype), *cast)


def _forward(x2, p: Projection):
    """(x W^T + b + s (x A^T) B^T, x A^T)."""
    if isinstance(p.weight, quantized.Quantized):
        y = quantized.linear(x2, p.weight, p.bias)
    else:
        y = torch.addmm(p.bias, x2, p.weight.t()) if p.bias is not None else x2 @ p.weight.t()
    if p.lora_a is None:
        return y, None
    xa = x2.to(p.lora_a.dtype) @ p.lora_a.t()
    if p.lora_a.dtype == y.dtype:
        return y.addmm_(xa, p.lora_b.t(), alpha=p.scaling), xa
    return y.add_((xa @ p.lora_b.t()).mul_(p.scaling)), xa  # adapters kept in float32 over a half-precision base


def _backward(g2, x2, p: Projection, xa, needs, dx=None):
    """Parameter grads of one projection (weight, bias, A, B), and `dx` accumulated in place if given."""
    need_w, need_b, need_a, need_b_lora = needs
    dw = g2.t() @ x2 if need_w else None
    db = g2.sum(0) if need_b else None
    da = dbl = None
    if isinstance(p.weight, quantized.Quantized):
        dx = quantized.matmul(g2, p.weight, dx)
    elif dx is None:
        dx = g2 @ p.weight
    else:
        dx.addmm_(g2, p.weight)
    if p.lora_a is not None:
        g2 = g2.to(p.lora_a.dtype)
        gb = g2 @ p.lora_b
        dbl = (g2.t() @ xa).mul_(p.scaling) if need_b_lora else None
        gb.mul_(p.scaling)  # the gradient of x A^T
        da = gb.t() @ x2.to(gb.dtype) if need_a else None
        dx.addmm_(gb, p.lora_a) if gb.dtype == dx.dtype else dx.add_(gb @ p.lora_a)
    return dx, (dw, db, da, dbl)


def _flat(p: Projection):
    return p.weight, p.bias, p.lora_a, p.lora_b


def _save(ctx, *tensors):
    """`save_for_backward`, with quantized weights (not tensors; held by their layers anyway) kept on ctx."""
    ctx.quantized = {i: t for i, t in enumerate(tensors) if isinstance(t, quantized.Quantized)}
    ctx.save_for_backward(*(None if i in ctx.quantized else t for i, t in enumerate(tensors)))


def _saved(ctx):
    return [ctx.quantized.get(i, t) for i, t in enumerate(ctx.saved_tensors)]


def _needs(ctx, start):
    return ctx.needs_input_grad[start:start + 4]


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        p = Projection(weight, bias, lora_a, lora_b, scaling)
        x2 = x.reshape(-1, x.shape[-1])
        y, xa = _forward(x2, p)
        _save(ctx, x2, weight, bias, lora_a, lora_b, xa)
        ctx.scaling, ctx.shape = scaling, x.shape
        return y  # flat: the caller's reshape makes the view, so the result may be modified in place (OLMoE's clip)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, bias, lora_a, lora_b, xa = _saved(ctx)
        p = Projection(weight, bias, lora_a, lora_b, ctx.scaling)
        dx, grads = _backward(dy.reshape(-1, dy.shape[-1]), x2, p, xa, _needs(ctx, 1))
        return (dx.view(ctx.shape) if ctx.needs_input_grad[0] else None), *grads, None


class _LoRAMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, activation, scalings, *params):
        gate_p, up_p, down_p = (Projection(*params[i:i + 4], scalings[i // 4]) for i in (0, 4, 8))
        act, _ = ACTIVATIONS[activation]
        x2 = x.reshape(-1, x.shape[-1])
        gate, xa_gate = _forward(x2, gate_p)
        up, xa_up = _forward(x2, up_p)
        out, xa_down = _forward(act(gate).mul_(up), down_p)
        _save(ctx, x2, gate, up, xa_gate, xa_up, xa_down, *params)
        ctx.activation, ctx.scalings, ctx.shape = activation, scalings, x.shape
        return out  # flat, as `_LoRALinear`

    @staticmethod
    def backward(ctx, dout):
        x2, gate, up, xa_gate, xa_up, xa_down, *params = _saved(ctx)
        gate_p, up_p, down_p = (Projection(*params[i:i + 4], ctx.scalings[i // 4]) for i in (0, 4, 8))
        act, act_backward_ = ACTIVATIONS[ctx.activation]
        a = act(gate)
        needs_h = down_p.lora_a is not None or ctx.needs_input_grad[11]
        h = a * up if needs_h else None  # the down projection's input, recomputed only if a gradient needs it
        dh, down_grads = _backward(dout.reshape(-1, dout.shape[-1]), h, down_p, xa_down, _needs(ctx, 11))
        del h
        dgate = act_backward_(dh * up, gate)
        dup = a.mul_(dh)
        del dh
        dx, gate_grads = _backward(dgate, x2, gate_p, xa_gate, _needs(ctx, 3))
        dx, up_grads = _backward(dup, x2, up_p, xa_up, _needs(ctx, 7), dx)
        return (dx.view(ctx.shape) if ctx.needs_input_grad[0] else None), None, None, *gate_grads, *up_grads, \
            *down_grads


def lora_linear_torch(x, proj):
    y = _LoRALinear.apply(x, *_flat(proj), proj.scaling)
    return y.view(*x.shape[:-1], y.shape[-1])


def lora_mlp_torch(x, gate, up, down, *, activation="swiglu"):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    out = _LoRAMLP.apply(x, activation, (gate.scaling, up.scaling, down.scaling), *_flat(gate), *_flat(up),
                         *_flat(down))
    return out.view(*x.shape[:-1], out.shape[-1])
