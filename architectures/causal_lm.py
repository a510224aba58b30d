"""The fused `*ForCausalLM.forward`: the training loss (and TRL's fused LM head) without logits.

What a family changes here it states as `Llama` seams, never by restating this forward:
- `logit_scale(config)`: a factor on the logits (Granite's `1 / logits_scaling`, Cohere's `logit_scale`),
  applied to the hidden states before the head (`(s h) W^T = s (h W^T)`), so every path agrees: loss,
  TRL's head and the decode step;
- `extra_loss(lm, outputs, inputs)`: a term added to the loss and fields of the output (a router's
  auxiliary loss and logits);
- the output class is the one the original forward declares (`MoeCausalLMOutputWithPast`, ...), and every
  field it shares with the backbone's output is carried over.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass

import torch
from torch import nn

from patchkit import kernels as K


def output_class(original):
    """The `ModelOutput` class `original` (a `*ForCausalLM.forward`) declares it returns."""
    from transformers.modeling_outputs import CausalLMOutputWithPast, ModelOutput

    try:
        declared = typing.get_type_hints(original).get("return")
    except Exception:  # an annotation this Python cannot evaluate
        declared = None
    for kind in (declared, *typing.get_args(declared)):
        if isinstance(kind, type) and issubclass(kind, ModelOutput):
            return kind
    return CausalLMOutputWithPast


_TAKES_LABELS: dict[type, bool] = {}  # a plain dict: compiled forwards read it (dynamo ignores functools caches)


def _takes_labels(backbone: type) -> bool:
    takes = _TAKES_LABELS.get(backbone)
    if takes is None:
        takes = _TAKES_LABELS[backbone] = "labels" in inspect.signature(backbone.forward).parameters
    return takes


def fused_forward(arch, original):
    """A `*ForCausalLM.forward` that computes the training loss without logits.

    The fused path runs when labels are given in training mode (or `skip_logits=True`), and
    for TRL's `fused_lm_head=True` call; everything else goes to the original forward.
    """
    signature = inspect.signature(original)
    var_kw = next(p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD)
    labels_at = list(signature.parameters).index("labels") - 1  # positional index after self
    returns = output_class(original)

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
        if not (fused_lm_head or wanted):
            return original(self, *args, **kwargs)
        if not usable:
            biased = " with a bias" if getattr(head, "bias", None) is not None else ""
            K.fell_back("cross_entropy", f"an LM head of type {type(head).__name__}{biased}")
            return original(self, *args, **kwargs)
        extra = dict(bound.pop(var_kw, {}))  # passed to the backbone too, as the original does
        return_dict = extra.pop("return_dict", None)
        loss_kwargs = {k: extra[k] for k in ("num_items_in_batch", "shift_labels", "ignore_index") if k in extra}
        inputs = {k: v for k, v in bound.items() if k not in ("self", "labels", "logits_to_keep")}
        if fused_lm_head:
            inputs["use_cache"] = False
        if _takes_labels(type(self.base_model)):  # a vision-language base model masks image tokens by them
            inputs["labels"] = labels
        outputs = self.base_model(**inputs, **extra)
        hidden = outputs.last_hidden_state
        scale = arch.logit_scale(self.config.get_text_config())
        softcap = arch.logit_softcap(self)
        added, fields = arch.extra_loss(self, outputs, {**inputs, **extra, "labels": labels})
        if fused_lm_head:
            options = fused_lm_head if isinstance(fused_lm_head, FusedHead) else FusedHead()
            return trl_output(hidden, head.weight, labels, softcap, loss_kwargs, added, scale, fields.get("aux_loss"),
                              options, backend=arch.backend)
        from transformers.modeling_utils import slice_logits_to_keep

        hidden = slice_logits_to_keep(hidden, bound.get("logits_to_keep", 0))
        if scale is not None:  # on the kept rows only
            hidden = hidden * scale
        loss = K.fused_linear_cross_entropy(hidden, head.weight, labels, softcap=softcap, backend=arch.backend,
                                            **loss_kwargs)
        if added is not None:
            loss = loss + added
        shared = {k: getattr(outputs, k, None) for k in returns.__dataclass_fields__ if k not in ("loss", "logits")}
        out = returns(loss=loss, logits=None, **{**shared, **fields})
        use_tuple = return_dict is False or (return_dict is None and not self.config.return_dict)
        return out.to_tuple() if use_tuple else out

    return forward


@dataclass(frozen=True)
class FusedHead:
    """The options TRL's `add_fused_lm_head` gave a model; patchkit's head is called with them as `fused_lm_head`
    (a bare `fused_lm_head=True`: these defaults, the fields SFT reads)."""

    temperature: float = 1.0
    cast_lm_head_to_fp32: bool = False
    outputs: tuple[str, ...] = ("log_probs", "entropy", "is_top1")


def trl_output(hidden, weight, labels, softcap, loss_kwargs, added=None, scale=None, aux_loss=None,
               options: FusedHead = FusedHead(), *, backend: str = "auto"):
    """What TRL's `add_fused_lm_head` forward returns for `fused_lm_head=True`; ignored tokens skip the matmul (and
    the logit scale, applied to the counted rows' hidden states). `added` joins the loss (a router's weighted
    auxiliary loss), `aux_loss` is that loss unweighted, as TRL reports it. The matmuls run in TRL's dtype: float32
    with `cast_lm_head_to_fp32`, else autocast's, else the hidden states'. `backend`: the patch's, as for the loss."""
    from trl.trainer.utils import FusedCausalLMOutput

    from patchkit.kernels.cross_entropy import _zeroed, on_host
    from patchkit.kernels.log_probs import OUTPUTS, linear_log_probs

    shift_labels = loss_kwargs.get("shift_labels")
    if shift_labels is None:
        hidden, targets = hidden[:, :-1], labels[:, 1:]
    else:
        targets = shift_labels
    targets = targets.to(weight.device)
    mask = targets != -100
    flat = hidden.to(weight.device).reshape(-1, hidden.shape[-1])
    if on_host(flat):  # reading the mask stalls nothing: ignored tokens skip the matmul
        rows = mask.flatten().nonzero().squeeze(1)
        flat, counted = flat.index_select(0, rows), targets.flatten()[rows]
    else:  # on a GPU finding them would stall it: every token goes through, the ignored ones' fields zeroed
        rows, counted = None, targets.flatten().masked_fill(~mask.flatten(), 0)
        flat = _zeroed(flat, mask.flatten())  # a NaN in padding reaches no gradient
    if scale is not None:
        flat = flat * scale
    device = weight.device.type
    if options.cast_lm_head_to_fp32:
        dtype = torch.float32
    else:
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else flat.dtype
    with torch.autocast(device, enabled=False):
        per_token = linear_log_probs(flat, weight, counted, softcap=softcap, temperature=options.temperature,
                                     compute_dtype=dtype, outputs=options.outputs, backend=backend)
    fields = {name: None if t is None else torch.zeros(mask.shape, dtype=t.dtype, device=t.device).masked_scatter(
        mask, t) if rows is not None else t.view(mask.shape).masked_fill(~mask, 0)
        for name, t in zip(OUTPUTS, per_token)}
    num_items = loss_kwargs.get("num_items_in_batch")
    loss = -fields["log_probs"].sum() / (mask.sum().clamp(min=1) if num_items is None else torch.as_tensor(num_items))
    return FusedCausalLMOutput(loss=loss if added is None else loss + added, label_mask=mask, aux_loss=aux_loss,
                               **fields)
