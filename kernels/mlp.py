"""Gated activations of the MLP: `swiglu = silu(gate) * up`, `geglu = gelu_tanh(gate) * up`.

Backward keeps gate and up only; the activation is recomputed instead of stored.

`activation_kernel(module)` says which of the two an MLP's activation module calls for (None: neither, the
MLP runs unfused); `register_activation` teaches it another activation class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import dispatch
from ._triton import cast, jit, launch, rounded, tanh, tl, triton


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    return dispatch("swiglu", backend, gate.device)(gate, up)


def geglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    return dispatch("geglu", backend, gate.device)(gate, up)


ACTIVATIONS: dict[type, str] = {}  # activation module class -> gated op; a plain dict: dynamo reads it


def register_activation(cls: type, kernel: str) -> None:
    """Serve MLPs whose activation module is a `cls` with the gated op `kernel` ("swiglu" or "geglu")."""
    if kernel not in ("swiglu", "geglu"):
        raise ValueError(f"kernel must be 'swiglu' or 'geglu', got {kernel!r}")
    _defaults()
    ACTIVATIONS[cls] = kernel


def _defaults() -> None:
    if not ACTIVATIONS:
        from torch import nn
        from transformers import activations as A

        ACTIVATIONS.update({A.SiLUActivation: "swiglu", nn.SiLU: "swiglu", A.GELUTanh: "geglu",
                            A.NewGELUActivation: "geglu"})  # gelu_new is the tanh approximation too


def activation_kernel(module) -> str | None:
    """The gated op ("swiglu", "geglu") for an MLP whose activation module is `module`, or None."""
    _defaults()
    return ACTIVATIONS.get(type(module))


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def _silu_backward_(grad, x):
    return torch.ops.aten.silu_backward.grad_input(grad, x, grad_input=grad)


def _gelu_tanh_backward_(grad, x):
    return torch.ops.aten.gelu_backward.grad_input(grad, x, approximate="tanh", grad_input=grad)


class _Gated(torch.autograd.Function):
    """Elementwise work in place wherever the reference would allocate a second tensor."""

    @staticmethod
    def forward(ctx, gate, up, act, act_backward_):
        ctx.save_for_backward(gate, up)
        ctx.act, ctx.act_backward_ = act, act_backward_
        return act(gate).mul_(up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dgate = ctx.act_backward_(dy * up, gate) if ctx.needs_input_grad[0] else None
        dup = ctx.act(gate).mul_(dy) if ctx.needs_input_grad[1] else None
        return dgate, dup, None, None


def _gated(gate, up, act, act_backward_):
    if torch.compiler.is_compiling():  # the compiler fuses the composition and recomputes it in backward itself
        return act(gate) * up
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _Gated.apply(gate, up, act, act_backward_)
    return act(gate).mul_(up)  # inference: no autograd node to build


def swiglu_torch(gate, up):
    return _gated(gate, up, F.silu, _silu_backward_)


def geglu_torch(gate, up):
    return _gated(gate, up, _gelu_tanh, _gelu_tanh_backward_)


# --- triton ---------------------------------------------------------------------------------

SILU, GELU_TANH = 0, 1
_BLOCK = 1024


@jit
def _act(g, ACT: tl.constexpr):
    """(activation, its derivative) of float32 `g`."""
    if ACT == 0:
        s = tl.sigmoid(g)
        return g * s, s * (1.0 + g * (1.0 - s))
    else:
        t = tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))
        return 0.5 * g * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (
            1.0 + 3.0 * 0.044715 * g * g)


@jit
def _gated_fwd(G, U, Y, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # past 2^31 elements: int64 offsets
    mask = i < n
    g = tl.load(G + i, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + i, mask=mask, other=0.0).to(tl.float32)
    a, _ = _act(g, ACT)
    a = rounded(a, Y.dtype.element_ty)  # the activation is a tensor of its own in the reference
    tl.store(Y + i, cast(a * u, Y.dtype.element_ty), mask=mask)


@jit
def _gated_bwd(DY, G, U, DG, DU, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # past 2^31 elements: int64 offsets
    mask = i < n
    dy = tl.load(DY + i, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + i, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + i, mask=mask, other=0.0).to(tl.float32)
    a, da = _act(g, ACT)
    dyu = rounded(dy * u, DG.dtype.element_ty)
    tl.store(DG + i, cast(dyu * da, DG.dtype.element_ty), mask=mask)
    tl.store(DU + i, cast(dy * rounded(a, DU.dtype.element_ty), DU.dtype.element_ty), mask=mask)


# Triton launches are custom ops, opaque to torch.compile: dynamo cannot trace a launch, least of all an interpreted one

@torch.library.custom_op("patchkit::gated_triton", mutates_args=())
def _gated_op(gate: torch.Tensor, up: torch.Tensor, act: int) -> torch.Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(gate)
    launch(_gated_fwd, (triton.cdiv(gate.numel(), _BLOCK),), gate, up, y, gate.numel(), ACT=act, BLOCK=_BLOCK)
    return y


@_gated_op.register_fake
def _(gate, up, act):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("patchkit::gated_triton_backward", mutates_args=())
def _gated_bwd_op(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                  act: int) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = gate.contiguous(), up.contiguous()
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    launch(_gated_bwd, (triton.cdiv(gate.numel(), _BLOCK),), dy.contiguous(), gate, up, dg, du, gate.numel(), ACT=act,
           BLOCK=_BLOCK)
    return dg, du


@_gated_bwd_op.register_fake
def _(dy, gate, up, act):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(up, memory_format=torch.contiguous_format))


def _gated_context(ctx, inputs, output):
    gate, up, ctx.act = inputs
    ctx.save_for_backward(gate, up)


def _gated_grad(ctx, dy):
    gate, up = ctx.saved_tensors
    return *_gated_bwd_op(dy, gate, up, ctx.act), None


_gated_op.register_autograd(_gated_grad, setup_context=_gated_context)


def swiglu_triton(gate, up):
    return _gated_op(gate, up, SILU)


def geglu_triton(gate, up):
    return _gated_op(gate, up, GELU_TANH)
