"""SmolLM3: Llama whose every `no_rope_layer_interval`-th layer applies no RoPE (NoPE).

Those layers' attention never calls `apply_rotary_pos_emb`, so training needs nothing; the decode step asks
`rotary_layer` and writes their keys unrotated. Sliding windows (with `use_sliding_window`) sit on the
attention modules, as Qwen 2's.
"""

from typing import ClassVar

from .llama import Llama


class SmolLM3(Llama):
    name = "smollm3"
    tiny_config: ClassVar[dict] = {"no_rope_layer_interval": 2, "use_sliding_window": True, "sliding_window": 8,
                                   "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

    def rotary_layer(self, attn):
        return bool(attn.use_rope)
