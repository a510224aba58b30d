"""Built-in architecture plugins: one module per family; `llama` is the base the others extend.

This package is also what `patchkit.architectures()` calls: the package and the function share
the name the design gives them, so the module itself is callable.
"""

import sys
import types

from patchkit.plugins import hookimpl

from .cohere import Cohere2
from .exaone import Exaone4
from .gemma import Gemma, Gemma2, Gemma3Text
from .glm import Glm4
from .granite import Granite
from .llama import Llama
from .mistral import Ministral, Mistral
from .moe import GptOss, GraniteMoe, Mixtral, Olmoe, Qwen3Moe
from .multimodal import Llava, Mistral3, Qwen2_5_VL, Qwen3VL
from .olmo import Olmo2, Olmo3
from .phi3 import Phi3
from .qwen import Qwen2, Qwen3
from .smollm3 import SmolLM3


@hookimpl
def patchkit_architectures():
    return [Llama, Mistral, Gemma, Gemma2, Gemma3Text, Qwen2, Qwen3, Phi3, Granite, Olmo2, Olmo3, SmolLM3, Glm4,
            Cohere2, Exaone4, Ministral, Qwen3Moe, Mixtral, Olmoe, GraniteMoe, GptOss, Llava, Mistral3,
            Qwen2_5_VL, Qwen3VL]


class _CallableModule(types.ModuleType):
    def __call__(self) -> list[str]:
        """The names of every registered architecture, built-in and from plugins."""
        from patchkit.plugins import manager

        return list(manager().architectures)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["Cohere2", "Exaone4", "Gemma", "Gemma2", "Gemma3Text", "Glm4", "GptOss", "Granite", "GraniteMoe", "Llama",
           "Llava", "Ministral", "Mistral", "Mistral3", "Mixtral", "Olmo2", "Olmo3", "Olmoe", "Phi3", "Qwen2",
           "Qwen2_5_VL", "Qwen3", "Qwen3Moe", "Qwen3VL", "SmolLM3"]
