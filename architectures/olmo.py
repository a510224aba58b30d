"""OLMo 2 and OLMo 3.

- OLMo 2: RMSNorm multiplies by the weight in float32 and casts at the end (`norm_cast="gemma"`); the
  decoder layer norms the attention and MLP outputs instead of their inputs (post-norm); q/k norms span all
  heads, before the split into heads.
- OLMo 3: OLMo 2 with sliding-window layers (the attention modules carry the window) and one rotary table per
  layer type, as Gemma 3.
"""

from typing import ClassVar

from .llama import LAYER_TYPE_TINY_ROPE, Llama, layer_type_rope


class Olmo2(Llama):
    name = "olmo2"
    norm_cast = "gemma"  # main diff with Llama: float32 multiply, cast at the end
    tiny_config: ClassVar[dict] = {"pad_token_id": 0, "eos_token_id": 2}

    def qk_norm(self, attn, q, k):  # q/k norms over all heads, before the split
        return (self.norm(attn.q_norm, q.flatten(-2)).view(q.shape),
                self.norm(attn.k_norm, k.flatten(-2)).view(k.shape))

    def decode_layer(self, layer, h, rope, state, i):  # post-norm: the outputs are normed, not the inputs
        h = h + self.norm(layer.post_attention_layernorm, self.decode_attention(layer.self_attn, h, rope, state, i))
        return h + self.norm(layer.post_feedforward_layernorm, self.feed_forward(layer._modules[self.ffn], h))


class Olmo3(Olmo2):
    name = "olmo3"
    tiny_config: ClassVar[dict] = {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"],
                                   "rope_parameters": LAYER_TYPE_TINY_ROPE}
    decode_rope = layer_type_rope  # main diff with OLMo 2: one rotary table per layer type
