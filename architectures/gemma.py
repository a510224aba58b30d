"""Gemma, Gemma 2 and Gemma 3 (text): each a list of differences from its parent.

- Gemma: RMSNorm multiplies by `(1 + weight)` in float32 and casts at the end (weights are
  stored as offsets from 1 and initialised to zeros); its eps attribute is `eps`. The MLP's
  tanh-GELU picks the `geglu` kernel from the module's `act_fn`, and the `sqrt(hidden)`
  embedding scale stays in `GemmaTextScaledWordEmbedding`, untouched.
- Gemma 2: final-logit soft-capping, which the inherited causal-LM forward reads from the
  config and applies inside the fused cross-entropy; attention soft-capping and the alternating
  sliding-window layers stay in transformers' attention. Its decoder layer norms the attention
  and MLP outputs too, which its decode step restates.
- Gemma 3: Gemma 2 plus q/k norms, which are `Gemma3RMSNorm` modules and so go through
  the patched norm; one rotary module with per-layer-type buffers, whose outputs feed the same
  `apply_rotary_pos_emb` (the decode step asks it once per layer type). The vision-language
  `Gemma3ForConditionalGeneration` shares the file: its loss is fused too (it does not soft-cap its
  logits), its projector's norm is a `Gemma3RMSNorm`; the SigLIP tower runs as transformers ships it.
"""

from typing import ClassVar

from patchkit.vision import vision_language

from .llama import LAYER_TYPE_TINY_ROPE, Llama, layer_type_rope


class Gemma(Llama):
    name = "gemma"
    tiny_config: ClassVar[dict] = {}
    norm_offset = 1.0  # main diff with Llama: (1 + weight)
    norm_cast = "gemma"  # float32 multiply, cast at the end
    norm_eps = "eps"


class Gemma2(Gemma):
    name = "gemma2"
    # a window shorter than the verifier's sequences; a cap small enough to bend the logits
    tiny_config: ClassVar[dict] = {"sliding_window": 8, "final_logit_softcapping": 0.5,
                                   "attn_logit_softcapping": 5.0}

    def decode_layer(self, layer, h, rope, state, i):  # main diff with Llama: attention and MLP outputs normed too
        attended = self.decode_attention(layer.self_attn, self.norm(layer.input_layernorm, h), rope, state, i)
        h = h + self.norm(layer.post_attention_layernorm, attended)
        fed = self.feed_forward(layer.mlp, self.norm(layer.pre_feedforward_layernorm, h))
        return h + self.norm(layer.post_feedforward_layernorm, fed)


class Gemma3Text(Gemma2):
    name = "gemma3_text"
    model_types = ("gemma3_text", "gemma3")  # the multimodal model's text tower is the same module
    module = "transformers.models.gemma3.modeling_gemma3"
    prefix = "Gemma3"
    config_class = "Gemma3TextConfig"
    tiny_config: ClassVar[dict] = {"layer_types": ["sliding_attention", "full_attention"],
                                   "attn_logit_softcapping": None,  # Gemma 3 attends with sdpa: no attention cap
                                   "query_pre_attn_scalar": 24,
                                   "rope_parameters": LAYER_TYPE_TINY_ROPE}

    decode_rope = layer_type_rope  # main diff with Gemma 2: one rotary table per layer type
    heads = ("{prefix}ForCausalLM", "{prefix}ForConditionalGeneration")  # the vision-language model shares the file
    tiny_multimodal: ClassVar[dict] = {"image_token_id": 210, "boi_token_id": 209, "eoi_token_id": 208,
                                       "mm_tokens_per_image": 4, "vision_config": {
                                           "model_type": "siglip_vision_model", "hidden_size": 32,
                                           "intermediate_size": 40, "num_hidden_layers": 2, "num_attention_heads": 4,
                                           "image_size": 16, "patch_size": 4}}

    def logit_softcap(self, lm):  # transformers soft-caps Gemma 3's text-only model, not the vision-language one
        return None if vision_language(lm.config) else super().logit_softcap(lm)
