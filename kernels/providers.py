"""The built-in kernel providers, registered through the same hook as third-party ones."""

from patchkit.plugins import hookimpl

from . import LIGER, TORCH, TRITON


@hookimpl
def patchkit_kernel_providers():
    return [TORCH, TRITON, LIGER]
