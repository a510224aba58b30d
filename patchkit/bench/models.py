"""The benchmarks' models: random weights, Llama-style dimensions, any registered family."""

from __future__ import annotations

import torch

from ..vision import vision_language

TRAIN = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=1408, vocab_size=128256, max_position_embeddings=2048)
# mixture-of-experts families at that shape: 8 experts, 2 per token, each half the dense MLP's width (Mixtral's
# experts are `intermediate_size` wide), every layer sparse
MOE = dict(num_experts=8, num_local_experts=8, num_experts_per_tok=2, moe_intermediate_size=704)
# the projections `sft` and `context` put LoRA adapters on
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# a vision-language model's tower (CLIP-style: 224-pixel images in 14-pixel patches, 256 image tokens), one image
# per row, its tokens in the text
VISION = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=224,
              patch_size=14)


def model_for(arch: str, dims: dict):
    """A random model of architecture `arch` (its first head: `*ForCausalLM`; a vision-language
    `*ForConditionalGeneration` with a `VISION` tower) whose language model has Llama-style dimensions `dims`
    (head_dim = hidden / heads)."""
    from patchkit import _resolve

    family = _resolve(arch)[0]
    model_class = family.model_class()
    multimodal = vision_language(model_class.config_class)
    text_class = type(model_class.config_class().text_config) if multimodal else family.config_type()
    sparse = any(hasattr(text_class(), key) for key in ("num_experts", "num_local_experts"))
    head_dim = dims["hidden_size"] // dims["num_attention_heads"]
    config = text_class(**{"head_dim": head_dim, "tie_word_embeddings": False, **(MOE if sparse else {}), **dims})
    rope = getattr(config, "rope_parameters", None) or {}
    if "mrope_section" in rope:  # Qwen-VL: time, height, width sections over half the head, as its 16:24:24
        rope["mrope_section"] = [head_dim // 2 - 2 * (3 * head_dim // 16), 3 * head_dim // 16, 3 * head_dim // 16]
    for token in ("pad_token_id", "bos_token_id", "eos_token_id"):  # defaults of a larger vocabulary (GLM-4)
        if isinstance(getattr(config, token, None), int) and getattr(config, token) >= config.vocab_size:
            setattr(config, token, None)
    if multimodal:
        vision = {**family.tiny_multimodal["vision_config"], **VISION}
        config = model_class.config_class(**{**family.tiny_multimodal, "vision_config": vision,
                                             "text_config": config.to_dict(), "tie_word_embeddings": False})
    config._attn_implementation = "sdpa" if getattr(model_class, "_supports_sdpa", True) else "eager"
    torch.manual_seed(0)
    return family.name, model_class(config)
