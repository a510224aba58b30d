"""The inference path: prefill with the model's own forward, then one-token decode steps over a
pre-allocated KV cache, in a lean loop (gpt-fast's shape: one `decode` function per token).

The decode step is the architecture's (`Llama.decode` and its overrides): patchkit's fused norm,
RoPE and MLP kernels over the model's own weights, the rotated key written straight into its
cache slot, attention over views of the cache: no per-step mask building, no concatenation, no
autograd nodes.
`generate` drives it; `for_inference(model)` also routes `model.generate` calls it can serve.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SAMPLING_ARGS = {"input_ids", "attention_mask", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p",
                 "eos_token_id", "pad_token_id", "streamer"}
ATTENTION = ("sdpa", "eager")  # the attention implementations the decode step runs over its cache
# generation-config settings the lean loop honours, and settings whose value changes nothing it does; any other
# non-default one sends `generate` to transformers
CONFIG_KEYS = {"do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id", "bos_token_id",
               "transformers_version", "_from_model_config"}
SAMPLING_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}  # transformers' own
NEUTRAL = {"use_cache": True, "output_attentions": False, "output_hidden_states": False, "output_scores": False,
           "output_logits": False, "return_dict_in_generate": False}


class Packs(dict):
    """MKL-packed copies of float32 CPU `nn.Linear` weights for products with `rows` rows (2 to 64), made on first
    use, while they fit in half the memory available when it was made (Linux): 1.5x faster than `W @ x^T` at 8
    rows, for as much memory again as the weights (`Decoding` holds them for one `generate` call). None for a
    weight it does not pack."""

    def __init__(self, rows: int):
        super().__init__()
        self.rows = rows
        self.budget = _available_memory() // 2 if 1 < rows <= 64 and torch.backends.mkl.is_available() else 0

    def __missing__(self, linear: nn.Linear):
        weight, packed = linear.weight, None
        if weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.nbytes <= self.budget:
            packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, self.rows)
            self.budget -= weight.nbytes
        self[linear] = packed
        return packed


def proc_field(path: str, key: str) -> str | None:
    """The value of `key:` in a Linux /proc file such as /proc/meminfo, or None where there is none."""
    try:
        with open(path) as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(key)), None)
    except OSError:
        return None


def _available_memory() -> int:
    """Linux's estimate of the memory available without swapping (MemAvailable), in bytes; 0 where unknown."""
    available = proc_field("/proc/meminfo", "MemAvailable")
    return int(available.split()[0]) * 1024 if available else 0


_packs: ContextVar[Packs | None] = ContextVar("patchkit_packs", default=None)  # set by `Decoding.step`


def project(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`linear(x)`. For a plain `nn.Linear` without autograd on a CPU, a few rows go through the weight's
    MKL-packed copy while a decode step holds `Packs`, else, for a large weight, through `W @ x^T` (about 1.4x
    faster than `x @ W^T` at 8 rows once the weight is out of cache: the BLAS blocks the long side); anything
    else (PEFT LoRA, a quantized layer) is called as it is."""
    if type(linear) is not nn.Linear:
        return linear(x)
    weight, bias = linear._parameters["weight"], linear._parameters["bias"]  # a plain Linear: no module lookup
    rows = x.numel() // x.shape[-1]
    if rows > 1:
        packs = _packs.get()
        packed = packs[linear] if packs is not None and rows == packs.rows else None
        if packed is not None:
            return torch.ops.mkl._mkl_linear(x, packed, weight, bias, rows)
        if rows <= 64 and weight.numel() >= 2**20 and x.device.type == "cpu" and not torch.is_grad_enabled():
            x2 = x.reshape(rows, -1)
            out = torch.mm(weight, x2.T) if bias is None else torch.addmm(bias[:, None], weight, x2.T)
            return out.T.reshape(*x.shape[:-1], -1)
    return F.linear(x, weight, bias)


class DecodeState:
    """Pre-allocated keys and values per layer, (batch, kv heads, max length, head dim), the masks, and what the
    decode step reads of each layer: the decoder layers, their sliding windows, the attention implementation."""

    def __init__(self, arch, lm, cache, attention_mask, max_len: int):
        batch, prompt = attention_mask.shape
        self.layers = list(lm.base_model.layers[: lm.base_model.config.num_hidden_layers])
        self.windows = [arch.decode_window(layer.self_attn) for layer in self.layers]
        self.implementation = lm.config._attn_implementation
        self.final_softcap = getattr(lm.config.get_text_config(), "final_logit_softcapping", None)
        self.keys, self.values = [], []
        for layer in cache.layers:  # the prefill's cache: sliding layers may hold only their window's tail
            shape = (batch, layer.keys.shape[1], max_len, layer.keys.shape[-1])
            keys, values = layer.keys.new_empty(shape), layer.values.new_empty(shape)
            held = layer.keys.shape[2]
            keys[:, :, prompt - held:prompt], values[:, :, prompt - held:prompt] = layer.keys, layer.values
            self.keys.append(keys)
            self.values.append(values)
        self.length = prompt  # slots written so far
        self.mask = None
        if not bool(attention_mask.all()):  # left padding: one mask for every step, read through views
            valid = torch.ones(batch, max_len, dtype=torch.bool, device=attention_mask.device)
            valid[:, :prompt] = attention_mask.bool()
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


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as `generate` computes them: counted over the unmasked tokens (pads get 1)."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill_(attention_mask == 0, 1)


def architecture_of(model):
    from . import _resolve, _unwrap

    base = _unwrap(model)
    return _resolve(base)[0], base


def _sample(logits, do_sample, temperature, top_k, top_p, generator):
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature if temperature and temperature != 1.0 else logits
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, index = logits.sort(-1, descending=False)
        drop = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1] = False  # keep at least the most likely token
        logits = logits.masked_fill(drop.scatter(-1, index, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


class Decoding:
    """A prefilled batch: `logits` for the next token; `step(tokens)` feeds one token per row and renews them."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int):
        from . import patcher

        arch_cls, self.lm = architecture_of(model)
        patched = patcher.state(arch_cls.name)
        self.arch = patched.arch if patched else arch_cls()  # the backend it was patched with, else "auto"
        implementation = self.lm.config._attn_implementation
        if implementation not in ATTENTION:
            raise ValueError(f"patchkit's decode step runs {' or '.join(ATTENTION)} attention, not {implementation!r}: "
                             "load the model with attn_implementation='sdpa', or use transformers' own generate")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prompt_positions = positions(attention_mask)
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=prompt_positions,
                      use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None) or out.past_key_values  # transformers 5.24 renamed the field
        self.state = DecodeState(self.arch, self.lm, cache, attention_mask, input_ids.shape[1] + max_new_tokens)
        self.logits, self.position = out.logits[:, -1], prompt_positions[:, -1:]
        self.packs = Packs(input_ids.shape[0])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.position = self.position + 1
        packs = _packs.set(self.packs)
        try:
            self.logits = self.arch.decode(self.lm, tokens, self.position, self.state)
        finally:
            _packs.reset(packs)
        self.state.length += 1
        return self.logits


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, attention_mask: torch.Tensor | None = None,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None, streamer: Any = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy (the default) or sampled decoding; returns prompt + new tokens, padded after each row's EOS.

    `streamer`: a transformers streamer (`put`/`end`) or a callable given each step's tokens (batch,).
    Greedy output is `model.generate(..., do_sample=False)`'s, token for token.
    """
    decoding = Decoding(model, input_ids, attention_mask, max_new_tokens)
    generation_config = decoding.lm.generation_config
    eos = eos_token_id if eos_token_id is not None else generation_config.eos_token_id
    eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), device=input_ids.device)
    pad = pad_token_id if pad_token_id is not None else generation_config.pad_token_id
    pad = pad if pad is not None else (int(eos[0]) if eos.numel() else 0)
    emit = _streamer(streamer, input_ids)
    sequences = [input_ids]
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for i in range(max_new_tokens):
        tokens = _sample(decoding.logits.float(), do_sample, temperature, top_k, top_p, generator)
        tokens = tokens.masked_fill_(finished, pad)
        sequences.append(tokens[:, None])
        emit(tokens)
        finished |= torch.isin(tokens, eos)
        if i == max_new_tokens - 1 or bool(finished.all()):
            break
        decoding.step(tokens)
    emit(None)
    return torch.cat(sequences, 1)


def _streamer(streamer, prompt) -> Callable[[torch.Tensor | None], None]:
    """A transformers streamer gets the prompt, each step's tokens and `end()`; a callable, each step's tokens."""
    if streamer is None:
        return lambda tokens: None
    if hasattr(streamer, "put"):
        streamer.put(prompt.cpu())
        return lambda tokens: streamer.end() if tokens is None else streamer.put(tokens.cpu())
    return lambda tokens: None if tokens is None else streamer(tokens)


def for_inference(model):
    """Evaluation mode, and `model.generate` runs `generate` for the calls it serves (greedy or sampled
    decoding with temperature / top-k / top-p, EOS, a streamer); any other call runs transformers' own."""
    model.eval()
    if getattr(model.generate, "__patchkit__", None):
        return model
    original = model.generate

    @functools.wraps(original)
    def generate_(*args, **kwargs):
        call = {**dict(zip(("input_ids",), args)), **kwargs}
        call["input_ids"] = call.pop("inputs", call.get("input_ids"))
        defaults = model.generation_config.to_diff_dict()
        ids, pad = call["input_ids"], call.get("pad_token_id", model.generation_config.pad_token_id)
        served = (len(args) <= 1 and isinstance(ids, torch.Tensor) and "max_new_tokens" in call
                  and set(call) <= SAMPLING_ARGS
                  and all(k in CONFIG_KEYS or NEUTRAL.get(k, k) == v for k, v in defaults.items())
                  and model.config._attn_implementation in ATTENTION
                  # transformers infers the mask from pad tokens in the prompt: leave that to it
                  and (call.get("attention_mask") is not None or pad is None or not bool((ids == pad).any())))
        if not served:
            return original(*args, **kwargs)
        for key, default in SAMPLING_DEFAULTS.items():  # the call's, else the model's, else transformers' default
            if call.get(key) is None:
                value = getattr(model.generation_config, key, None)
                call[key] = default if value is None else value
        return generate(model, **call)

    generate_.__patchkit__ = ("inference", "generate")
    model.generate = generate_
    return model


def for_training(model):
    """Back to training mode; `model.generate` is transformers' own again."""
    model.train()
    if getattr(vars(model).get("generate"), "__patchkit__", None):
        del model.generate
    return model
