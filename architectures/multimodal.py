"""Vision-language models: the language model's ops fused, the conditional-generation forward's training loss
without logits (with or without images), the vision tower as transformers ships it.

- LLaVA and Mistral 3 wrap a language model of another family (their config's `text_config`: Llama, Mistral,
  ...). The wrapper's own file holds no decoder, so it patches only `{prefix}ForConditionalGeneration.forward`;
  `patch(model)` patches the language model's family with it, `patch("llava")` by name its usual one
  (`text_model_type`). The decode step is the language model family's.
- Qwen2.5-VL and Qwen3-VL carry their language model in their own modeling file: Qwen 2 (Qwen 3, with q/k
  norms) whose rotary module mixes three position rows (time, height, width) into one table before
  `apply_rotary_pos_emb`, which is patched unchanged. Their MLP and norm classes are named apart from the
  wrapper's prefix. The vision blocks' attention goes through the same `ALL_ATTENTION_FUNCTIONS`, where it is
  not causal and carries no position ids, so it runs transformers' own function.
- Gemma 3's wrapper shares its text model's file (`Gemma3Text`, architectures/gemma.py).
"""

from typing import ClassVar

from patchkit.architecture import replaces

from .llama import Llama
from .qwen import Qwen2, Qwen3

VISION = {"hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2, "num_attention_heads": 4}
TOKENS = {"image_token_id": 210}  # atop the tiny vocabulary: the verifier's random ids stay below (text_vocab)


class Llava(Llama):
    name = "llava"
    heads = ("{prefix}ForConditionalGeneration",)
    text_model_type = "llama"
    rms_norm = rope = mlp = attention = None  # main diff with Llama: the language model's family fuses these
    tiny_multimodal: ClassVar[dict] = {**TOKENS, "vision_config": {**VISION, "model_type": "clip_vision_model",
                                                                   "image_size": 8, "patch_size": 4}}


class Mistral3(Llava):
    name = "mistral3"
    text_model_type = "mistral"
    tiny_config: ClassVar[dict] = {"model_type": "mistral", "sliding_window": 8}
    tiny_multimodal: ClassVar[dict] = {**TOKENS, "spatial_merge_size": 2, "vision_feature_layer": -1,
                                       "vision_config": {**VISION, "model_type": "pixtral", "head_dim": 8,
                                                         "image_size": 16, "patch_size": 4}}


QWEN_VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 40, "num_heads": 4, "out_hidden_size": 64,
               "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2}
QWEN_TOKENS = {"image_token_id": 210, "video_token_id": 209, "vision_start_token_id": 208,
               "vision_end_token_id": 207}


def mrope(self, backbone, h, position):
    """`decode_rope` of a Qwen-VL language model: `generate` gives four position rows (text, then time, height and
    width), its rotary module takes the last three."""
    return Llama.decode_rope(self, backbone, h, position[-3:] if position.dim() == 3 else position)


class Qwen2_5_VL(Qwen2):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl", "qwen2_5_vl_text")
    heads = ("{prefix}ForConditionalGeneration",)
    tiny_config: ClassVar[dict] = {"bos_token_id": 1, "eos_token_id": 2,
                                   "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                       "mrope_section": [2, 2, 4]}}
    tiny_multimodal: ClassVar[dict] = {**QWEN_TOKENS, "vision_config": {**QWEN_VISION, "window_size": 16,
                                                                         "fullatt_block_indexes": [1]}}

    decode_rope = mrope  # main diff with Qwen 2 in decoding

    @replaces("mlp", "Qwen2MLP.forward")  # main diff with Qwen 2: the language model's MLP keeps Qwen 2's name
    def mlp(self, original):
        return super().mlp(original)


class Qwen3VL(Qwen3):
    name = "qwen3_vl"
    model_types = ("qwen3_vl", "qwen3_vl_text")
    prefix = "Qwen3VLText"  # main diff with Qwen 3: the language model's classes, under the wrapper's head
    heads = ("Qwen3VLForConditionalGeneration",)
    config_class = "Qwen3VLConfig"
    tiny_config: ClassVar[dict] = {"bos_token_id": 1, "eos_token_id": 2,
                                   "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                       "mrope_section": [2, 2, 4], "mrope_interleaved": True}}
    decode_rope = mrope
    tiny_multimodal: ClassVar[dict] = {**QWEN_TOKENS, "vision_config": {
        **QWEN_VISION, "num_position_embeddings": 16, "deepstack_visual_indexes": [0]}}
