"""Fused ops. Each op is one function with one signature for every backend; `backend=` picks one.

The bundled `torch` provider is the reference and the CPU path. Providers are contributed
through the `patchkit_kernel_providers` hook.
"""

from ._dispatch import OPS, BackendError, Provider, clear_cache, dispatch, resolve
from .cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_torch
from .mlp import geglu, geglu_torch, swiglu, swiglu_torch
from .rms_norm import rms_norm, rms_norm_torch
from .rope import apply_rope, apply_rope_torch

TORCH = Provider(
    name="torch",
    ops={
        "rms_norm": rms_norm_torch,
        "apply_rope": apply_rope_torch,
        "swiglu": swiglu_torch,
        "geglu": geglu_torch,
        "fused_linear_cross_entropy": fused_linear_cross_entropy_torch,
    },
    devices=None,
    auto_devices=(),
    priority=0,
    description="PyTorch with lean custom autograd; the reference and the CPU path",
)

__all__ = [
    "OPS", "BackendError", "Provider", "TORCH", "apply_rope", "clear_cache", "dispatch", "fused_linear_cross_entropy",
    "geglu", "resolve", "rms_norm", "swiglu",
]
