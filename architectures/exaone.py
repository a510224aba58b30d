"""EXAONE 4: OLMo 2's post-norm decoder layer with Llama's RMSNorm cast and per-head q/k norms; with a
sliding window, the full-attention layers apply no RoPE.

Every attention module carries the config's window; `is_sliding` says which layers use it.
"""

from typing import ClassVar

from . import llama, olmo


class Exaone4(olmo.Olmo2):
    name = "exaone4"
    tiny_config: ClassVar[dict] = {"sliding_window": 8, "sliding_window_pattern": 2}
    norm_cast = "llama"  # Exaone4RMSNorm is Llama's
    qk_norm = llama.Llama.qk_norm  # per head, after the split

    def decode_window(self, attn):
        return attn.sliding_window if attn.is_sliding else None

    def rotary_layer(self, attn):
        return attn.sliding_window is None or attn.is_sliding
