"""Generation: transformers' `generate` prepares everything, patchkit's decode loop runs the tokens.

`for_inference(model)` gives the model (its `*ForCausalLM`, PEFT-unwrapped) a class of its own whose
`_sample` — the method transformers' `generate` calls for greedy and sampled decoding — prefills with
transformers' `_prefill`, then decodes one token per step with `inference.Decoding`. Everything else is
transformers' own: the generation config and its validation, the mask and position ids, the logits
processors (`min_new_tokens`, `repetition_penalty`, `top_k`/`top_p`/`min_p`, `bad_words_ids`, ...), the
stopping criteria (EOS lists, `stop_strings`, `max_time`), streamers, and the returned output with its
scores, logits and cache. A call the loop cannot serve runs transformers' own method, with one log line per
reason. `for_training(model)` gives the model its class back.
"""

from __future__ import annotations

import contextlib
import copyreg
import dataclasses
import functools
import logging
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .inference import ATTENTION, Decoding, architecture_of, cache_of
from .vision import vision_language

log = logging.getLogger("patchkit")
# what `generate` passes `_sample` besides its own arguments that the loop knows (the tokenizer is for stop strings,
# already in the stopping criteria); any other model input (pixel values, ...) is not served
MODEL_INPUTS = {"attention_mask", "position_ids", "cache", "past_key_values", "use_cache", "logits_to_keep",
                "inputs_embeds", "tokenizer"}
# a vision-language model's inputs that only the prefill reads (images, their sizes and positions): the decode
# steps feed text tokens, at the positions the prefill's last column continues
PREFILL_INPUTS = {"pixel_values", "image_sizes", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                  "second_per_grid_ts", "mm_token_type_ids", "token_type_ids", "mm_encoder_outputs"}


@dataclass(frozen=True)
class Options:
    strict: bool = False  # `patchkit.generate`: raise where the loop cannot serve, instead of falling back
    generator: torch.Generator | None = None  # sampling draws from it instead of the global generator
    packed: bool = True  # decode steps may multiply by packed copies of the weights (`products.Products`)


_options: ContextVar[Options | None] = ContextVar("patchkit_generation", default=None)


def options() -> Options:
    return _options.get() or Options()


_logged: set[str] = set()  # reasons already logged: one line each per process


def _not_served(reason: str) -> None:
    if options().strict:
        raise ValueError(f"patchkit.generate cannot serve this call: {reason}. Use model.generate, which runs "
                         "transformers' own loop for it.")
    if reason not in _logged:
        _logged.add(reason)
        log.warning("patchkit: generate runs transformers' own loop: %s", reason)


def _cache_layers_served(cache) -> str | None:
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    if type(cache) is not DynamicCache:
        return f"a {type(cache).__name__} (the decode loop starts from a DynamicCache)"
    if getattr(cache, "offloading", False):
        return "an offloaded DynamicCache"
    kinds = {type(layer) for layer in cache.layers} - {DynamicLayer, DynamicSlidingWindowLayer}
    return f"cache layers of type {', '.join(k.__name__ for k in kinds)}" if kinds else None


def unserved(model, config, synced_gpus: bool, model_kwargs: dict) -> str | None:
    """Why the decode loop cannot run this `_sample` call, or None when it can."""
    if not hasattr(model, "_prefill"):
        return "a transformers generate without `_prefill` (patchkit runs on 5.23 and later)"
    arch_cls, lm = architecture_of(model)
    reason = arch_cls().decode_unserved(lm, config.max_length)
    if reason:
        return reason
    implementation = model.config._attn_implementation
    if implementation not in ATTENTION:
        return (f"attention {implementation!r} (the decode step runs {' or '.join(ATTENTION)}: load the model with "
                "attn_implementation='sdpa')")
    if config.return_dict_in_generate and (config.output_attentions or config.output_hidden_states):
        return "output_attentions / output_hidden_states"
    if synced_gpus:
        return "synced_gpus"
    if getattr(config, "is_assistant", False):
        return "an assistant model's candidate generation"
    if not model_kwargs.get("use_cache", True):
        return "use_cache=False"
    vision = vision_language(model.config)
    known = MODEL_INPUTS | PREFILL_INPUTS if vision else MODEL_INPUTS
    extra = sorted(k for k, v in model_kwargs.items() if k not in known and v is not None)
    if extra:
        return f"model input(s) {', '.join(extra)}"
    positions = model_kwargs.get("position_ids")
    if positions is not None and positions.dim() != 2 and not (vision and positions.dim() == 3):  # Qwen-VL's rows
        return f"{positions.dim()}-D position ids"
    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    return _cache_layers_served(cache)


class Lean:
    """Mixed into a model's class by `for_inference`: greedy and sampled `generate` calls run the decode loop."""

    _patchkit_original: type

    def _sample(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                streamer=None, **model_kwargs):
        from . import UnknownArchitectureError

        try:
            architecture_of(self)
            reason = unserved(self, generation_config, synced_gpus, model_kwargs)
        except UnknownArchitectureError as err:
            if options().strict:
                raise
            reason = str(err).split(";")[0]
        if reason is None:
            return _decode_loop(self, input_ids, logits_processor, stopping_criteria, generation_config, streamer,
                                model_kwargs)
        _not_served(reason)
        return super()._sample(input_ids, logits_processor, stopping_criteria, generation_config,
                               synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)

    def _beam_search(self, *args, **kwargs):
        _not_served("beam search")
        return super()._beam_search(*args, **kwargs)

    def _assisted_decoding(self, *args, **kwargs):
        _not_served("assisted decoding")
        return super()._assisted_decoding(*args, **kwargs)

    def __reduce_ex__(self, protocol):  # pickle and deepcopy make the model's own class, without patchkit
        _, _, *state = super().__reduce_ex__(protocol)
        return (copyreg._reconstructor, (self._patchkit_original, object, None), *state)


@functools.cache
def _lean_class(cls: type) -> type:
    return type(cls.__name__, (Lean, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                            "__doc__": cls.__doc__, "_patchkit_original": cls})


def _decode_loop(model, input_ids, logits_processor, stopping_criteria, config, streamer, model_kwargs):
    """transformers' `_sample`, step for step, with `Decoding` in place of the model's forward after the prefill."""
    generator = options().generator
    outputs = model._prefill(input_ids, config, model_kwargs)
    cache = cache_of(outputs)
    mask = model_kwargs.get("attention_mask")
    positions = model_kwargs.get("position_ids")
    if positions is None:
        from .inference import generation_positions

        positions = generation_positions(model, torch.ones_like(input_ids) if mask is None else mask)
    decoding = Decoding(model, cache, mask, positions, outputs.logits[:, -1], config.max_length - input_ids.shape[1],
                        packed=options().packed)
    del outputs
    record = config.return_dict_in_generate
    scores = [] if record and config.output_scores else None
    raw = [] if record and config.output_logits else None
    pad = config._pad_token_tensor
    has_eos = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    logits = decoding.logits
    while True:
        next_logits = logits.to(copy=True, dtype=torch.float32, device=input_ids.device)
        next_scores = logits_processor(input_ids, next_logits)
        if scores is not None:
            scores.append(next_scores)
        if raw is not None:
            raw.append(next_logits)
        if config.do_sample:
            tokens = torch.multinomial(F.softmax(next_scores, dim=-1), 1, generator=generator).squeeze(1)
        else:
            tokens = torch.argmax(next_scores, dim=-1)
        if has_eos:
            tokens = tokens * unfinished + pad * (1 - unfinished)
        input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
        unfinished = unfinished & ~stopping_criteria(input_ids, None if scores is None else tuple(scores))
        if streamer is not None:
            streamer.put(tokens.cpu())
        if unfinished.max() == 0 or decoding.state.length == decoding.state.keys[0].shape[2]:
            break
        logits = decoding.step(tokens)
    if streamer is not None:
        streamer.end()
    if not record:
        return input_ids
    if cache is not None:
        decoding.state.write_back(cache)
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    field = "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"
    return GenerateDecoderOnlyOutput(sequences=input_ids, scores=None if scores is None else tuple(scores),
                                     logits=None if raw is None else tuple(raw), **{field: cache})


def for_inference(model):
    """Evaluation mode, and `model.generate` runs the decode loop for the greedy and sampled calls it serves
    (transformers' own loop for the rest). The model's class becomes a subclass of its own, of the same name."""
    from . import _unwrap

    model.eval()
    lm = _unwrap(model)
    if not isinstance(lm, Lean):
        lm.__class__ = _lean_class(type(lm))
    return model


def for_training(model):
    """Back to training mode; `model.generate` is transformers' own again (the model has its class back)."""
    from . import _unwrap

    model.train()
    lm = _unwrap(model)
    if isinstance(lm, Lean):
        lm.__class__ = lm._patchkit_original
    return model


class _Callback:
    """A transformers streamer that hands each step's tokens (batch,) to a callable (not the prompt)."""

    def __init__(self, callback):
        self.callback, self.started = callback, False

    def put(self, value):
        if self.started:
            self.callback(value)
        self.started = True

    def end(self):
        pass


def generate(model, input_ids: torch.Tensor | None, max_new_tokens: int, *,
             attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None, **kwargs):
    """`model.generate(input_ids, max_new_tokens=..., **kwargs)` through the decode loop, which must serve it (a
    `ValueError` says why where it cannot): every setting `model.generate` takes, with its defaults (the model's
    generation config). `generator` seeds sampling; `streamer` may also be a callable, given each step's tokens.
    Returns what `model.generate` returns, token for token."""
    streamer = kwargs.get("streamer")
    if streamer is not None and not hasattr(streamer, "put"):
        kwargs["streamer"] = _Callback(streamer)
    token = _options.set(Options(strict=True, generator=generator))
    try:
        with lent(model):
            return model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, **kwargs)
    finally:
        _options.reset(token)


@contextlib.contextmanager
def lent(model, packed: bool = True):
    """While inside, `model.generate` runs the decode loop where it serves the call (transformers' own loop,
    logged, where it does not); the model keeps its mode. A model that already has the loop keeps it after.
    `packed=False`: no packed weight copies (memory as much again as the weights they copy), for a trainer."""
    from . import _unwrap

    lm = _unwrap(model)
    lend = isinstance(lm, torch.nn.Module) and hasattr(lm, "_sample") and not isinstance(lm, Lean)
    if lend:
        lm.__class__ = _lean_class(type(lm))
    token = _options.set(dataclasses.replace(options(), packed=packed)) if not packed else None
    try:
        yield model
    finally:
        if token is not None:
            _options.reset(token)
        if lend:
            lm.__class__ = lm._patchkit_original
