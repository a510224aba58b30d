"""The unfused ops, written the way transformers writes them: what the kernels are tested and
benchmarked against. Not a provider."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps, *, offset=0.0, cast="llama"):
    h = x if x.dtype == torch.float64 else x.float()  # float64 in, float64 math: the exact reference
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if cast == "gemma":  # GemmaRMSNorm
        return (h * (offset + weight.to(h.dtype))).type_as(x)
    return (weight + offset if offset else weight) * h.to(x.dtype)  # LlamaRMSNorm


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q, k, cos, sin):
    """transformers' rotation; tables narrower than the head rotate its leading features (Phi-3's partial
    rotary)."""
    rotary = cos.shape[-1]

    def rotate(x):
        part = x[..., :rotary]
        return torch.cat([part * cos + rotate_half(part) * sin, x[..., rotary:]], dim=-1)

    return rotate(q), rotate(k)


def swiglu(gate, up):
    return F.silu(gate) * up


def geglu(gate, up):
    return F.gelu(gate, approximate="tanh") * up


def fused_linear_cross_entropy(hidden, weight, labels, *, ignore_index=-100, softcap=None, num_items_in_batch=None,
                               reduction="mean", shift_labels=None):
    """The LM head, then transformers' `ForCausalLMLoss` (or plain sums / per-token losses)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = hidden @ weight.t()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    if logits.dtype == torch.float64:  # the exact reference: ForCausalLMLoss would round to float32
        targets = shift_labels if shift_labels is not None else F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        losses = F.cross_entropy(logits.flatten(0, -2), targets.reshape(-1), ignore_index=ignore_index,
                                 reduction="none")
        if reduction == "none" and num_items_in_batch is None:
            return losses.view(targets.shape)
        divisor = num_items_in_batch if num_items_in_batch is not None else (targets != ignore_index).sum()
        return losses.sum() / (divisor if reduction == "mean" or num_items_in_batch is not None else 1)
    if reduction == "mean" or num_items_in_batch is not None:
        return ForCausalLMLoss(logits, labels, weight.shape[0], num_items_in_batch=num_items_in_batch,
                               ignore_index=ignore_index, shift_labels=shift_labels)
    targets = shift_labels if shift_labels is not None else F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    loss = F.cross_entropy(logits.float().flatten(0, -2), targets.reshape(-1), ignore_index=ignore_index,
                           reduction=reduction)
    return loss.view(targets.shape) if reduction == "none" else loss


def linear_log_probs(hidden, weight, targets, *, softcap=None, temperature=1.0):
    """The LM head, then per-token log-probabilities of the targets and the entropy, as an unfused RL trainer
    computes them (float32 log-softmax of the logits)."""
    logits = hidden @ weight.t()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    log_p = torch.log_softmax(logits.float() / temperature, -1)
    return log_p.gather(-1, targets[:, None]).squeeze(-1), -(log_p.exp() * log_p).sum(-1)
