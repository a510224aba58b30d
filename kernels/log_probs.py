"""Per-token log-probabilities of `hidden @ weight.T` (at a temperature), their entropy and TRL's other
per-token fields, without the logits.

This is the contract of TRL's fused LM head (`add_fused_lm_head`), which SFT, DPO, KTO, GRPO and
RLOO train through: SFT's loss is `-sum(log_probs) / n`, DPO's and GRPO's weight each token
differently. Rows are the tokens that count (the caller drops
ignored ones before the matmul). Each chunk's logits are computed once: while the chunk's
softmax is at hand, forward also keeps what backward needs, so backward runs no matmul over
the vocabulary:
- `(p - onehot) @ W` per token, the size of `hidden`: the hidden gradient up to the token's own
  gradient factor, exact for any per-token weighting;
- when the weight trains, `sum_i (p_i - onehot_i)^T h_i`, the weight gradient when every token's
  gradient is the same (a sum or mean of log-probs, the SFT loss). Backward checks that; a
  weighted loss (DPO, GRPO: with LoRA the head is frozen and none of this is needed), or a
  gradient through the entropy, recomputes the chunks instead.
"""

from __future__ import annotations

import torch

from ._dispatch import served
from .cross_entropy import _chunks, _logits, _softmax, _transform


OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")  # TRL's, in its order


def linear_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                     softcap: float | None = None, temperature: float = 1.0,
                     compute_dtype: torch.dtype | None = None, outputs: tuple[str, ...] = OUTPUTS
                     ) -> tuple[torch.Tensor | None, ...]:
    """Per row of `hidden` (rows x hidden), for `targets` (rows,), in float32, TRL's per-token fields of the
    distribution softmax(z), z = softcap * tanh(hidden @ weight.T / softcap) / temperature: `log_probs` of the
    targets, `entropy`, `log_sum_sq_probs` (log sum p^2), `mean_logits` (of z) and `is_top1` (the target is the
    first argmax), in `OUTPUTS` order; a field not in `outputs` is None (`log_probs` always comes). Only
    `log_probs` and `entropy` carry gradients.

    The matmuls run in `compute_dtype` (default: the weight's; TRL passes autocast's dtype), the
    softmax and the accumulated weight gradient in float32."""
    served("linear_log_probs")
    with torch.autocast(hidden.device.type, enabled=False):  # the dtypes are chosen here: `compute_dtype`, float32
        return _LogProbs.apply(hidden, weight, targets, softcap, 1.0 / temperature, compute_dtype or weight.dtype,
                               frozenset(outputs))


def _unit_grads(p, targets, dcap):
    """d(-log p_target)/d(raw logits) of a chunk, in place of its softmax `p`."""
    p.scatter_add_(1, targets[:, None], p.new_full((p.shape[0], 1), -1.0))
    return p.mul_(dcap) if dcap is not None else p


class _LogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, softcap, inv_t, compute_dtype, outputs):
        ctx.set_materialize_grads(False)
        w = weight.to(compute_dtype)
        n = h.shape[0]
        log_probs = torch.empty(n, dtype=torch.float32, device=h.device)
        lse, entropy = torch.empty_like(log_probs), torch.empty_like(log_probs)
        extra = {k: torch.empty_like(log_probs) for k in ("log_sum_sq_probs", "mean_logits") if k in outputs}
        top1 = torch.empty(n, dtype=torch.bool, device=h.device) if "is_top1" in outputs else None
        need_h, need_w = ctx.needs_input_grad[:2]
        unit_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need_h else None
        unit_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        # entropy = lse - sum(p z), and sum(p z) = h . (p W) inv_t, a by-product of the hidden gradient's matmul:
        # no pass over the vocabulary for it (softcapped or half-precision logits take the direct way); so is the
        # mean logit, h . mean(W) inv_t
        exact = not softcap and w.dtype == torch.float32
        want_entropy = "entropy" in outputs
        by_product = need_h and exact and want_entropy
        mean_w = w.mean(0) * inv_t if exact and "mean_logits" in extra else None
        chunks, buffer = _chunks(h, w)
        for rows in chunks:
            z = _logits(h[rows], w, buffer)
            if "mean_logits" in extra:
                extra["mean_logits"][rows] = (h[rows].float() @ mean_w if mean_w is not None else
                                              _transform(z.to(torch.float32, copy=True), softcap, inv_t)[0].mean(-1))
            p, lse[rows], loss, top, dcap = _softmax(z, targets[rows], softcap, inv_t)
            log_probs[rows] = loss.neg_()
            if top1 is not None:
                top1[rows] = top == targets[rows]
            if "log_sum_sq_probs" in extra:
                extra["log_sum_sq_probs"][rows] = torch.linalg.vecdot(p, p).log_()
            if want_entropy and not by_product:
                entropy[rows] = torch.special.entr(p).sum(-1)
            if need_h or need_w:
                g = _unit_grads(p, targets[rows], dcap).to(w.dtype)
                if need_h:
                    unit_h[rows] = g @ w
                if by_product:  # (p - onehot) W inv_t + W[target] inv_t = p W inv_t
                    pw = unit_h[rows] + w.index_select(0, targets[rows]) * inv_t
                    entropy[rows] = lse[rows] - (pw * h[rows].float()).sum(-1)
                if need_w:
                    unit_w.addmm_(g.t().to(unit_w.dtype), h[rows].to(unit_w.dtype))
        ctx.save_for_backward(h, weight, targets, lse, entropy, unit_h, unit_w)
        ctx.softcap, ctx.inv_t, ctx.compute_dtype = softcap, inv_t, compute_dtype
        fields = {"log_probs": log_probs, "entropy": entropy if want_entropy else None, **extra,
                  "is_top1": top1}
        ctx.mark_non_differentiable(*(fields[k] for k in (*extra, "is_top1") if fields[k] is not None))
        return tuple(fields.get(k) for k in OUTPUTS)

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, *_):
        h, weight, targets, lse, entropy, unit_h, unit_w = ctx.saved_tensors
        none = (None,) * 5
        if grad_log_probs is None and grad_entropy is None:
            return None, None, *none
        if grad_entropy is not None and bool(grad_entropy.any()):
            return (*_recompute(ctx, grad_log_probs, grad_entropy), *none)
        if grad_log_probs is None:  # only a zero gradient through the entropy
            return None, None, *none
        factor = -grad_log_probs.float()  # d log p = -d(-log p)
        grad_h = grad_w = None
        if unit_h is not None:
            grad_h = (unit_h * factor[:, None]).to(h.dtype)
        if unit_w is not None:
            if factor.numel() and bool((factor == factor[0]).all()):
                grad_w = (unit_w * factor[0]).to(weight.dtype)
            else:
                grad_w = _recompute(ctx, grad_log_probs, None, hidden=False)[1]
        return grad_h, grad_w, *none


def _recompute(ctx, grad_log_probs, grad_entropy, hidden=True):
    """Gradients for arbitrary per-token log-prob and entropy gradients: each chunk's logits again."""
    h, weight, targets, lse, entropy, _, _ = ctx.saved_tensors
    need_h, need_w = hidden and ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    w = weight.to(ctx.compute_dtype)
    chunks, buffer = _chunks(h, w)
    for rows in chunks:
        z, dcap = _transform(_logits(h[rows], w, buffer).float(), ctx.softcap, ctx.inv_t)
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
