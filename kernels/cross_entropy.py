"""LM head + cross-entropy without the (tokens x vocab) logits.

Tokens are processed in chunks whose logits fit a fixed buffer. For a reduced loss ("mean",
"sum", or a `num_items_in_batch` divisor) the gradient is uniform over tokens, so each chunk's
gradients are computed in the forward pass, while its logits are at hand (three matmuls, none
repeated). `reduction="none"` keeps the per-token log-sum-exp and recomputes each chunk in
backward, where the per-token gradient is known. Ignored tokens are dropped before the matmul.

Semantics follow transformers' `ForCausalLMLoss`: `labels` align with `hidden` and are shifted
here; pre-shifted `shift_labels` are used as given. A batch with no token to learn (every label
ignored, or `num_items_in_batch=0`) gives transformers' number, NaN (0 / 0), with zero gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import dispatch
from . import _triton
from ._triton import block, cast, jit, launch, tanh, tl, warps

REDUCTIONS = ("mean", "sum", "none")
CHUNK_ELEMENTS = 1 << 26  # logits per chunk at most: 256 MiB in float32; large enough for full-speed matmuls
MIN_CHUNK_ELEMENTS = 1 << 25  # and at least, where a batch has the rows: still full speed, half the memory


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None, *,
                               ignore_index: int = -100, softcap: float | None = None,
                               num_items_in_batch: int | torch.Tensor | None = None, reduction: str = "mean",
                               shift_labels: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    fn = dispatch("fused_linear_cross_entropy", backend, hidden.device)
    return fn(hidden, weight, labels, ignore_index=ignore_index, softcap=softcap,
              num_items_in_batch=num_items_in_batch, reduction=reduction, shift_labels=shift_labels)


def shifted_targets(labels, shift_labels, ignore_index):
    """Next-token targets, as `ForCausalLMLoss` builds them."""
    if shift_labels is not None:
        return shift_labels
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def on_host(t: torch.Tensor) -> bool:
    """Whether `t`'s device is the host, where reading a value (`bool`, `nonzero`) stalls nothing. Elsewhere the
    ops keep every decision on the device."""
    return t.is_cpu


def _chunk_rows(n, vocab):
    """Rows per chunk: a quarter of the batch, kept between MIN_CHUNK_ELEMENTS and CHUNK_ELEMENTS logits. A
    small batch (an RL step's completions) so holds half the logits a single chunk would; a large one still
    runs chunks of the full size."""
    vocab = max(vocab, 1)
    rows = min(max(-(-n // 4), MIN_CHUNK_ELEMENTS // vocab), CHUNK_ELEMENTS // vocab)
    return max(1, min(n, rows))


def _buffer(h, weight):
    """One chunk's logits, reused by every chunk (fresh large allocations page-fault on CPU)."""
    return torch.empty(_chunk_rows(h.shape[0], weight.shape[0]), weight.shape[0], dtype=weight.dtype,
                       device=weight.device)


def _logits(hc, weight, buffer):
    """One chunk's logits, in the weight's dtype, computed into `buffer`."""
    return torch.mm(hc.to(weight.dtype), weight.t(), out=buffer[: hc.shape[0]])


def _transform(logits, softcap, inv_t=1.0):
    """z = softcap * tanh(raw / softcap) * inv_t (a temperature's inverse) of float32 `logits`, in place where
    safe, and dz/draw: a tensor, a number, or None for 1."""
    dz = None
    if softcap:
        tanh = logits.div_(softcap).tanh_()
        logits = tanh * softcap
        dz = tanh.square_().neg_().add_(1)
    if inv_t != 1.0:
        logits = logits.mul_(inv_t)
        dz = inv_t if dz is None else dz.mul_(inv_t)
    return logits, dz


def _softmax(logits, targets, softcap, inv_t=1.0):
    """Softmax in float32 (in place where safe) of z (`_transform`), per-row lse, per-row loss, argmax, dz/draw.

    The loss is (max - target) + log(sum exp(z - max)), not lse - target: at large logits the
    latter cancels two nearly equal numbers."""
    logits, dcap = _transform(logits.float() if logits.dtype != torch.float32 else logits, softcap, inv_t)
    top_logit, top = logits.max(-1)
    below_top = top_logit - logits.gather(1, targets[:, None]).squeeze(1)  # before the cancellation-prone sums
    p = torch.ops.aten._softmax.out(logits, -1, False, out=logits) if logits.is_cpu else logits.softmax(-1)
    log_mass = -p.gather(1, top[:, None]).squeeze(1).log()  # log(sum exp(x - max)); p[argmax] >= 1/vocab
    return p, top_logit + log_mass, below_top + log_mass, top, dcap


def _rows_torch(logits, targets, softcap, grad, row_scale=None):
    """Per-row loss and lse of one chunk; with `grad`, also d loss / d raw logits (times `row_scale`)."""
    p, lse, loss, _, dcap = _softmax(logits, targets, softcap)
    if not grad:
        return loss, lse, None
    p.scatter_add_(1, targets[:, None], p.new_full((p.shape[0], 1), -1.0))
    if row_scale is not None:
        p.mul_(row_scale[:, None])
    if dcap is not None:
        p.mul_(dcap)
    return loss, lse, p


def _accumulate(g, hc, weight, grad_h, grad_w, rows, alpha):
    g = g.to(weight.dtype)
    if grad_h is not None:
        torch.mm(g, weight, out=grad_h[rows]) if grad_h.dtype == g.dtype else grad_h[rows].copy_(g @ weight)
        if alpha != 1.0:
            grad_h[rows].mul_(alpha)
    if grad_w is not None:
        add_outer(grad_w, g, hc, alpha)


def add_outer(acc, g, hc, alpha=1.0):
    """acc += alpha * g^T @ hc, for a float32 `acc`: on a GPU (and on `meta`, which stands for one in checks), a
    half-precision product accumulated in float32 by the matmul itself (tensor cores; a float32 x float32
    product is ~15x slower without TF32), elsewhere in acc's dtype."""
    if (acc.is_cuda or acc.is_meta) and g.dtype in (torch.float16, torch.bfloat16) and hc.dtype == g.dtype:
        torch.addmm(acc, g.t(), hc, out_dtype=acc.dtype, alpha=alpha, out=acc)
    else:
        acc.addmm_(g.t().to(acc.dtype), hc.to(acc.dtype), alpha=alpha)


def _grad_buffers(h, weight, need_h, need_w):
    grad_h = torch.empty_like(h) if need_h else None
    acc = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    return grad_h, grad_w


def _chunks(h, weight):
    step = _chunk_rows(h.shape[0], weight.shape[0])
    return [slice(start, start + step) for start in range(0, h.shape[0], step)], _buffer(h, weight)


def _zeroed(h, keep):
    """`h` with the ignored tokens' rows zeroed: what they hold (a NaN in padding) cannot reach a gradient."""
    return torch.where(keep[:, None], h, 0.0)


def _none(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if t is None else t  # an op's "no gradient asked for"


# The op is two `torch.library` custom ops per form, opaque to torch.compile: which tokens count is data (ignored
# tokens are dropped before the matmul, the chunk loop writes into one buffer), so inside the op the graph keeps one
# shape whatever the batch ignores. `rows` names the backend's per-chunk softmax step (ROWS, below).

@torch.library.custom_op("patchkit::linear_cross_entropy", mutates_args=())
def _summed(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, softcap: float,
            divisor: torch.Tensor, rows: str, need_h: bool,
            need_w: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale * sum of the counted tokens' losses, d/dh, d/dweight): the gradients are computed here, in forward,
    while each chunk's logits are at hand. scale = 1 / divisor, a scalar: -1 stands for the counted tokens."""
    keep = targets != ignore_index
    count = torch.where(divisor == -1, keep.sum(), divisor).float()
    scale = count.reciprocal()  # nothing to learn: 0 / 0, as `ForCausalLMLoss` gives
    index = None
    if on_host(h):  # reading the counts stalls nothing, and ignored tokens skip the matmul
        index = None if bool(keep.all()) else keep.nonzero().squeeze(1)
        hk, tk = (h, targets) if index is None else (h.index_select(0, index), targets.index_select(0, index))
        alpha, row_scale, kept = float(scale), None, None
    else:  # no host sync: every token goes through, an ignored one with a zero gradient and loss
        hk, tk = _zeroed(h, keep), targets.masked_fill(~keep, 0)
        alpha, row_scale, kept = 1.0, torch.where(keep, scale, 0.0), keep
    grad_h, grad_w = _grad_buffers(hk, weight, need_h, need_w)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    chunks, buffer = _chunks(hk, weight)
    for rows_ in chunks:
        hc, tc = hk[rows_], tk[rows_]
        loss, _, g = ROWS[rows](_logits(hc, weight, buffer), tc, softcap, need_h or need_w,
                                None if row_scale is None else row_scale[rows_])
        total += (loss if kept is None else torch.where(kept[rows_], loss, 0.0)).sum()
        if g is not None:
            _accumulate(g, hc, weight, grad_h, grad_w, rows_, alpha)
    if grad_h is not None and index is not None:
        grad_h = h.new_zeros(h.shape).index_copy_(0, index, grad_h)
    return total * scale, _none(grad_h, h), _none(None if grad_w is None else grad_w.to(weight.dtype), weight)


@_summed.register_fake
def _(h, weight, targets, ignore_index, softcap, divisor, rows, need_h, need_w):
    return (h.new_empty((), dtype=torch.float32), h.new_empty(h.shape if need_h else (0,)),
            weight.new_empty(weight.shape if need_w else (0,)))


def _summed_context(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])


def _summed_backward(ctx, grad, _grad_h, _grad_w):
    grad_h, grad_w = ctx.saved_tensors
    # eager on a CPU: the usual `loss.backward()` copies nothing (elsewhere reading `grad` would stall the device)
    one = on_host(grad) and not torch.compiler.is_compiling() and bool(grad == 1)
    scaled = [None if g.numel() == 0 else g if one else g * grad.to(g.dtype) for g in (grad_h, grad_w)]
    return scaled[0], scaled[1], *([None] * 7)


_summed.register_autograd(_summed_backward, setup_context=_summed_context)


@torch.library.custom_op("patchkit::linear_cross_entropy_per_token", mutates_args=())
def _per_token(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, softcap: float,
               rows: str) -> torch.Tensor:
    """Per-token loss (0 where ignored); chunks are recomputed in backward with the per-token grad."""
    keep = targets != ignore_index
    safe, h = targets.masked_fill(~keep, 0), _zeroed(h, keep)
    loss = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
    chunks, buffer = _chunks(h, weight)
    for rows_ in chunks:
        loss[rows_] = ROWS[rows](_logits(h[rows_], weight, buffer), safe[rows_], softcap, False)[0]
    return loss.masked_fill_(~keep, 0)


@_per_token.register_fake
def _(h, weight, targets, ignore_index, softcap, rows):
    return h.new_empty(h.shape[0], dtype=torch.float32)


@torch.library.custom_op("patchkit::linear_cross_entropy_per_token_backward", mutates_args=())
def _per_token_backward(grad_loss: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        ignore_index: int, softcap: float, rows: str, need_h: bool,
                        need_w: bool) -> tuple[torch.Tensor, torch.Tensor]:
    keep = targets != ignore_index
    safe, h = targets.masked_fill(~keep, 0), _zeroed(h, keep)
    grad_h, grad_w = _grad_buffers(h, weight, need_h, need_w)
    row_grad = grad_loss.float() * keep
    chunks, buffer = _chunks(h, weight)
    for rows_ in chunks:
        _, _, g = ROWS[rows](_logits(h[rows_], weight, buffer), safe[rows_], softcap, True, row_grad[rows_])
        _accumulate(g, h[rows_], weight, grad_h, grad_w, rows_, 1.0)
    return _none(grad_h, h), _none(None if grad_w is None else grad_w.to(weight.dtype), weight)


@_per_token_backward.register_fake
def _(grad_loss, h, weight, targets, ignore_index, softcap, rows, need_h, need_w):
    return h.new_empty(h.shape if need_h else (0,)), weight.new_empty(weight.shape if need_w else (0,))


def _per_token_context(ctx, inputs, output):
    h, weight, targets, ctx.ignore_index, ctx.softcap, ctx.rows = inputs
    ctx.save_for_backward(h, weight, targets)
    ctx.need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])


def _per_token_grad(ctx, grad_loss):
    h, weight, targets = ctx.saved_tensors
    grad_h, grad_w = _per_token_backward(grad_loss, h, weight, targets, ctx.ignore_index, ctx.softcap, ctx.rows,
                                         *ctx.need)
    return (grad_h if ctx.need[0] else None), (grad_w if ctx.need[1] else None), None, None, None, None


_per_token.register_autograd(_per_token_grad, setup_context=_per_token_context)


def _flatten(hidden, labels, shift_labels, ignore_index):
    targets = shifted_targets(labels, shift_labels, ignore_index)
    h = hidden.reshape(-1, hidden.shape[-1])
    if targets.numel() != h.shape[0]:
        raise ValueError(f"labels hold {targets.numel()} tokens but hidden holds {h.shape[0]}")
    return h, targets.reshape(-1).to(h.device), targets.shape


def _fused(rows, hidden, weight, labels, *, ignore_index=-100, softcap=None, num_items_in_batch=None,
           reduction="mean", shift_labels=None):
    """The op, with `rows` naming one backend's per-chunk softmax/gradient step."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    h, targets, shape = _flatten(hidden, labels, shift_labels, ignore_index)
    softcap = float(softcap or 0.0)
    if reduction == "none" and num_items_in_batch is None:
        return _per_token(h, weight, targets, ignore_index, softcap, rows).view(shape)
    grad = torch.is_grad_enabled()
    items = num_items_in_batch
    if isinstance(items, torch.Tensor):
        divisor = items.detach().to(h.device, torch.float32).reshape(())
    else:  # a count given as a number; -1: the counted tokens (a mean); 1: a sum. A fill, not a host-to-device copy
        divisor = torch.full((), float(items) if items is not None else -1.0 if reduction == "mean" else 1.0,
                             device=h.device)
    return _summed(h, weight, targets, ignore_index, softcap, divisor, rows, grad and h.requires_grad,
                   grad and weight.requires_grad)[0]


def fused_linear_cross_entropy_torch(hidden, weight, labels, *, ignore_index=-100, softcap=None,
                                     num_items_in_batch=None, reduction="mean", shift_labels=None):
    return _fused("torch", hidden, weight, labels, ignore_index=ignore_index, softcap=softcap,
                  num_items_in_batch=num_items_in_batch, reduction=reduction, shift_labels=shift_labels)


# --- triton ---------------------------------------------------------------------------------

@jit
def _rows_kernel(L, stride, T, LOSS, LSE, SCALE, n_cols, softcap, HAS_CAP: tl.constexpr, GRAD: tl.constexpr,
                 HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    """One row of a chunk: online log-sum-exp over the vocabulary, then (softmax - onehot) in place."""
    row = tl.program_id(0).to(tl.int64)
    base = L + row * stride
    target = tl.load(T + row)
    m = tl.full([], float("-inf"), tl.float32)
    total = tl.zeros([], tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        if HAS_CAP:
            x = softcap * tanh(x / softcap)
        x = tl.where(cols < n_cols, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(total)
    x_t = tl.load(base + target).to(tl.float32)
    if HAS_CAP:
        x_t = softcap * tanh(x_t / softcap)
    tl.store(LOSS + row, (m - x_t) + tl.log(total))  # not lse - x_t: no cancellation at large logits
    tl.store(LSE + row, lse)
    if GRAD:
        unit_grads_(base, n_cols, target, m, 1.0 / total, softcap, 1.0, tl.load(SCALE + row) if HAS_SCALE else 1.0,
                    HAS_CAP, BLOCK)


@jit
def unit_grads_(base, n_cols, target, m, inv, softcap, inv_t, scale, HAS_CAP: tl.constexpr, BLOCK: tl.constexpr):
    """Overwrite a row of raw logits x with `scale` d(-log p_target)/dx, p = softmax(z), z = softcap tanh(x / softcap)
    inv_t: (p - onehot) dz/dx, p as exp(z - max) / total (`inv` = 1 / total; z - max is exact near the top,
    z - lse is not), in the row's own dtype."""
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_CAP:
            t = tanh(x / softcap)
            g = (tl.exp(softcap * t * inv_t - m) * inv - (cols == target)) * (1.0 - t * t) * inv_t
        else:
            g = (tl.exp(x * inv_t - m) * inv - (cols == target)) * inv_t
        tl.store(base + cols, cast(g * scale, base.dtype.element_ty), mask=mask)


def _rows_triton(logits, targets, softcap, grad, row_scale=None):
    """`_rows_torch` as one Triton program per row, in float32 registers; the gradient overwrites `logits`
    in their own dtype (no float32 copy of a half-precision chunk)."""
    n, vocab = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(loss)
    width = min(block(vocab), _triton.ROW_BLOCK)  # a large vocabulary: wide blocks over many threads
    launch(_rows_kernel, (n,), logits, logits.stride(0), targets, loss, lse, loss if row_scale is None else row_scale,
           vocab, float(softcap or 1.0), HAS_CAP=bool(softcap), GRAD=grad, HAS_SCALE=row_scale is not None,
           BLOCK=width, num_warps=warps(width))
    return loss, lse, logits if grad else None


def fused_linear_cross_entropy_triton(hidden, weight, labels, *, ignore_index=-100, softcap=None,
                                      num_items_in_batch=None, reduction="mean", shift_labels=None):
    return _fused("triton", hidden, weight, labels, ignore_index=ignore_index, softcap=softcap,
                  num_items_in_batch=num_items_in_batch, reduction=reduction, shift_labels=shift_labels)


ROWS = {"torch": _rows_torch, "triton": _rows_triton}
