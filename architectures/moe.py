"""Mixture-of-experts families: Qwen 3 MoE, Mixtral, OLMoE, Granite MoE, GPT-OSS.

transformers routes (its router modules run untouched) and runs the experts through its own experts seam,
`use_experts_implementation`: the `eager` loop, `batched_mm` or `grouped_mm` (its default), chosen by
`config._experts_implementation`. The `experts` op replaces the experts class's `_apply_gate`, the gated
activation `batched_mm` and `grouped_mm` call on the `[gate | up]` projection of the routed tokens, with the gated
kernel of the experts' activation (`kernels.swiglu`: the activation is not stored for backward). The `eager`
loop computes its gate inline: its experts run as transformers ships them.

- The router's auxiliary loss: `extra_loss` computes it from the backbone's router logits as the original
  forward does (`load_balancing_loss_func`, the coefficient, only with `output_router_logits`), and the output is
  the original's `MoeCausalLMOutputWithPast` with `aux_loss` and `router_logits`.
- The decode step runs a sparse block as transformers ships it on the step's one token per row (`feed_forward`).
- No dense MLP class but Qwen 3 MoE's (its `mlp_only_layers`): `mlp` is off elsewhere.
"""

from __future__ import annotations

import sys

from typing import Any, ClassVar

import torch

from patchkit import kernels as K
from patchkit.architecture import replaces

from .granite import Granite
from .llama import Llama, rope_table
from .mistral import Mistral
from .olmo import Olmo2

# every MoE setting away from its default, under each config's own name for it. `output_router_logits` stays off
# in the config (transformers' generate fails with it on, patched or not: its forward then computes the router loss
# of a step's one token against the whole attention mask); the verifier's training rows ask for it per call.
MOE_TINY: dict[str, Any] = {"num_experts": 4, "num_local_experts": 4, "num_experts_per_tok": 2,
                            "moe_intermediate_size": 24, "router_aux_loss_coef": 0.37}


class Moe(Llama):
    """Llama with a sparse block for the MLP; the families below mix it with their dense parent."""

    mlp = None  # no dense MLP
    tiny_config: ClassVar[dict] = MOE_TINY

    @replaces("experts", "{prefix}Experts._apply_gate")
    def experts(self, original):
        def _apply_gate(module, gate_up):
            kernel = K.activation_kernel(module.act_fn)
            if kernel is None:
                K.fell_back("experts", f"activation {type(module.act_fn).__name__} has no gated kernel")
                return original(module, gate_up)
            return getattr(K, kernel)(*gate_up.chunk(2, dim=-1), backend=self.backend)

        return _apply_gate

    def extra_loss(self, lm, outputs, inputs):
        wanted = inputs.get("output_router_logits")
        if not (lm.config.output_router_logits if wanted is None else wanted):
            return None, {}
        module = sys.modules[type(lm).__module__]  # not importlib: this runs inside compiled forwards
        aux = module.load_balancing_loss_func(outputs.router_logits, lm.num_experts, lm.num_experts_per_tok,
                                              inputs.get("attention_mask"))
        added = None if inputs.get("labels") is None else lm.router_aux_loss_coef * aux
        return added, {"aux_loss": aux}

    def feed_forward(self, module, x, original=None):
        if "experts" in module._modules:  # a sparse block, (batch, seq, hidden) in and out (GPT-OSS: and scores)
            out = module(x[:, None])
            return (out[0] if isinstance(out, tuple) else out)[:, 0]
        return super().feed_forward(module, x, original)


class Qwen3Moe(Moe):
    name = "qwen3_moe"
    mlp = Llama.mlp  # the dense layers of `mlp_only_layers`
    tiny_config: ClassVar[dict] = {"mlp_only_layers": [0], "norm_topk_prob": True}


class Mixtral(Moe, Mistral):
    name = "mixtral"
    tiny_config: ClassVar[dict] = Mistral.tiny_config


class Olmoe(Moe):
    name = "olmoe"
    tiny_config: ClassVar[dict] = {"clip_qkv": 0.5, "pad_token_id": 0, "eos_token_id": 2}

    def qkv(self, attn, x):  # q and k are clipped after their norms (`qk_norm`), v here
        q, k, v = super().qkv(attn, x)
        clip = attn.config.clip_qkv
        return (q, k, v) if clip is None else (q, k, v.clamp(-clip, clip))

    def qk_norm(self, attn, q, k):  # over all heads, before the split (OLMo 2), then clipped
        q, k = Olmo2.qk_norm(self, attn, q, k)
        clip = attn.config.clip_qkv
        return (q, k) if clip is None else (q.clamp(-clip, clip), k.clamp(-clip, clip))


class GptOss(Moe):
    """Attention sinks, in transformers' eager attention (GPT-OSS has no sdpa), which the decode step calls too;
    biased experts and router, in transformers' experts and router; Llama-like RMSNorm multiplying in float32."""

    name = "gpt_oss"
    norm_cast = "gemma"
    tiny_config: ClassVar[dict] = {"swiglu_limit": 0.3, "swiglu_alpha": 1.3, "sliding_window": 8,
                                   "layer_types": ["sliding_attention", "full_attention"],
                                   "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0,
                                                       "beta_slow": 1.0, "rope_theta": 10000.0,
                                                       "original_max_position_embeddings": 32}}

    @replaces("experts", "{prefix}Experts._apply_gate")
    def experts(self, original):
        """main diff with Moe: gate and up interleaved and clamped, `gate * sigmoid(alpha * gate) * (up + 1)`,
        which is `swiglu(alpha * gate, up + 1) / alpha`: the fused gate, its clamps and scalings elementwise, in
        float32 with one rounding at the end (in bfloat16 the extra roundings of the scalings would show)."""
        def _apply_gate(module, gate_up):
            gate = gate_up[..., ::2].clamp(max=module.limit)
            up = gate_up[..., 1::2].clamp(-module.limit, module.limit)
            out = K.swiglu(gate.float() * module.alpha, up.float() + 1, backend=self.backend) / module.alpha
            return out.to(gate_up.dtype)

        return _apply_gate

    @replaces("rope", "apply_rotary_pos_emb")
    def rope(self, original):  # main diff with Llama: the rotary tables are half the head wide, for both halves
        whole = super().rope(original)

        def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
            return whole(q, k, *_whole(cos, sin), unsqueeze_dim)

        return apply_rotary_pos_emb

    def decode_rope(self, backbone, h, position):  # the same tables in decoding
        table = rope_table(_whole(*backbone.rotary_emb(h, position)), h.dtype)
        return lambda i: table


def _whole(cos, sin):
    """GPT-OSS's half-width rotary tables as wide as the head (its two halves rotate by the same angles)."""
    return torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)


class GraniteMoe(Moe, Granite):
    name = "granitemoe"
    ffn = "block_sparse_moe"
    tiny_config: ClassVar[dict] = Granite.tiny_config
