"""Fused ops. Each op is one function with one signature for every backend; `backend=` picks one.

The bundled `torch` provider is the reference and the CPU path. Providers are contributed
through the `patchkit_kernel_providers` hook.

A checkout's `kernels/` directory can also be found as a top-level `kernels` package (the
repository root on `sys.path`: tests, scripts run there), and transformers imports `kernels` to
import Hugging Face's `kernels` package (a dependency of transformers 5.25+). Imported under that
name this module hands the name over to Hugging Face's package where one is installed (the import
system returns whatever `sys.modules` holds once this file has run), and defines nothing itself, so
the ops (`torch.library` custom ops among them) are defined once, as `patchkit.kernels`.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels' (Hugging Face's; this is patchkit's kernels/ source "
                                  "folder, importable as patchkit.kernels)", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
elif __name__ == "patchkit.kernels":
    from . import _triton, liger, quantized
    from ._dispatch import (OPS, BackendError, Provider, clear_cache, dispatch, fell_back, prepare, resolve, served,
                            serving)
    from .cross_entropy import (fused_linear_cross_entropy, fused_linear_cross_entropy_torch,
                                fused_linear_cross_entropy_triton)
    from .log_probs import linear_log_probs, linear_log_probs_torch, linear_log_probs_triton
    from .lora import Projection, lora_linear, lora_linear_torch, lora_mlp, lora_mlp_torch
    from .mlp import (ACTIVATIONS, activation_kernel, geglu, geglu_torch, geglu_triton, register_activation, swiglu,
                      swiglu_torch, swiglu_triton)
    from .rms_norm import rms_norm, rms_norm_torch, rms_norm_triton
    from .rope import apply_rope, apply_rope_torch, apply_rope_triton, rope_into, signed_sin
    from .providers import COMPOSITE, LIGER, TORCH, TRITON

__all__ = [
    "ACTIVATIONS", "LIGER", "OPS", "BackendError", "Projection", "Provider", "TORCH", "TRITON", "activation_kernel",
    "apply_rope", "clear_cache", "dispatch", "fell_back", "fused_linear_cross_entropy", "geglu", "linear_log_probs",
    "lora_linear",
    "lora_mlp", "prepare", "register_activation", "resolve", "rms_norm", "rope_into", "served", "serving", "signed_sin",
    "swiglu",
]
