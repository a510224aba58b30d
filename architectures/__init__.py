"""Built-in architecture plugins: one module per family; `llama` is the base the others extend.

This package is also what `patchkit.architectures()` calls: the package and the function share
the name the design gives them, so the module itself is callable.
"""

import sys
import types

from patchkit.plugins import hookimpl

from .gemma import Gemma, Gemma2, Gemma3Text
from .llama import Llama
from .mistral import Mistral
from .qwen import Qwen2, Qwen3


@hookimpl
def patchkit_architectures():
    return [Llama, Mistral, Gemma, Gemma2, Gemma3Text, Qwen2, Qwen3]


class _CallableModule(types.ModuleType):
    def __call__(self) -> list[str]:
        """The names of every registered architecture, built-in and from plugins."""
        from patchkit.plugins import manager

        return list(manager().architectures)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["Gemma", "Gemma2", "Gemma3Text", "Llama", "Mistral", "Qwen2", "Qwen3"]
