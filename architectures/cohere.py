"""Cohere 2 (Command R7B, Command A): parallel attention and MLP blocks under one LayerNorm, a logit scale,
interleaved RoPE on the sliding-window layers only.

- Its norm is a LayerNorm (mean-centred, weight only), not an RMSNorm: the `rms_norm` op is left to
  transformers and `norm` calls the module itself.
- RoPE rotates interleaved pairs (`OwnRope`), and only in sliding layers (`rotary_layer`).
- `logit_scale` multiplies the logits: the fused loss, TRL's head and the decode step multiply the hidden
  states instead.
- The decoder layer adds attention and MLP of the same normed input to the residual (`decode_layer`).
"""

from typing import ClassVar

from .llama import Llama, OwnRope


class Cohere2(OwnRope, Llama):
    name = "cohere2"
    rms_norm = None  # main diff with Llama: a LayerNorm, transformers' own
    tiny_config: ClassVar[dict] = {"logit_scale": 0.4, "layer_norm_eps": 1e-3, "sliding_window": 8,
                                   "layer_types": ["sliding_attention", "full_attention"], "pad_token_id": 0,
                                   "bos_token_id": 1, "eos_token_id": 2}

    def norm(self, module, x):
        return module(x)

    def logit_scale(self, config):
        return config.logit_scale

    def rotary_layer(self, attn):
        return attn.sliding_window is not None

    def decode_layer(self, layer, h, rope, state, i):  # parallel blocks over one norm
        x = self.norm(layer.input_layernorm, h)
        return h + self.decode_attention(layer.self_attn, x, rope, state, i) + self.feed_forward(layer.mlp, x)
