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
- when the weight trains on a CPU, `sum_i (p_i - onehot_i)^T h_i`, the weight gradient when every
  token's gradient is the same (a sum or mean of log-probs, the SFT loss). Backward checks that; a
  weighted loss (DPO, GRPO: with LoRA the head is frozen and none of this is needed), or a
  gradient through the entropy, recomputes the chunks instead. On a GPU that check would stall
  the device (it reads the gradient on the host), so the weight gradient is always recomputed there.
"""

from __future__ import annotations

import contextlib

import torch

from ._dispatch import dispatch
from . import _triton
from ._triton import block, jit, launch, tanh, tl, warps
from . import cross_entropy
from .cross_entropy import _chunks, _logits, _softmax, _transform, add_outer, unit_grads_


OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")  # TRL's, in its order


def linear_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                     softcap: float | None = None, temperature: float = 1.0,
                     compute_dtype: torch.dtype | None = None, outputs: tuple[str, ...] = OUTPUTS,
                     backend: str = "auto") -> tuple[torch.Tensor | None, ...]:
    """Per row of `hidden` (rows x hidden), for `targets` (rows,), in float32, TRL's per-token fields of the
    distribution softmax(z), z = softcap * tanh(hidden @ weight.T / softcap) / temperature: `log_probs` of the
    targets, `entropy`, `log_sum_sq_probs` (log sum p^2), `mean_logits` (of z) and `is_top1` (the target is the
    first argmax), in `OUTPUTS` order; a field not in `outputs` is None (`log_probs` always comes). Only
    `log_probs` and `entropy` carry gradients.

    The matmuls run in `compute_dtype` (default: the weight's; TRL passes autocast's dtype), the
    softmax and the accumulated weight gradient in float32."""
    return dispatch("linear_log_probs", backend, hidden.device)(
        hidden, weight, targets, softcap=softcap, temperature=temperature, compute_dtype=compute_dtype,
        outputs=outputs)


def _run(step, hidden, weight, targets, softcap, temperature, compute_dtype, outputs):
    device = hidden.device.type  # the dtypes are chosen here (`compute_dtype`, float32), not by autocast
    with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else contextlib.nullcontext():
        return _LogProbs.apply(hidden, weight, targets, softcap, 1.0 / temperature, compute_dtype or weight.dtype,
                               frozenset(outputs), step)


def linear_log_probs_torch(hidden, weight, targets, *, softcap=None, temperature=1.0, compute_dtype=None,
                           outputs=OUTPUTS):
    return _run(_step_torch, hidden, weight, targets, softcap, temperature, compute_dtype, outputs)


def linear_log_probs_triton(hidden, weight, targets, *, softcap=None, temperature=1.0, compute_dtype=None,
                            outputs=OUTPUTS):
    return _run(_step_triton, hidden, weight, targets, softcap, temperature, compute_dtype, outputs)


def _step_torch(z, targets, softcap, inv_t, want, grad):
    """One chunk's fields from its logits `z` (in the compute dtype), and with `grad` the unit gradients
    d(-log p_target)/d(raw logits) in z's dtype, in z's place where it is float32."""
    out = {}
    if "mean_logits" in want:
        out["mean_logits"] = _transform(z.to(torch.float32, copy=True), softcap, inv_t)[0].mean(-1)
    p, out["lse"], loss, top, dcap = _softmax(z, targets, softcap, inv_t)
    out["log_probs"] = loss.neg_()
    if "is_top1" in want:
        out["is_top1"] = top == targets
    if "log_sum_sq_probs" in want:
        out["log_sum_sq_probs"] = torch.linalg.vecdot(p, p).log_()
    if "entropy" in want:
        out["entropy"] = torch.special.entr(p).sum(-1)
    return out, _unit_grads(p, targets, dcap).to(z.dtype) if grad else None


def _unit_grads(p, targets, dcap):
    """d(-log p_target)/d(raw logits) of a chunk, in place of its softmax `p`."""
    p.scatter_add_(1, targets[:, None], p.new_full((p.shape[0], 1), -1.0))
    return p.mul_(dcap) if dcap is not None else p


class _LogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, softcap, inv_t, compute_dtype, outputs, step):
        ctx.set_materialize_grads(False)
        w = weight.to(compute_dtype)
        n = h.shape[0]
        log_probs = torch.empty(n, dtype=torch.float32, device=h.device)
        lse, entropy = torch.empty_like(log_probs), torch.empty_like(log_probs)
        extra = {k: torch.empty_like(log_probs) for k in ("log_sum_sq_probs", "mean_logits") if k in outputs}
        top1 = torch.empty(n, dtype=torch.bool, device=h.device) if "is_top1" in outputs else None
        need_h, need_w = ctx.needs_input_grad[:2]
        unit_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need_h else None
        host = cross_entropy.on_host(h)
        unit_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w and host else None
        # entropy = lse - sum(p z), and sum(p z) = h . (p W) inv_t, a by-product of the hidden gradient's matmul:
        # no pass over the vocabulary for it (softcapped or half-precision logits take the direct way); so is the
        # mean logit, h . mean(W) inv_t
        exact = not softcap and w.dtype == torch.float32
        want_entropy = "entropy" in outputs
        by_product = need_h and exact and want_entropy
        mean_w = w.mean(0) * inv_t if exact and "mean_logits" in extra else None
        chunks, buffer = _chunks(h, w)
        want = {*extra, *(("entropy",) if want_entropy and not by_product else ()),
                *(("is_top1",) if top1 is not None else ())} - ({"mean_logits"} if mean_w is not None else set())
        for rows in chunks:
            if mean_w is not None:
                extra["mean_logits"][rows] = h[rows].float() @ mean_w
            fields, g = step(_logits(h[rows], w, buffer), targets[rows], softcap, inv_t, want,
                             need_h or unit_w is not None)
            log_probs[rows], lse[rows] = fields["log_probs"], fields["lse"]
            for name in want:
                (top1 if name == "is_top1" else entropy if name == "entropy" else extra[name])[rows] = fields[name]
            if g is not None:
                if need_h:
                    unit_h[rows] = g @ w
                if by_product:  # (p - onehot) W inv_t + W[target] inv_t = p W inv_t
                    pw = unit_h[rows] + w.index_select(0, targets[rows]) * inv_t
                    entropy[rows] = lse[rows] - (pw * h[rows].float()).sum(-1)
                if unit_w is not None:
                    add_outer(unit_w, g, h[rows].to(g.dtype))
        ctx.save_for_backward(h, weight, targets, lse, entropy, unit_h, unit_w)
        ctx.softcap, ctx.inv_t, ctx.compute_dtype = softcap, inv_t, compute_dtype
        fields = {"log_probs": log_probs, "entropy": entropy if want_entropy else None, **extra,
                  "is_top1": top1}
        ctx.mark_non_differentiable(*(fields[k] for k in (*extra, "is_top1") if fields[k] is not None))
        return tuple(fields.get(k) for k in OUTPUTS)

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, *_):
        h, weight, targets, lse, entropy, unit_h, unit_w = ctx.saved_tensors
        none = (None,) * 6
        if grad_log_probs is None and grad_entropy is None:
            return None, None, *none
        # on a CPU, a zero entropy gradient (TRL passes one where the loss ignores it) skips the recompute
        if grad_entropy is not None and not (cross_entropy.on_host(h) and not bool(grad_entropy.any())):
            return (*_recompute(ctx, grad_log_probs, grad_entropy), *none)
        if grad_log_probs is None:  # only a zero gradient through the entropy
            return None, None, *none
        factor = -grad_log_probs.float()  # d log p = -d(-log p)
        grad_h = grad_w = None
        if unit_h is not None:
            grad_h = (unit_h * factor[:, None]).to(h.dtype)
        if ctx.needs_input_grad[1]:
            if unit_w is not None and factor.numel() and bool((factor == factor[0]).all()):
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
            add_outer(grad_w, g, h[rows].to(g.dtype))
    return (None if grad_h is None else grad_h.to(h.dtype), None if grad_w is None else grad_w.to(weight.dtype))


# --- triton ---------------------------------------------------------------------------------

@jit
def _log_probs_kernel(L, stride, T, LOGP, LSE, ENT, SQ, MEAN, TOP, n_cols, softcap, inv_t, HAS_CAP: tl.constexpr,
                 GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """One row of a chunk, z = softcap tanh(x / softcap) inv_t: one online pass for the log-sum-exp, the target's
    log-prob, entropy, log sum p^2, mean z and first argmax; with GRAD a second that overwrites the row with
    (softmax - onehot) dz/dx."""
    row = tl.program_id(0).to(tl.int64)
    base = L + row * stride
    target = tl.load(T + row)
    m = tl.full([], float("-inf"), tl.float32)
    total = tl.zeros([], tl.float32)  # sum exp(z - m)
    pz = tl.zeros([], tl.float32)  # sum exp(z - m) (z - m): the entropy without cancelling two large numbers
    sq = tl.zeros([], tl.float32)  # sum exp(2 (z - m))
    zsum = tl.zeros([], tl.float32)
    best = tl.zeros([], tl.int64)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < n_cols
        z = tl.load(base + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_CAP:
            z = softcap * tanh(z / softcap)
        z = z * inv_t
        zsum += tl.sum(tl.where(ok, z, 0.0), axis=0)
        z = tl.where(ok, z, float("-inf"))
        top = tl.max(z, axis=0)
        best = tl.where(top > m, tl.min(tl.where(z == top, cols, n_cols), axis=0).to(tl.int64), best)
        m_new = tl.maximum(m, top)
        r = tl.exp(m - m_new)
        shift = tl.where(total > 0, (m - m_new) * total, 0.0)  # the old terms' (z - m) move by m - m_new
        e = tl.exp(z - m_new)
        pz = r * (pz + shift) + tl.sum(e * tl.where(ok, z - m_new, 0.0), axis=0)
        sq = sq * r * r + tl.sum(e * e, axis=0)
        total = total * r + tl.sum(e, axis=0)
        m = m_new
    log_total = tl.log(total)
    z_t = tl.load(base + target).to(tl.float32)
    if HAS_CAP:
        z_t = softcap * tanh(z_t / softcap)
    z_t = z_t * inv_t
    tl.store(LOGP + row, -((m - z_t) + log_total))  # not z_t - lse: no cancellation at large logits
    tl.store(LSE + row, m + log_total)
    tl.store(ENT + row, log_total - pz / total)
    tl.store(SQ + row, tl.log(sq) - 2.0 * log_total)
    tl.store(MEAN + row, zsum / n_cols)
    tl.store(TOP + row, (best == target).to(tl.int8))
    if GRAD:
        unit_grads_(base, n_cols, target, m, 1.0 / total, softcap, inv_t, 1.0, HAS_CAP, BLOCK)


def _step_triton(z, targets, softcap, inv_t, want, grad):
    """`_step_torch` as one Triton program per row: every field from one read of the row, the unit gradients
    written over the logits in their own dtype."""
    n, vocab = z.shape
    fields = {k: torch.empty(n, dtype=torch.float32, device=z.device) for k in
              ("log_probs", "lse", "entropy", "log_sum_sq_probs", "mean_logits")}
    top = torch.empty(n, dtype=torch.int8, device=z.device)
    width = min(block(vocab), _triton.ROW_BLOCK)  # a large vocabulary: wide blocks over many threads
    launch(_log_probs_kernel, (n,), z, z.stride(0), targets, fields["log_probs"], fields["lse"], fields["entropy"],
           fields["log_sum_sq_probs"], fields["mean_logits"], top, vocab, float(softcap or 1.0), float(inv_t),
           HAS_CAP=bool(softcap), GRAD=grad, BLOCK=width, num_warps=warps(width))
    fields["is_top1"] = top.bool()
    return fields, z if grad else None
