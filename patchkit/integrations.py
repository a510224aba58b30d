"""Patches of libraries that every architecture shares: PEFT's LoRA layer, TRL's fused LM head (in each trainer's
module) and GRPO's and RLOO's generation.

They are declared like architectures, so the patcher applies and restores them the same way
(exact restore, patching at import time, signature-drift checks), but they are not registered
as architectures: `patch()` applies one with the first patched architecture that enables its op
and restores it with the last (`sync`). Each replacement decides per call and hands anything it
does not serve to the original, so models of unpatched families are untouched in effect.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import types
from typing import ClassVar

import torch
from torch import nn

from . import kernels as K
from . import patcher
from .architecture import Architecture, replaces

log = logging.getLogger("patchkit")


class Integration(Architecture):
    package: ClassVar[str]  # the distribution's top-level package; without it the integration is skipped

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.prefix = ""  # paths name the library's own objects


def lora_projection(layer: nn.Module, x) -> K.Projection | None:
    """A plain `nn.Linear` or a PEFT `lora.Linear` as the fused ops see it, or None where PEFT's own forward
    must run: dropout active in training, a LoRA variant (DoRA), a bias on B, several active adapters, a
    merged-and-disabled layer, a transposed base layer, a base layer other than `nn.Linear` or bitsandbytes'
    4-bit and 8-bit ones (logged once per type), mixed dtypes outside autocast."""
    if type(layer) is nn.Linear:
        return K.Projection(layer.weight, layer.bias)
    base = getattr(layer, "base_layer", None)
    if base is None or getattr(layer, "fan_in_fan_out", False):
        return None
    plain = type(base) is nn.Linear and type(base.weight) is nn.Parameter  # not a tensor subclass (torchao)
    weight = base.weight if plain else K.quantized.of(base)
    if weight is None:
        _unfused(base)
        return None
    if weight is base.weight and x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        return None  # a quantized base casts its input itself
    if layer.merged or layer.disable_adapters:
        return None if layer.merged and layer.disable_adapters else K.Projection(weight, base.bias)
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if not active:
        return K.Projection(weight, base.bias)
    if len(active) > 1 or active[0] in getattr(layer, "lora_variant", {}):
        return None
    name = active[0]
    a, b, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    if type(a) is not nn.Linear or type(b) is not nn.Linear or b.bias is not None or a.weight.dtype != b.weight.dtype:
        return None
    if not isinstance(dropout, nn.Identity) and dropout.training and dropout.p > 0:
        return None
    return K.Projection(weight, base.bias, a.weight, b.weight, float(layer.scaling[name]))


_unfused_types: set[str] = set()


def _unfused(base: nn.Module) -> None:
    """Log, once per base layer type, that LoRA over it runs PEFT's forward."""
    kind = type(base.weight) if type(base) is nn.Linear else type(base)
    name = f"{kind.__module__}.{kind.__qualname__}"
    if K.quantized.is_bitsandbytes(base):
        why = "its weight is not quantized yet, or bitsandbytes repacked it for its CPU inference kernel"
    else:
        why = "patchkit fuses nn.Linear and bitsandbytes' Linear4bit and Linear8bitLt bases"
    if name not in _unfused_types:
        _unfused_types.add(name)
        log.info("patchkit: LoRA over a %s base runs PEFT's own forward: %s", name, why)


def _lora_forward(original, backend):
    def forward(module, x, *args, **kwargs):
        proj = None if args or kwargs else lora_projection(module, x)
        if proj is None or proj.lora_a is None:
            return original(module, x, *args, **kwargs)
        return K.lora_linear(x, proj, backend=backend)

    return forward


class PeftLora(Integration):
    name = "peft.lora"
    package = "peft"
    module = "peft.tuners.lora.layer"

    @replaces("lora", "Linear.forward")
    def lora(self, original):
        return _lora_forward(original, self.backend)


class PeftQLora(PeftLora):
    """PEFT's LoRA layers over bitsandbytes' 4-bit and 8-bit bases (QLoRA), classes of their own: the same fused
    forward, the base weight dequantized tile by tile into the matmuls (`kernels.quantized`)."""

    name, package, module = "peft.lora.bnb", "bitsandbytes", "peft.tuners.lora.bnb"

    @replaces("lora", "Linear4bit.forward", "Linear8bitLt.forward")
    def lora(self, original):
        return _lora_forward(original, self.backend)


_LOGIT_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
_said: set[str] = set()  # reasons a head was handed back to TRL, logged once each per process


def _unusable_head(model) -> str | None:
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        return f"its LM head is a {type(head).__name__}, not a plain nn.Linear"
    if head.bias is not None:
        return "its LM head has a bias"
    return None


def fused_head_unserved(model) -> str | None:
    """Why patchkit's causal-LM forward cannot compute what TRL's head would for `model` (None: it can). A logit
    multiplier in the config counts only where the family's architecture applies it (`logit_scale`)."""
    from . import UnknownArchitectureError, UsageError, _resolve

    text = model.config.get_text_config()
    try:
        arch = _resolve(model)[0]
    except (UnknownArchitectureError, UsageError) as err:
        return f"no patchkit architecture serves it ({str(err).split(';')[0]})"
    scaled = [k for k in _LOGIT_SCALES if getattr(text, k, None) not in (None, 1, 1.0)]
    if scaled and arch().logit_scale(text) is None:
        return f"its config sets {scaled[0]}, which the {arch.name} architecture does not apply"
    return _unusable_head(model)


def _hand_back(model, reason: str) -> None:
    line = f"{type(model).__name__}: {reason}"
    if line not in _said:
        _said.add(line)
        log.warning("patchkit: TRL's fused LM head computes %s's log-probs: %s", type(model).__name__, reason)


def _patched_head(cls) -> bool:
    mark = getattr(cls.forward, "__patchkit__", None)
    return bool(mark) and mark[1] == "cross_entropy"


class TrlFusedHead(Integration):
    """TRL's `add_fused_lm_head`, as the SFT trainer's module holds it: the model it is given answers
    `fused_lm_head=True` with patchkit's head, with the temperature, float32 cast and output fields asked for. The
    preference and RL trainers' modules hold their own reference to it (subclasses below)."""

    name = "trl.fused_lm_head"
    package = "trl"
    module = "trl.trainer.sft_trainer"

    @replaces("cross_entropy", "add_fused_lm_head")
    def fused_head(self, original):
        from patchkit.architectures.causal_lm import FusedHead

        def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                              outputs: tuple[str, ...] = ("log_probs",)):
            original(model, temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32, outputs=outputs)
            reason = fused_head_unserved(model)
            if reason:
                return _hand_back(model, reason)
            trl_forward = model.forward
            options = FusedHead(float(temperature), bool(cast_lm_head_to_fp32), tuple(outputs))

            # TRL's head stays for when the class is unpatched (or PEFT wraps the head later); while it is patched,
            # patchkit's forward answers `fused_lm_head=True` (ignored tokens skip the matmul, backward needs no
            # vocabulary matmul) and every other call goes to the class's forward of the moment, so unpatching takes
            # effect here too.
            @functools.wraps(type(model).forward)
            def forward(self, *args, **kwargs):
                if not kwargs.get("fused_lm_head"):
                    return type(self).forward(self, *args, **kwargs)
                if not _patched_head(type(self)):
                    return trl_forward(*args, **kwargs)
                unusable = _unusable_head(self)
                if unusable:
                    _hand_back(self, unusable)
                    return trl_forward(*args, **kwargs)
                return type(self).forward(self, *args, **{**kwargs, "fused_lm_head": options})

            model.forward = types.MethodType(forward, model)
            log.info("patchkit: %s answers TRL's fused LM head", type(model).__name__)

        return add_fused_lm_head


class TrlDpoHead(TrlFusedHead):
    name, module = "trl.dpo.fused_lm_head", "trl.trainer.dpo_trainer"


class TrlKtoHead(TrlFusedHead):
    name, module = "trl.kto.fused_lm_head", "trl.trainer.kto_trainer"


class TrlGrpoHead(TrlFusedHead):
    name, module = "trl.grpo.fused_lm_head", "trl.trainer.grpo_trainer"


class TrlRlooHead(TrlFusedHead):
    name, module = "trl.rloo.fused_lm_head", "trl.trainer.rloo_trainer"


class TrlGeneration(Integration):
    """GRPO's generation without vLLM: each step's `unwrapped_model.generate(...)`, with the sampling settings the
    trainer passes, runs patchkit's decode loop (`generation.lent`); transformers' own loop, logged, for a call the
    loop cannot serve. No packed weight copies: they would add as much memory again as the weights to the
    training's peak. RLOO's module holds its own reference (the subclass below)."""

    name = "trl.grpo.generation"
    package = "trl"
    module = "trl.trainer.grpo_trainer"

    @replaces("generate", "unwrap_model_for_generation")
    def generation(self, original):
        from .generation import lent

        @contextlib.contextmanager
        def unwrap_model_for_generation(*args, **kwargs):
            with original(*args, **kwargs) as model, lent(model, packed=False):
                yield model

        return unwrap_model_for_generation


class TrlRlooGeneration(TrlGeneration):
    name, module = "trl.rloo.generation", "trl.trainer.rloo_trainer"


INTEGRATIONS: tuple[type[Integration], ...] = (PeftLora, PeftQLora, TrlFusedHead, TrlDpoHead, TrlKtoHead, TrlGrpoHead,
                                                TrlRlooHead, TrlGeneration, TrlRlooGeneration)


def sync() -> None:
    """Apply each integration that some patched architecture needs; restore those none needs."""
    with patcher.lock:
        live = [record.arch for record in patcher.records() if not isinstance(record.arch, Integration)]
        for cls in INTEGRATIONS:
            (op,) = cls.ops()
            wanted = any(arch.enabled.get(op) for arch in live)
            if wanted and patcher.state(cls.name) is None and importlib.util.find_spec(cls.package) is not None:
                try:
                    patcher.apply(cls(), check_module=False)
                except patcher.PatchError as err:  # the architectures' own patches stand without it
                    log.warning("patchkit: %s left unpatched: %s", cls.name, err)
            elif not wanted and patcher.state(cls.name) is not None:
                patcher.restore(cls.name)


def applied() -> list[str]:
    return [cls.name for cls in INTEGRATIONS if patcher.state(cls.name) is not None]


__all__ = ["INTEGRATIONS", "PeftLora", "TrlFusedHead", "fused_head_unserved", "lora_projection", "sync"]
