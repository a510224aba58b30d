"""Built-in architecture plugins: one module per family; `llama` is the base the others extend.

This package is also what `patchkit.architectures()` calls: the package and the function share
the name the design gives them, so the module itself is callable.
"""

import sys
import types

from patchkit.plugins import hookimpl

from .llama import Llama


@hookimpl
def patchkit_architectures():
    return [Llama]


class _CallableModule(types.ModuleType):
    def __call__(self) -> list[str]:
        """The names of every registered architecture, built-in and from plugins."""
        from patchkit.plugins import manager

        return list(manager().architectures)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["Llama"]
