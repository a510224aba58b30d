"""Mistral and Ministral: Llama with sliding-window attention.

The window lives in the attention mask and the attention call, which patchkit leaves alone, so
every fused op applies unchanged; the decode step reads only the window's cache slots, for every
layer (Mistral's attention modules do not carry the window). The verifier's tiny model uses a
window shorter than its sequences, so parity covers tokens beyond the window.

Ministral is Qwen 2 (biased q/k/v) with per-layer-type windows, which its attention modules carry: nothing to
state but its name and a tiny model that slides on one layer.
"""

from typing import ClassVar

from .llama import Llama
from .qwen import Qwen2


class Mistral(Llama):
    name = "mistral"
    tiny_config: ClassVar[dict] = {"sliding_window": 8}

    def decode_window(self, attn):  # main diff with Llama: every layer slides, by the config's window
        return attn.config.sliding_window


class Ministral(Qwen2):
    name = "ministral"
    tiny_config: ClassVar[dict] = {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}
