"""Per-token log-probabilities of `hidden @ weight.T`, their entropy and top-1 hit, without the logits.

This is the contract of TRL's fused LM head (`add_fused_lm_head`), which `SFTTrainer` trains
through: its loss is `-sum(log_probs) / n`. Rows are the tokens that count (the caller drops
ignored ones before the matmul). Each chunk's logits are computed once: while the chunk's
softmax is at hand, forward also keeps what backward needs, so backward runs no matmul over
the vocabulary:
- `(p - onehot) @ W` per token, the size of `hidden`: the hidden gradient up to the token's own
  gradient factor, exact for any per-token weighting;
- when the weight trains, `sum_i (p_i - onehot_i)^T h_i`, the weight gradient when every token's
  gradient is the same (a sum or mean of log-probs, the SFT loss). Backward checks that; a
  weighted loss, or a gradient through the entropy, recomputes the chunks instead.
"""

from __future__ import annotations

import torch

from ._dispatch import served
from .cross_entropy import _chunks, _logits, _softmax


def linear_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                     softcap: float | None = None, compute_dtype: torch.dtype | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log_probs, entropy, is_top1) per row of `hidden` (rows x hidden), for `targets` (rows,), in float32.

    The matmuls run in `compute_dtype` (default: the weight's; TRL passes autocast's dtype), the
    softmax and the accumulated weight gradient in float32."""
    served("linear_log_probs")
    return _LogProbs.apply(hidden, weight, targets, softcap, compute_dtype or weight.dtype)


def _unit_grads(p, targets, dcap):
    """d(-log p_target)/d(raw logits) of a chunk, in place of its softmax `p`."""
    p.scatter_add_(1, targets[:, None], p.new_full((p.shape[0], 1), -1.0))
    return p.mul_(dcap) if dcap is not None else p


class _LogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, softcap, compute_dtype):
        ctx.set_materialize_grads(False)
        w = weight.to(compute_dtype)
        n = h.shape[0]
        log_probs = torch.empty(n, dtype=torch.float32, device=h.device)
        lse, entropy = torch.empty_like(log_probs), torch.empty_like(log_probs)
        top1 = torch.empty(n, dtype=torch.bool, device=h.device)
        need_h, need_w = ctx.needs_input_grad[:2]
        unit_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need_h else None
        unit_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        chunks, buffer = _chunks(h, w)
        for rows in chunks:
            p, lse[rows], loss, top, dcap = _softmax(_logits(h[rows], w, buffer), targets[rows], softcap)
            log_probs[rows] = loss.neg_()
            top1[rows] = top == targets[rows]
            # entropy = lse - sum(p z), and sum(p z) = h . (p W), a by-product of the hidden gradient's matmul:
            # no pass over the vocabulary for it (softcapped or half-precision logits take the direct way)
            by_product = need_h and not softcap and w.dtype == torch.float32
            if not by_product:
                entropy[rows] = torch.special.entr(p).sum(-1)
            if need_h or need_w:
                g = _unit_grads(p, targets[rows], dcap).to(w.dtype)
                if need_h:
                    unit_h[rows] = g @ w
                if by_product:  # (p - onehot) W + W[target] = p W
                    pw = unit_h[rows] + w.index_select(0, targets[rows])
                    entropy[rows] = lse[rows] - (pw * h[rows].float()).sum(-1)
                if need_w:
                    unit_w.addmm_(g.t().to(unit_w.dtype), h[rows].to(unit_w.dtype))
        ctx.save_for_backward(h, weight, targets, lse, entropy, unit_h, unit_w)
        ctx.softcap, ctx.compute_dtype = softcap, compute_dtype
        ctx.mark_non_differentiable(top1)
        return log_probs, entropy, top1

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, _):
        h, weight, targets, lse, entropy, unit_h, unit_w = ctx.saved_tensors
        if grad_log_probs is None and grad_entropy is None:
            return None, None, None, None, None
        if grad_entropy is not None and bool(grad_entropy.any()):
            return (*_recompute(ctx, grad_log_probs, grad_entropy), None, None, None)
        factor = -grad_log_probs.float()  # d log p = -d(-log p)
        grad_h = grad_w = None
        if unit_h is not None:
            grad_h = (unit_h * factor[:, None]).to(h.dtype)
        if unit_w is not None:
            if factor.numel() and bool((factor == factor[0]).all()):
                grad_w = (unit_w * factor[0]).to(weight.dtype)
            else:
                grad_w = _recompute(ctx, grad_log_probs, None, hidden=False)[1]
        return grad_h, grad_w, None, None, None


def _recompute(ctx, grad_log_probs, grad_entropy, hidden=True):
    """Gradients for arbitrary per-token log-prob and entropy gradients: each chunk's logits again."""
    h, weight, targets, lse, entropy, _, _ = ctx.saved_tensors
    need_h, need_w = hidden and ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    w = weight.to(ctx.compute_dtype)
    chunks, buffer = _chunks(h, w)
    for rows in chunks:
        z = _logits(h[rows], w, buffer).float()
        dcap = None
        if ctx.softcap:
            t = torch.tanh(z / ctx.softcap)
            z, dcap = t * ctx.softcap, 1 - t * t
        p = torch.softmax(z, -1)
        g = torch.zeros_like(p)
        if grad_log_probs is not None:  # d log p_t / dz = onehot - p
            g -= grad_log_probs[rows].float()[:, None] * _unit_grads(p.clone(), targets[rows], None)
        if grad_entropy is not None:  # d H / dz = -p (log p + H)
            g -= grad_entropy[rows].float()[:, None] * p * (z - lse[rows, None] + entropy[rows, None])
        if dcap is not None:
            g *= dcap
        g = g.to(w.dtype)
        if need_h:
            grad_h[rows] = g @ w
        if need_w:
            grad_w.addmm_(g.t().float(), h[rows].float())
    return (None if grad_h is None else grad_h.to(h.dtype), None if grad_w is None else grad_w.to(weight.dtype))
