"""Llama: the base architecture. Every other family subclasses it and restates only its differences.

Ops and what they replace in `transformers.models.llama.modeling_llama`:
- `rms_norm`: `LlamaRMSNorm.forward` -> `kernels.rms_norm` (float32 compute, Llama casting)
- `rope`: `apply_rotary_pos_emb` -> `kernels.apply_rope`
- `mlp`: `LlamaMLP.forward` -> the gated kernel `kernels.activation_kernel` picks for the module's
  activation; with PEFT LoRA on its projections (and the `lora` op on), one `kernels.lora_mlp` node
- `attention`: the module's `ALL_ATTENTION_FUNCTIONS` -> a local `AttentionInterface` whose sdpa and
  eager attend per document in packed rows (`patchkit.attention`)
- `lora`: PEFT's `lora.Linear.forward` -> `kernels.lora_linear` (shared by every family:
  `patchkit.integrations`), which serves the attention projections
- `cross_entropy`: `LlamaForCausalLM.forward` -> with labels in training, the backbone plus
  `kernels.fused_linear_cross_entropy` (no logits); otherwise the original forward, untouched
  (`architectures.causal_lm`); TRL's fused LM head in every trainer's module, with its options
- `generate`: TRL GRPO's and RLOO's `unwrap_model_for_generation` -> the same, with `model.generate` running
  the decode loop inside (`patchkit.generation.lent`; shared by every family)

Below the ops are the seams a family overrides to state a difference (docs/plugins.md lists each with its
contract): `norm`, `mlp_parts`, `logit_scale`, `extra_loss` in training; `embed`, `decode_rope`, `rotate`,
`qkv`, `qk_norm`, `decode_layer`, `residual`, `decode_window`, `decode_attention`, `decode_logits` in the
decode step.
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from patchkit import kernels as K
from patchkit.architecture import Architecture, replaces
from patchkit.attention import interface as packed_attention
from patchkit.products import project
from patchkit.integrations import lora_projection

from .causal_lm import fused_forward


class Llama(Architecture):
    name = "llama"
    model_types = ("llama",)
    module = "transformers.models.llama.modeling_llama"
    prefix = "Llama"
    tiny_config: ClassVar[dict] = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 32}}

    norm_offset: ClassVar[float] = 0.0  # RMSNorm multiplies by (offset + weight)
    norm_cast: ClassVar[str] = "llama"  # see kernels.rms_norm
    norm_eps: ClassVar[str] = "variance_epsilon"  # attribute of the norm module holding eps
    # PEFT's LoRA layer, TRL GRPO's and RLOO's generation through the decode loop: patchkit.integrations
    shared_ops: ClassVar[tuple[str, ...]] = ("lora", "generate")
    ffn: ClassVar[str] = "mlp"  # the decoder layer's feed-forward module (Granite MoE: `block_sparse_moe`)

    def norm(self, module, x):
        """`module`'s RMSNorm of `x` (its weight and eps; this family's offset and cast), fused."""
        return K.rms_norm(x, module.weight, getattr(module, self.norm_eps), offset=self.norm_offset,
                          cast=self.norm_cast, backend=self.backend)

    @replaces("rms_norm", "{prefix}RMSNorm.forward")
    def rms_norm(self, original):
        def forward(module, hidden_states):
            return self.norm(module, hidden_states)

        return forward

    @replaces("rope", "apply_rotary_pos_emb")
    def rope(self, original):
        backend = self.backend

        def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
            return K.apply_rope(q, k, cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim), backend=backend)

        return apply_rotary_pos_emb

    @replaces("mlp", "{prefix}MLP.forward")
    def mlp(self, original):
        K.activation_kernel(None)  # the lookup filled before any compiled forward reads it

        def forward(module, x):
            return self.feed_forward(module, x, original)

        return forward

    def mlp_parts(self, module) -> tuple[nn.Module | tuple[nn.Module, nn.Module], nn.Module, nn.Module | None]:
        """(gate and up, down, activation) of a gated MLP module. Gate and up are two layers, or one fused layer
        whose output is `[gate | up]` (Phi-3's `gate_up_proj`)."""
        modules = module._modules  # no nn.Module attribute lookups: this runs per layer and token
        return (modules["gate_proj"], modules["up_proj"]), modules["down_proj"], modules.get("act_fn")

    def feed_forward(self, module, x, original=None):
        """The gated MLP with the kernel its activation calls for (LoRA on its projections: one node)."""
        gate_up, down, activation = self.mlp_parts(module)
        kernel = K.activation_kernel(activation)
        if kernel is None:
            K.fell_back("mlp", f"activation {type(activation).__name__} has no gated kernel")
            return original(module, x) if original else module(x)
        layers = (*gate_up, down) if isinstance(gate_up, tuple) else (gate_up, down)
        if self.enabled.get("lora", False) and any(type(layer) is not nn.Linear for layer in layers):
            projections = [lora_projection(layer, x) for layer in layers]
            if all(projections) and any(p.lora_a is not None for p in projections):
                if len(projections) == 2:  # one fused gate_up: its halves, as views of its weights
                    projections = [*_halves(projections[0]), projections[1]]
                return K.lora_mlp(x, *projections, activation=kernel, backend=self.backend)
        if isinstance(gate_up, tuple):
            gate, up = project(gate_up[0], x), project(gate_up[1], x)
        else:
            gate, up = project(gate_up, x).chunk(2, dim=-1)
        return project(down, getattr(K, kernel)(gate, up, backend=self.backend))

    def logit_scale(self, config) -> float | None:
        """The factor on the logits (None: 1). Applied to the final hidden states, so the fused loss, TRL's head
        and the decode step all see it."""
        return None

    def logit_softcap(self, lm) -> float | None:
        """The cap `c` of `c * tanh(logits / c)` on `lm`'s logits (None: none): the text config's
        `final_logit_softcapping`, in the fused loss, TRL's head and the decode step."""
        return getattr(lm.config.get_text_config(), "final_logit_softcapping", None)

    def extra_loss(self, lm, outputs, inputs: dict[str, Any]) -> tuple[torch.Tensor | None, dict[str, Any]]:
        """(a term added to the fused loss, fields for the output) from the backbone's `outputs` and the call's
        `inputs`: a router's auxiliary loss and logits. None and {} by default."""
        return None, {}

    @replaces("cross_entropy", "{head}.forward")
    def cross_entropy(self, original):
        return fused_forward(self, original)

    @replaces("attention", "ALL_ATTENTION_FUNCTIONS")
    def attention(self, original):
        return packed_attention(original, self.load_module())

    # --- inference: one token per step over a pre-allocated cache (patchkit.inference) -------------------

    def decode(self, lm, tokens, position, state):
        """Logits (batch, vocab) for the token after `tokens` (batch,) at `position` (batch, 1); the hidden states
        are (batch, hidden): one row per sequence."""
        backbone = self.backbone(lm)
        h = self.embed(backbone, tokens)
        rope = self.decode_rope(backbone, h, position)
        for i, layer in enumerate(state.layers):
            h = self.decode_layer(layer, h, rope(i) if state.rotary[i] else None, state, i)
        return self.decode_logits(lm, h, state)

    def backbone(self, lm):
        """The decoder stack of `lm` (embeddings, layers, final norm, rotary): its base model, or a vision-language
        base model's `language_model`."""
        return getattr(lm.base_model, "language_model", lm.base_model)

    def embed(self, backbone, tokens):
        """The input embeddings of `tokens` (batch,) as the backbone's forward computes them (multipliers too)."""
        return backbone.embed_tokens(tokens)

    def decode_logits(self, lm, h, state):
        """Logits of the last hidden states (batch, hidden): final norm, head, `logit_scale`, soft-cap."""
        h = self.norm(self.backbone(lm).norm, h)
        if state.logit_scale is not None:
            h = h * state.logit_scale
        logits = project(lm.get_output_embeddings(), h)
        softcap = state.final_softcap
        return torch.tanh(logits / softcap) * softcap if softcap else logits

    def decode_rope(self, backbone, h, position):
        """The rotary table of layer i (what `rotate` takes; None: the layer has no RoPE), as a function of i:
        here (cos, signed sin) (see `kernels.rope_into`), one table for every layer."""
        table = rope_table(backbone.rotary_emb(h, position), h.dtype)
        return lambda i: table

    def rotate(self, q, k, table, out):
        """`q` rotated by `table`, returned; `k` rotated into `out` (its cache slot)."""
        K.rope_into(k, *table, out=out)
        return K.rope_into(q, *table)

    def decode_layer(self, layer, h, rope, state, i):
        """One decoder layer on one token per row, (batch, hidden) -> (batch, hidden)."""
        h = self.residual(layer, h, self.decode_attention(layer.self_attn, self.norm(layer.input_layernorm, h),
                                                          rope, state, i))
        ffn = layer._modules[self.ffn]
        return self.residual(layer, h, self.feed_forward(ffn, self.norm(layer.post_attention_layernorm, h)))

    def residual(self, layer, h, out):
        """The residual stream `h` plus a block's `out` (Granite scales `out` by its residual multiplier)."""
        return h + out

    def decode_window(self, attn) -> int | None:
        """The sliding window of this attention layer, or None (asked once per layer, before the first step)."""
        return vars(attn).get("sliding_window")

    def decode_unserved(self, lm, max_length: int) -> str | None:
        """Why the decode loop cannot generate up to `max_length` tokens for this model (transformers' own loop
        runs instead, logged), or None."""
        return None

    def rotary_layer(self, attn) -> bool:
        """Whether this attention layer applies RoPE (asked once per layer, before the first step; SmolLM3's
        no-RoPE layers say no)."""
        return True

    def qkv(self, attn, x):
        """Query, key and value projections of `x` (batch, hidden), flat: (batch, heads * head dim) each."""
        modules = attn._modules
        return project(modules["q_proj"], x), project(modules["k_proj"], x), project(modules["v_proj"], x)

    def qk_norm(self, attn, q, k):
        """q and k (batch, heads, head dim) normed where the layer has q/k norms (here per head)."""
        if attn._modules.get("q_norm") is not None:  # a getattr miss on a module raises: too dear per step
            return self.norm(attn.q_norm, q), self.norm(attn.k_norm, k)
        return q, k

    def decode_attention(self, attn, x, rope, state, i):
        """q/k/v, RoPE (the key rotated straight into its cache slot), attention over cache views, o_proj:
        one sdpa call over the heads packed by kv head, or the model's own attention function (eager, softcap)."""
        batch = x.shape[0]
        shape = (batch, -1, attn.head_dim)
        q, k, v = self.qkv(attn, x)
        q, k = self.qk_norm(attn, q.view(shape), k.view(shape))
        keys, values, mask = state.window(i)  # the current token's slot is the last of the window
        if rope is None:
            keys.select(2, -1).copy_(k)
        else:
            q = self.rotate(q, k, rope, keys.select(2, -1))
        values.select(2, -1).copy_(v.view(k.shape))
        softcap = vars(attn).get("attn_logit_softcapping")
        if state.implementation == "sdpa" and softcap is None:  # one query: its heads share a kv head
            out = F.scaled_dot_product_attention(q.view(batch, keys.shape[1], -1, q.shape[-1]), keys, values,
                                                 attn_mask=mask, scale=attn.scaling)
            return project(attn.o_proj, out.view(batch, -1))
        module = sys.modules[type(attn).__module__]
        function = module.ALL_ATTENTION_FUNCTIONS.get_interface(state.implementation, module.eager_attention_forward)
        out, _ = function(attn, q.unsqueeze(2), keys, values, mask, dropout=0.0, scaling=attn.scaling,
                          **({"softcap": softcap} if softcap is not None else {}))
        return project(attn.o_proj, out.reshape(batch, -1))


# a tiny config's rotary settings per layer type (Gemma 3, OLMo 3): llama3 scaling on full attention, another theta
# on sliding attention, so a table of the wrong type shows
LAYER_TYPE_TINY_ROPE = {"full_attention": Llama.tiny_config["rope_parameters"],
                        "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}}


def layer_type_rope(self, backbone, h, position):
    """`decode_rope` of a family with one rotary table per layer type (`rotary_emb(x, position, layer_type)`:
    Gemma 3, OLMo 3): each type's table computed once per step."""
    types = backbone.config.layer_types
    tables = {kind: rope_table(backbone.rotary_emb(h, position, kind), h.dtype) for kind in set(types)}
    return lambda i: tables[types[i]]


class OwnRope:
    """A mixin for families whose RoPE is another layout (pairs interleaved: GLM, Cohere): the `rope` op is not
    patched, and the decode step rotates with the family's own `apply_rotary_pos_emb`."""

    rope = None

    def decode_rope(self, backbone, h, position):
        cos, sin = backbone.rotary_emb(h, position)  # (batch, 1, rotary dim)
        table = cos[:, 0].to(h.dtype), sin[:, 0].to(h.dtype)
        return lambda i: table

    def rotate(self, q, k, table, out):
        q, k = self.load_module().apply_rotary_pos_emb(q, k, *table)  # unsqueezed on the head axis
        out.copy_(k)
        return q


def rope_table(cos_sin, dtype):
    """A rotary module's (cos, sin), (batch, 1, head dim), as `kernels.rope_into` takes them: in `dtype`, the sine
    signed."""
    cos, sin = cos_sin
    return cos.to(dtype), K.signed_sin(sin.to(dtype))


def _halves(fused: K.Projection) -> tuple[K.Projection, K.Projection]:
    """A fused `[gate | up]` projection as two, over views of its weights (gradients flow into the fused ones)."""
    n = fused.weight.shape[0] // 2
    bias = (None, None) if fused.bias is None else (fused.bias[:n], fused.bias[n:])
    b = (None, None) if fused.lora_b is None else (fused.lora_b[:n], fused.lora_b[n:])
    return (K.Projection(fused.weight[:n], bias[0], fused.lora_a, b[0], fused.scaling),
            K.Projection(fused.weight[n:], bias[1], fused.lora_a, b[1], fused.scaling))
