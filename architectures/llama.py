"""Llama: the base architecture. Every other family subclasses it and restates only its differences.

Ops and what they replace in `transformers.models.llama.modeling_llama`:
- `rms_norm`: `LlamaRMSNorm.forward` -> `kernels.rms_norm` (float32 compute, Llama casting)
- `rope`: `apply_rotary_pos_emb` -> `kernels.apply_rope`
- `mlp`: `LlamaMLP.forward` -> gated activation kernel chosen from the module's `act_fn`; with PEFT
  LoRA on its projections (and the `lora` op on), one `kernels.lora_mlp` node for all three
- `attention`: the module's `ALL_ATTENTION_FUNCTIONS` -> a local `AttentionInterface` whose sdpa and
  eager attend per document in packed rows (`patchkit.attention`)
- `lora`: PEFT's `lora.Linear.forward` -> `kernels.lora_linear` (shared by every family:
  `patchkit.integrations`), which serves the attention projections
- `cross_entropy`: `LlamaForCausalLM.forward` -> with labels in training, the backbone plus
  `kernels.fused_linear_cross_entropy` (no logits); otherwise the original forward, untouched.
"""

from __future__ import annotations

import inspect
import sys
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from patchkit import kernels as K
from patchkit.architecture import Architecture, replaces
from patchkit.attention import interface as packed_attention
from patchkit.products import project
from patchkit.integrations import lora_projection


_ACTIVATION_KERNELS: dict[type, str] = {}  # a plain dict, filled when the MLP is patched: dynamo reads it


def _activation_kernels() -> dict[type, str]:
    if not _ACTIVATION_KERNELS:
        from transformers import activations

        _ACTIVATION_KERNELS.update({activations.SiLUActivation: "swiglu", nn.SiLU: "swiglu",
                                    activations.GELUTanh: "geglu"})
    return _ACTIVATION_KERNELS


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
    shared_ops: ClassVar[tuple[str, ...]] = ("lora",)  # PEFT's LoRA layer: patchkit.integrations

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
        _activation_kernels()

        def forward(module, x):
            return self.feed_forward(module, x, original)

        return forward

    def feed_forward(self, module, x, original=None):
        """The gated MLP with the activation kernel its `act_fn` calls for (LoRA on its projections: one node)."""
        modules = module._modules  # no nn.Module attribute lookups: this runs per layer and token
        kernel = _activation_kernels().get(type(modules.get("act_fn")))
        if kernel is None:
            return original(module, x) if original else module(x)
        layers = (modules["gate_proj"], modules["up_proj"], modules["down_proj"])
        if self.enabled.get("lora", False) and any(type(layer) is not nn.Linear for layer in layers):
            projections = [lora_projection(layer, x) for layer in layers]
            if all(projections) and any(p.lora_a is not None for p in projections):
                return K.lora_mlp(x, *projections, activation=kernel, backend=self.backend)
        gated = getattr(K, kernel)(project(layers[0], x), project(layers[1], x), backend=self.backend)
        return project(layers[2], gated)

    @replaces("cross_entropy", "{prefix}ForCausalLM.forward")
    def cross_entropy(self, original):
        return _fused_causal_lm_forward(original, self.backend)

    @replaces("attention", "ALL_ATTENTION_FUNCTIONS")
    def attention(self, original):
        return packed_attention(original, self.load_module())

    # --- inference: one token per step over a pre-allocated cache (patchkit.inference) -------------------

    def decode(self, lm, tokens, position, state):
        """Logits (batch, vocab) for the token after `tokens` (batch,) at `position` (batch, 1); the hidden states
        are (batch, hidden): one row per sequence."""
        backbone = lm.base_model
        h = backbone.embed_tokens(tokens)
        rope = self.decode_rope(backbone, h, position)
        for i, layer in enumerate(state.layers):
            h = self.decode_layer(layer, h, rope(i), state, i)
        logits = project(lm.get_output_embeddings(), self.norm(backbone.norm, h))
        softcap = state.final_softcap
        return torch.tanh(logits / softcap) * softcap if softcap else logits

    def decode_rope(self, backbone, h, position):
        """(cos, signed sin) of layer i, as a function of i (see `kernels.rope_into`): one table for every layer."""
        table = rope_table(backbone.rotary_emb(h, position), h.dtype)
        return lambda i: table

    def decode_layer(self, layer, h, rope, state, i):
        h = h + self.decode_attention(layer.self_attn, self.norm(layer.input_layernorm, h), rope, state, i)
        return h + self.feed_forward(layer.mlp, self.norm(layer.post_attention_layernorm, h))

    def decode_window(self, attn) -> int | None:
        """The sliding window of this attention layer, or None (asked once per layer, before the first step)."""
        return vars(attn).get("sliding_window")

    def decode_qk(self, attn, x):
        """Query and key (batch, heads, head dim), normed per head where the layer has q/k norms."""
        shape = (x.shape[0], -1, attn.head_dim)
        q, k = project(attn.q_proj, x).view(shape), project(attn.k_proj, x).view(shape)
        if attn._modules.get("q_norm") is not None:  # a getattr miss on a module raises: too dear per step
            q, k = self.norm(attn.q_norm, q), self.norm(attn.k_norm, k)
        return q, k

    def decode_attention(self, attn, x, rope, state, i):
        """q/k/v, RoPE (the key rotated straight into its cache slot), attention over cache views, o_proj:
        one sdpa call over the heads packed by kv head, or the model's own attention function (eager, softcap)."""
        batch = x.shape[0]
        q, k = self.decode_qk(attn, x)
        keys, values, mask = state.window(i)  # the current token's slot is the last of the window
        q = K.rope_into(q, *rope)
        K.rope_into(k, *rope, out=keys.select(2, -1))
        values.select(2, -1).copy_(project(attn.v_proj, x).view(k.shape))
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


def rope_table(cos_sin, dtype):
    """A rotary module's (cos, sin), (batch, 1, head dim), as `kernels.rope_into` takes them: in `dtype`, the sine
    signed."""
    cos, sin = cos_sin
    return cos.to(dtype), K.signed_sin(sin.to(dtype))


def _fused_causal_lm_forward(original, backend):
    """A `*ForCausalLM.forward` that computes the training loss without logits.

    The fused path runs when labels are given in training mode (or `skip_logits=True`), and
    for TRL's `fused_lm_head=True` call; everything else goes to the original forward.
    """
    signature = inspect.signature(original)
    var_kw = next(p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD)
    labels_at = list(signature.parameters).index("labels") - 1  # positional index after self

    def forward(self, *args, **kwargs):
        fused_lm_head = kwargs.pop("fused_lm_head", False)
        skip_logits = kwargs.pop("skip_logits", None)
        if not (fused_lm_head or skip_logits or len(args) > labels_at or {"labels", "shift_labels"} & kwargs.keys()):
            return original(self, *args, **kwargs)  # no labels: nothing to fuse (generation's every step)
        bound = signature.bind(self, *args, **kwargs).arguments
        labels = bound.get("labels")
        wanted = (labels is not None or "shift_labels" in bound.get(var_kw, {})) and (
            self.training if skip_logits is None else skip_logits)
        head = self.get_output_embeddings()
        usable = isinstance(head, nn.Linear) and head.bias is None  # not a PEFT-wrapped or biased head
        if not (fused_lm_head or wanted) or not usable:
            return original(self, *args, **kwargs)
        extra = dict(bound.pop(var_kw, {}))  # passed to the backbone too, as the original does
        return_dict = extra.pop("return_dict", None)
        loss_kwargs = {k: extra[k] for k in ("num_items_in_batch", "shift_labels", "ignore_index") if k in extra}
        inputs = {k: v for k, v in bound.items() if k not in ("self", "labels", "logits_to_keep")}
        if fused_lm_head:
            inputs["use_cache"] = False
        outputs = self.base_model(**inputs, **extra)
        hidden = outputs.last_hidden_state
        softcap = getattr(self.config.get_text_config(), "final_logit_softcapping", None)
        if fused_lm_head:
            return _trl_output(hidden, head.weight, labels, softcap, loss_kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast
        from transformers.modeling_utils import slice_logits_to_keep

        hidden = slice_logits_to_keep(hidden, bound.get("logits_to_keep", 0))
        loss = K.fused_linear_cross_entropy(hidden, head.weight, labels, softcap=softcap, backend=backend,
                                            **loss_kwargs)
        # transformers 5.24 renamed `past_key_values` to `cache`
        cache = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
        out = CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                     attentions=outputs.attentions, **{cache: getattr(outputs, cache)})
        use_tuple = return_dict is False or (return_dict is None and not self.config.return_dict)
        return out.to_tuple() if use_tuple else out

    return forward


def _trl_output(hidden, weight, labels, softcap, loss_kwargs):
    """What TRL's `add_fused_lm_head` forward returns for `fused_lm_head=True`; ignored tokens skip the matmul."""
    from trl.trainer.utils import FusedCausalLMOutput

    from patchkit.kernels.log_probs import linear_log_probs

    shift_labels = loss_kwargs.get("shift_labels")
    if shift_labels is None:
        hidden, targets = hidden[:, :-1], labels[:, 1:]
    else:
        targets = shift_labels
    targets = targets.to(weight.device)
    mask = targets != -100
    rows = mask.flatten().nonzero().squeeze(1)
    flat = hidden.to(weight.device).reshape(-1, hidden.shape[-1]).index_select(0, rows)
    device = weight.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype  # as TRL does
    with torch.autocast(device, enabled=False):
        per_token = linear_log_probs(flat, weight, targets.flatten()[rows], softcap=softcap, compute_dtype=dtype)
    log_probs, entropy, top1 = (torch.zeros(mask.shape, dtype=t.dtype, device=t.device).masked_scatter(mask, t)
                                for t in per_token)
    num_items = loss_kwargs.get("num_items_in_batch")
    loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items is None else torch.as_tensor(num_items))
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=None,
                               mean_logits=None, is_top1=top1, label_mask=mask, aux_loss=None)
