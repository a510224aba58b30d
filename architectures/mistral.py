"""Mistral: Llama with sliding-window attention.

The window lives in the attention mask and the attention call, which patchkit leaves alone, so
every fused op applies unchanged; the decode step reads only the window's cache slots, for every
layer (Mistral's attention modules do not carry the window). The verifier's tiny model uses a
window shorter than its sequences, so parity covers tokens beyond the window.
"""

from typing import ClassVar

from .llama import Llama


class Mistral(Llama):
    name = "mistral"
    tiny_config: ClassVar[dict] = {"sliding_window": 8}

    def decode_window(self, attn):  # main diff with Llama: every layer slides, by the config's window
        return attn.config.sliding_window
