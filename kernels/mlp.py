"""Gated activations of the MLP: `swiglu = silu(gate) * up`, `geglu = gelu_tanh(gate) * up`.

Backward keeps gate and up only; the activation is recomputed instead of stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import dispatch


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    return dispatch("swiglu", backend, gate.device)(gate, up)


def geglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    return dispatch("geglu", backend, gate.device)(gate, up)


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def _gelu_tanh_backward(grad, x):
    return torch.ops.aten.gelu_backward(grad, x, approximate="tanh")


class _Gated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, act, act_backward):
        ctx.save_for_backward(gate, up)
        ctx.act, ctx.act_backward = act, act_backward
        return act(gate) * up

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dgate = ctx.act_backward(dy * up, gate) if ctx.needs_input_grad[0] else None
        dup = dy * ctx.act(gate) if ctx.needs_input_grad[1] else None
        return dgate, dup, None, None


def swiglu_torch(gate, up):
    return _Gated.apply(gate, up, F.silu, torch.ops.aten.silu_backward)


def geglu_torch(gate, up):
    return _Gated.apply(gate, up, _gelu_tanh, _gelu_tanh_backward)
