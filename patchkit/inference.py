"""The decode step's state: a prefilled cache moved into pre-allocated buffers, then one token per step
(gpt-fast's shape: one `decode` function per token).

The step is the architecture's (`Llama.decode` and its overrides): patchkit's fused norm, RoPE and
MLP kernels over the model's own weights, the rotated key written straight into its cache slot,
attention over views of the cache: no per-step mask building, no concatenation, no autograd nodes.
`patchkit.generation` runs it inside transformers' `generate`.
"""

from __future__ import annotations

import torch

from .products import Products, _products, project  # noqa: F401  (`project` is the decode step's, plugins' too)

ATTENTION = ("sdpa", "eager")  # the attention implementations the decode step runs over its cache


class DecodeState:
    """Pre-allocated keys and values per layer, (batch, kv heads, cached + new tokens, head dim), the padding mask,
    and what the decode step reads of each layer: the decoder layers, their sliding windows, the attention
    implementation. Built from a prefilled transformers cache of `cached` tokens (`attention_mask` covers them, or
    is None where nothing is masked); sliding layers hold only their window's tail, which lands at the end."""

    def __init__(self, arch, lm, cache, attention_mask: torch.Tensor | None, cached: int, new_tokens: int):
        backbone = arch.backbone(lm)
        self.layers = list(backbone.layers[: backbone.config.num_hidden_layers])
        self.windows = [arch.decode_window(layer.self_attn) for layer in self.layers]
        self.rotary = [arch.rotary_layer(layer.self_attn) for layer in self.layers]
        self.implementation = lm.config._attn_implementation
        self.final_softcap = arch.logit_softcap(lm)
        self.logit_scale = arch.logit_scale(lm.config.get_text_config())
        self.cached = self.length = cached  # slots filled by the prefill; slots written so far
        self.keys, self.values = [], []
        for layer in cache.layers:
            batch, heads, held, dim = layer.keys.shape
            shape = (batch, heads, cached + new_tokens, dim)
            keys, values = layer.keys.new_empty(shape), layer.values.new_empty(shape)
            keys[:, :, cached - held:cached], values[:, :, cached - held:cached] = layer.keys, layer.values
            self.keys.append(keys)
            self.values.append(values)
        self.mask = None
        if attention_mask is not None and not bool(attention_mask.all()):  # one mask for every step, read by views
            valid = torch.ones(attention_mask.shape[0], cached + new_tokens, dtype=torch.bool,
                               device=attention_mask.device)
            valid[:, :cached] = attention_mask.bool()
            if self.implementation == "eager":
                dtype = self.keys[0].dtype
                self.mask = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill_(
                    ~valid, torch.finfo(dtype).min)
            else:
                self.mask = valid
            self.mask = self.mask[:, None, None, :]

    def window(self, layer_idx: int):
        """(keys, values, mask) views over the slots the current token attends to, its own slot last."""
        end = self.length + 1
        size = self.windows[layer_idx]
        start = 0 if size is None else max(0, end - size)
        n = end - start
        mask = None if self.mask is None else self.mask.narrow(-1, start, n)
        return self.keys[layer_idx].narrow(2, start, n), self.values[layer_idx].narrow(2, start, n), mask

    def write_back(self, cache) -> None:
        """Append what the decode steps wrote to transformers' `cache`, through its own `update` (a sliding layer
        keeps its window), so a returned cache holds what transformers' loop would have left in it."""
        for i, layer in enumerate(cache.layers):
            layer.update(self.keys[i][:, :, self.cached:self.length], self.values[i][:, :, self.cached:self.length])


def generation_positions(model, attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a prompt as the installed transformers' `generate` gives them (5.23+: counted over the
    unmasked tokens, pads 0); each generated token then takes the last column's position plus one."""
    prepare = getattr(model, "_prepare_position_ids_for_generation", None)
    if prepare is not None:
        return prepare(attention_mask, {"attention_mask": attention_mask})
    return (attention_mask.long().cumsum(-1) - 1).masked_fill_(attention_mask == 0, 0)


def architecture_of(model):
    from . import _resolve, _unwrap

    base = _unwrap(model)
    return _resolve(base)[-1], base  # a vision-language model: the family of its language model


class Decoding:
    """A prefilled batch: `logits` (batch, vocab) for the next token; `step(tokens)` feeds one token per row at the
    next position and renews them. `cache` is the prefill's transformers cache; `position_ids` the prompt's."""

    def __init__(self, model, cache, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                 logits: torch.Tensor, new_tokens: int, packed: bool = True):
        from . import patcher

        arch_cls, self.lm = architecture_of(model)
        patched = patcher.state(arch_cls.name)
        self.arch = patched.arch if patched else arch_cls()  # the backend it was patched with, else "auto"
        self.state = DecodeState(self.arch, self.lm, cache, attention_mask, cache.get_seq_length(), new_tokens)
        self.logits, self.position = logits, position_ids[..., -1:]  # (batch, 1); Qwen-VL: (4, batch, 1)
        self.products = Products(logits.shape[0], packed)

    @classmethod
    def prefill(cls, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, new_tokens: int):
        """The prefill `generate` runs (the model's forward over the prompt at `generation_positions`), as a
        `Decoding`: for teacher-forced checks of the decode step."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        positions = generation_positions(_unwrap_lm(model), mask)
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1)
        return cls(model, cache_of(out), attention_mask, positions, out.logits[:, -1], new_tokens)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.position = self.position + 1
        products = _products.set(self.products)
        try:
            self.logits = self.arch.decode(self.lm, tokens, self.position, self.state)
        finally:
            _products.reset(products)
        self.state.length += 1
        return self.logits


def cache_of(outputs):
    """The cache a model output carries (transformers 5.24 renamed the field `past_key_values` to `cache`)."""
    cache = outputs.get("cache")
    return cache if cache is not None else outputs.get("past_key_values")


def _unwrap_lm(model):
    from . import _unwrap

    return _unwrap(model)
