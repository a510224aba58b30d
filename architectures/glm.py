"""GLM-4 (`glm4`): Llama with Phi-3's fused `gate_up_proj`, biased q/k/v, "sandwich" norms and interleaved
partial RoPE.

- RoPE rotates interleaved pairs over half of each head: another layout than the fused kernels', so the
  `rope` op is left to transformers (`OwnRope`), and the decode step rotates with GLM's own function.
- The decoder layer norms the attention and MLP outputs too (`post_self_attn_layernorm`,
  `post_mlp_layernorm`), which its decode step restates.
"""

from typing import ClassVar

from .llama import Llama, OwnRope
from .phi3 import Phi3


class Glm4(OwnRope, Llama):
    name = "glm4"
    tiny_config: ClassVar[dict] = {"partial_rotary_factor": 0.5, "pad_token_id": 0, "eos_token_id": 2}
    mlp_parts = Phi3.mlp_parts  # one fused gate_up projection, as Phi-3's

    def decode_layer(self, layer, h, rope, state, i):
        attended = self.decode_attention(layer.self_attn, self.norm(layer.input_layernorm, h), rope, state, i)
        h = h + self.norm(layer.post_self_attn_layernorm, attended)
        fed = self.feed_forward(layer.mlp, self.norm(layer.post_attention_layernorm, h))
        return h + self.norm(layer.post_mlp_layernorm, fed)
