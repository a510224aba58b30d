"""Phi-3 and Phi-4-mini (model type `phi3`): Mistral with fused projections and partial rotary.

- One `qkv_proj` for the attention's three projections and one `gate_up_proj` whose output is `[gate | up]`,
  its activation named `activation_fn`: stated by `qkv` and `mlp_parts`. The fused MLP chunks the one
  projection; with LoRA on it, `kernels.lora_mlp` takes its two halves as views of its weights.
- Phi-4-mini rotates only `partial_rotary_factor` of each head: the rotary tables are that narrow, and every
  RoPE path (torch, triton, the decode step) rotates the leading features and passes the rest through.
- The sliding window is the config's, for every layer, as in Mistral; residual dropout stays in the decoder
  layer, untouched.
- LongRoPE switches to its long factors once a sequence passes `original_max_position_embeddings`, and
  transformers' generate then recomputes the cache: generation that may go past it runs transformers' loop.
"""

from typing import ClassVar

from patchkit.products import project

from .mistral import Mistral


class Phi3(Mistral):
    name = "phi3"
    # Phi-4-mini's partial rotary; LongRoPE scaling past 64 positions (the tables are 0.75 * 16 / 2 = 6 wide)
    tiny_config: ClassVar[dict] = {"partial_rotary_factor": 0.75, "pad_token_id": 0, "bos_token_id": 1,
                                   "eos_token_id": 2, "original_max_position_embeddings": 64,
                                   "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                                       "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                                                       "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0]}}

    def mlp_parts(self, module):  # main diff with Llama: one fused gate_up projection
        modules = module._modules
        return modules["gate_up_proj"], modules["down_proj"], modules.get("activation_fn")

    def qkv(self, attn, x):  # main diff with Llama: one fused qkv projection
        q_size = attn.config.num_attention_heads * attn.head_dim
        kv_size = attn.num_key_value_heads * attn.head_dim
        return project(attn._modules["qkv_proj"], x).split((q_size, kv_size, kv_size), dim=-1)

    def decode_unserved(self, lm, max_length):
        limit = getattr(lm.config, "original_max_position_embeddings", None)
        if (lm.config.rope_parameters or {}).get("rope_type") == "longrope" and limit and max_length > limit:
            return (f"LongRoPE past original_max_position_embeddings ({limit}): transformers recomputes the cache "
                    "with the long factors there")
        return None
