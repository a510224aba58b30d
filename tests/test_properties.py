"""Property-based kernel tests: random shapes, dtypes, strides, eps, soft-caps, ignore patterns,
extreme magnitudes and inf/NaN, for every op and every backend that runs here, forward and backward.

CI runs the bounded "ci" profile; `pytest --slow` runs the "slow" profile (300 cases, larger shapes; `.ci/run` runs
it too). Triton's interpreter runs each program in Python, so the Triton backend's shapes grow less than torch's.
"""

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patchkit import kernels
from patchkit.kernels import cross_entropy, reference

BACKENDS = ["torch", "triton"]
DTYPES = st.sampled_from([torch.float32, torch.bfloat16])
SPECIAL = st.sampled_from([None, None, "nan", "inf", "-inf"])


def _big(slow_size, ci_size):
    return slow_size if settings().max_examples > 100 else ci_size


def _tensor(data, shape, dtype, scale=1.0, layout="contiguous", special=None):
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
    if special and x.numel():
        x.view(-1)[data.draw(st.integers(0, x.numel() - 1), label="where")] = float(special)
    x = x.to(dtype)
    if layout == "transposed" and x.dim() >= 2:  # same values, column-major storage
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "strided" and x.dim() >= 2:  # every other row of a bigger tensor
        wide = torch.empty((x.shape[0] * 2, *x.shape[1:]), dtype=dtype)
        wide[::2] = x
        x = wide[::2]
    return x


def _check(out, expected, dtype, exact, fp32_tol=1e-5):
    """Same NaN/inf pattern as the reference, and on finite values no further from the exact result.

    `exact` is the reference run in float64 on the same inputs. patchkit may differ from it by at
    most twice what the reference in `dtype` does (the dtype's own spread: at logits of 1e3 float32
    itself is off by ~1e-4), plus a base tolerance relative to the tensor's scale. A reference in
    low precision can be the less accurate one (its bf16 tanh saturates to 1 early).
    """
    out, expected = out.float(), expected.float()
    # a low-precision BLAS may spread a NaN past its row (oneDNN's bf16 matmul on a CPU): the exact run's pattern
    # is the true one, the reference's is allowed
    nan = torch.isnan(out)
    assert torch.equal(nan, torch.isnan(expected)) or torch.equal(nan, torch.isnan(exact)), "NaN pattern differs"
    finite = torch.isfinite(expected)
    assert torch.equal(out[~finite & ~torch.isnan(expected)], expected[~finite & ~torch.isnan(expected)])
    if not finite.any():
        return
    scale = max(1.0, expected[finite].abs().max().item())
    exact = exact.double()[finite]
    spread = (expected[finite].double() - exact).abs().max().item()
    error = (out[finite].double() - exact).abs().max().item()
    base = (2e-2 if dtype == torch.bfloat16 else fp32_tol) * scale
    assert error <= 2 * spread + base, f"error {error:.3g} vs the reference's own {spread:.3g} (+{base:.2g})"


def _run_both(fn, ref, tensors, grads_for, dtype, seed=0, fp32_tol=1e-5):
    """Forward and backward of fn and ref on copies of `tensors`; check outputs and input gradients."""
    runs = []
    for impl, inputs in ((fn, tensors), (ref, tensors), (ref, [t.double() for t in tensors])):
        leaves = [t.detach().requires_grad_(i in grads_for) for i, t in enumerate(inputs)]
        out = impl(*leaves)
        runs.append((out if isinstance(out, tuple) else (out,), leaves))
    g = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(e.shape, generator=g) for e in runs[1][0]]
    for outs, _ in runs:
        torch.autograd.backward(outs, [u.to(o.dtype) for u, o in zip(upstream, outs)])
    (out, a), (expected, b), (exact, c) = runs
    for o, e, x in zip(out, expected, exact):
        _check(o.detach(), e.detach(), dtype, x.detach(), fp32_tol)
    for i in grads_for:
        _check(a[i].grad, b[i].grad, dtype, c[i].grad, fp32_tol)


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data(), dtype=DTYPES, special=SPECIAL,
       layout=st.sampled_from(["contiguous", "transposed", "strided"]),
       norm=st.sampled_from([(0.0, "llama"), (1.0, "gemma"), (0.0, "gemma")]),
       eps=st.floats(1e-8, 1e-2), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_rms_norm(backend, data, dtype, special, layout, norm, eps, scale):
    rows = data.draw(st.integers(1, _big(3000, 300) if backend == "torch" else _big(100, 40)), label="rows")
    hidden = data.draw(st.integers(1, 300), label="hidden")
    x = _tensor(data, (rows, hidden), dtype, scale, layout, special)
    w = _tensor(data, (hidden,), dtype, 0.3) + (1 - norm[0])
    offset, cast = norm
    _run_both(lambda x, w: kernels.rms_norm(x, w, eps, offset=offset, cast=cast, backend=backend),
              lambda x, w: reference.rms_norm(x, w, eps, offset=offset, cast=cast), [x, w], (0, 1), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data(), dtype=DTYPES, special=SPECIAL, scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_apply_rope(backend, data, dtype, special, scale):
    batch, heads = data.draw(st.integers(1, 3), label="batch"), data.draw(st.integers(1, 4), label="heads")
    kv = data.draw(st.integers(1, heads), label="kv")
    seq = data.draw(st.integers(1, _big(1000, 64) if backend == "torch" else _big(40, 16)), label="seq")
    dim = 2 * data.draw(st.integers(1, 40), label="half")
    q = _tensor(data, (batch, seq, heads, dim), dtype, scale, special=special).transpose(1, 2)
    k = _tensor(data, (batch, seq, kv, dim), dtype, scale).transpose(1, 2)
    angle = _tensor(data, (batch, seq, dim // 2), torch.float32, 3.0).repeat(1, 1, 2)
    cos, sin = angle.cos().to(dtype)[:, None], angle.sin().to(dtype)[:, None]
    _run_both(functools.partial(kernels.apply_rope, backend=backend), reference.apply_rope, [q, k, cos, sin], (0, 1),
              dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["swiglu", "geglu"])
@given(data=st.data(), dtype=DTYPES, special=SPECIAL, layout=st.sampled_from(["contiguous", "transposed"]),
       scale=st.sampled_from([1e-3, 1.0, 30.0]))
def test_gated(backend, op, data, dtype, special, layout, scale):
    rows = data.draw(st.integers(1, _big(2000, 200) if backend == "torch" else _big(80, 30)), label="rows")
    cols = data.draw(st.integers(1, 700), label="cols")
    gate = _tensor(data, (rows, cols), dtype, scale, layout, special)
    up = _tensor(data, (rows, cols), dtype)
    _run_both(functools.partial(getattr(kernels, op), backend=backend), getattr(reference, op), [gate, up], (0, 1),
              dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data(), dtype=DTYPES, softcap=st.sampled_from([None, None, 0.5, 30.0]),
       ignore=st.sampled_from(["none", "all", "random"]),
       reduction=st.sampled_from(["mean", "sum", "none", "num_items"]),
       scale=st.sampled_from([1e-3, 1.0, 30.0, 1e3]), special=st.sampled_from([None, None, "nan"]))
def test_fused_linear_cross_entropy(backend, data, dtype, softcap, ignore, reduction, scale, special):
    tokens = data.draw(st.integers(1, _big(2000, 96) if backend == "torch" else _big(200, 24)), label="tokens")
    hidden = data.draw(st.integers(1, 64), label="hidden")
    vocab = data.draw(st.integers(2, 600), label="vocab")
    chunk = vocab * data.draw(st.integers(1, 7), label="chunk rows") + data.draw(st.integers(0, vocab - 1))
    h = _tensor(data, (1, tokens, hidden), dtype, scale)
    w = _tensor(data, (vocab, hidden), dtype, 1 / math.sqrt(hidden))
    seed = data.draw(st.integers(0, 2**31 - 1), label="label seed")
    labels = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(seed))
    if ignore == "all":
        labels[:] = -100
    elif ignore == "random":
        labels[torch.rand(labels.shape, generator=torch.Generator().manual_seed(seed)) < 0.4] = -100
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    counted = (targets != -100).nonzero()[:, 1]
    if special and counted.numel():  # NaN in a counted position: the loss is NaN, as the reference's
        h[0, counted[data.draw(st.integers(0, counted.numel() - 1))], 0] = float("nan")
    kw = {"softcap": softcap}
    if reduction == "num_items":
        kw["num_items_in_batch"] = data.draw(st.integers(1, 3 * tokens), label="num items")
    else:
        kw["reduction"] = reduction
    if reduction == "mean" and not counted.numel():  # nothing to learn: 0 / 0, as the reference and transformers
        h.requires_grad_(True)
        out = kernels.fused_linear_cross_entropy(h, w, labels, backend=backend, **kw)
        assert out.isnan() and reference.fused_linear_cross_entropy(h.detach(), w, labels, **kw).isnan()
        out.backward()
        assert (h.grad == 0).all()
        return
    old = cross_entropy.CHUNK_ELEMENTS
    cross_entropy.CHUNK_ELEMENTS = chunk  # vocab does not divide the chunk
    # the design's standard for the fused cross-entropy, 1e-4: chunks round differently. The weight gradient sums
    # one product per chunk, so its rounding grows as the square root of their number: here chunks of 1 to 7 rows
    # (real ones hold 2^25 logits or more, 131+ rows); one such case, logits near 1e3 soft-capped to 0.5 in 130
    # one-row chunks, is 4.3e-4 off where one product is 0.9e-4
    chunks = math.ceil(tokens / max(chunk // vocab, 1))
    try:
        _run_both(lambda h, w: kernels.fused_linear_cross_entropy(h, w, labels, backend=backend, **kw),
                  lambda h, w: reference.fused_linear_cross_entropy(h, w, labels, **kw), [h, w], (0, 1), dtype,
                  fp32_tol=1e-4 * math.sqrt(chunks))
    finally:
        cross_entropy.CHUNK_ELEMENTS = old


@pytest.mark.parametrize("side", ["host", "device"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nan_in_an_ignored_position_does_not_poison_the_gradient(side, reduction, monkeypatch):
    """Documented departure: ignored tokens are dropped before the matmul on a CPU, zeroed on a GPU (and for
    per-token losses), so their NaNs stay out."""
    if side == "device":
        monkeypatch.setattr(cross_entropy, "on_host", lambda t: False)
    h = torch.randn(1, 6, 8)
    h[0, 2, 3] = float("nan")
    labels = torch.tensor([[1, 2, -100, 3, 4, 5]])  # position 2 predicts label[3]... ignore its target instead
    labels[0, 3] = -100
    w = torch.randn(10, 8, requires_grad=True)
    h.requires_grad_()
    loss = kernels.fused_linear_cross_entropy(h, w, labels, reduction=reduction)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(w.grad).all() and torch.isfinite(h.grad).all()
