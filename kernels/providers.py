"""The built-in kernel providers, registered through the same hook as third-party ones."""

from patchkit.plugins import hookimpl

from . import _triton, liger
from ._dispatch import Provider
from .cross_entropy import fused_linear_cross_entropy_torch, fused_linear_cross_entropy_triton
from .log_probs import linear_log_probs_torch, linear_log_probs_triton
from .lora import lora_linear_torch, lora_mlp_torch
from .mlp import geglu_torch, geglu_triton, swiglu_torch, swiglu_triton
from .rms_norm import rms_norm_torch, rms_norm_triton
from .rope import apply_rope_torch, apply_rope_triton

# matmuls with in-place epilogues, no kernel of their own to gain (docs/kernels.md): the torch provider's alone; an
# explicit triton or liger backend runs them too, as it runs any op it lacks (`_dispatch._resolve`)
COMPOSITE = {"lora_linear": lora_linear_torch, "lora_mlp": lora_mlp_torch}

TORCH = Provider(
    name="torch",
    ops={
        "rms_norm": rms_norm_torch,
        "apply_rope": apply_rope_torch,
        "swiglu": swiglu_torch,
        "geglu": geglu_torch,
        "fused_linear_cross_entropy": fused_linear_cross_entropy_torch,
        "linear_log_probs": linear_log_probs_torch,
        **COMPOSITE,
    },
    devices=None,
    auto_devices=(),
    priority=0,
    description="PyTorch with lean custom autograd; the reference and the CPU path",
)

TRITON = Provider(
    name="triton",
    ops={
        "rms_norm": rms_norm_triton,
        "apply_rope": apply_rope_triton,
        "swiglu": swiglu_triton,
        "geglu": geglu_triton,
        "fused_linear_cross_entropy": fused_linear_cross_entropy_triton,
        "linear_log_probs": linear_log_probs_triton,
    },
    devices=("cuda",),
    auto_devices=("cuda",),
    priority=10,
    check=_triton.unavailable,
    description="patchkit's Triton kernels; CPU tensors under TRITON_INTERPRET=1",
)

LIGER = Provider(
    name="liger",
    ops={
        "rms_norm": liger.rms_norm_liger,
        "apply_rope": liger.apply_rope_liger,
        "swiglu": liger.swiglu_liger,
        "geglu": liger.geglu_liger,
        "fused_linear_cross_entropy": liger.fused_linear_cross_entropy_liger,
    },
    devices=("cuda",),
    auto_devices=("cuda",),
    priority=20,
    check=liger.unavailable,
    description="liger-kernel's ops (CUDA only)",
)


@hookimpl
def patchkit_kernel_providers():
    return [TORCH, TRITON, LIGER]
