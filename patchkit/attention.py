"""Attention over packed rows one document at a time, through transformers' `AttentionInterface`.

Without flash-attention, transformers keeps the documents of a packed row apart with a
block-diagonal mask built from `position_ids` and attends over the whole row: work and memory
grow with (sum of lengths)^2 per head. A patched modeling module gets an `AttentionInterface` of
its own (the way transformers lets a modeling file override an attention function locally)
whose `sdpa` and `eager` entries split a packed row at its position resets and call the
original function on each document (sum of length^2); sdpa then runs causal without a mask
wherever a sliding window cannot cut into the document. Anything else (one document per row,
a cache, recorded attention weights, a mask that lets documents see each other) goes to the
original function unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def interface(original, module):
    """A copy of the modeling module's `ALL_ATTENTION_FUNCTIONS` with per-document sdpa and eager."""
    from transformers.modeling_utils import AttentionInterface

    local = AttentionInterface()
    local._local_mapping.update(getattr(original, "_local_mapping", {}))
    local["sdpa"] = per_document(lambda: original["sdpa"], causal_without_mask=True)
    eager = getattr(module, "eager_attention_forward", None)
    if eager is not None:
        local["eager"] = per_document(lambda: original.get_interface("eager", module.eager_attention_forward))
    return local


def per_document(resolve: Callable[[], Callable], causal_without_mask: bool = False) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        fn = resolve()
        # one query a row (decoding): nothing to split; compiled: transformers' packed mask keeps documents apart,
        # and finding them would sync with the host
        if query.shape[2] < 2 or torch.compiler.is_compiling():
            return fn(module, query, key, value, attention_mask, **kwargs)
        docs = documents(query, key, attention_mask, kwargs.get("position_ids"))
        if docs is None:
            return fn(module, query, key, value, attention_mask, **kwargs)
        window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
        rows = []
        for b, bounds in enumerate(docs):
            mask_row = attention_mask[b if attention_mask.shape[0] > 1 else 0][None]
            outs = []
            for start, end in zip(bounds[:-1], bounds[1:]):
                plain = causal_without_mask and (window is None or end - start <= window)
                mask = None if plain else mask_row[..., start:end, start:end]
                out, _ = fn(module, query[b:b + 1, :, start:end], key[b:b + 1, :, start:end],
                            value[b:b + 1, :, start:end], mask, **kwargs)
                outs.append(out)
            rows.append(torch.cat(outs, 1))
        return torch.cat(rows, 0), None

    return attention


def documents(query, key, mask, position_ids) -> list[list[int]] | None:
    """Per row, the document boundaries `[0, s1, ..., length]`, or None when attention must run unsplit. Every
    layer asks again (nothing is cached on the caller's tensors): one read from the device a call."""
    length = query.shape[2]
    if (not isinstance(mask, torch.Tensor) or mask.dim() != 4 or position_ids is None or length < 2
            or key.shape[2] != length or mask.shape[-2:] != (length, length) or position_ids.shape[-1] != length
            or _recording_attentions()):
        return None
    resets = position_ids.expand(query.shape[0], length).diff(dim=-1) != 1  # (batch, length - 1): a start at j + 1
    # transformers' packed mask hides the previous document from a document's first token; a plain causal
    # mask (an attention_mask was passed, so transformers did not separate documents) does not; and padding
    # hides a pad from itself, which a packed mask never does (a pad's reset position is not a document)
    seen, self_seen = (_visible(mask[:, 0].diagonal(offset=k, dim1=-2, dim2=-1)) for k in (-1, 0))
    read = torch.cat([resets.flatten(), ((resets & seen).any() | ~self_seen.all()).view(1)]).cpu()
    if read[-1] or not read[:-1].any():
        return None
    bounds = [[0] for _ in range(query.shape[0])]
    for b, s in read[:-1].view(resets.shape).nonzero().tolist():
        bounds[b].append(s + 1)
    return [b + [length] for b in bounds]


def _visible(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def _recording_attentions() -> bool:
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - another transformers layout: never split when unsure
        return True
    collected = _active_collector.get()
    return collected is not None and "attentions" in collected
