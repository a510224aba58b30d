"""Every op, forward and backward, against plain PyTorch written the way transformers writes it.

Each test runs for every backend that can run here: `torch`, and `triton` through Triton's
interpreter (conftest sets TRITON_INTERPRET=1), so CI without a GPU checks the Triton kernels.
"""

import functools

import pytest
import torch
import torch.nn.functional as F

import patchkit
from patchkit import kernels
from patchkit.kernels import reference


DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(params=["torch", "triton"], autouse=True)
def backend(request):
    return request.param


@pytest.fixture
def K(backend):
    """The ops with `backend` bound."""
    from types import SimpleNamespace

    from patchkit import kernels

    ops = {name: functools.partial(getattr(kernels, name), backend=backend) for name in kernels.OPS}
    return SimpleNamespace(**ops, cross_entropy=kernels.cross_entropy, BackendError=kernels.BackendError)
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _leaf(t, noncontiguous=False):
    if noncontiguous:  # same values, transposed storage
        t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert not t.is_contiguous()
    return t.detach().requires_grad_()


def _compare(fn, ref, inputs, dtype, grad_seed=3, differentiable=None):
    """Forward and backward of `fn` against `ref`; gradients of the first `differentiable` inputs."""
    n = len(inputs) if differentiable is None else differentiable
    a = [_leaf(x) if i < n else x for i, x in enumerate(inputs)]
    b = [_leaf(x) if i < n else x for i, x in enumerate(inputs)]
    out, expected = fn(*a), ref(*b)
    out = out if isinstance(out, tuple) else (out,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    g = torch.Generator().manual_seed(grad_seed)
    grads = [torch.randn(e.shape, generator=g).to(e.dtype) for e in expected]
    for o, e in zip(out, expected):
        assert o.dtype == e.dtype and o.shape == e.shape
        torch.testing.assert_close(o, e, **TOL[dtype])
    torch.autograd.backward(out, grads)
    torch.autograd.backward(expected, grads)
    for x, y in zip(a[:n], b[:n]):
        if x.is_floating_point():
            _close(x.grad, y.grad, dtype)


def _close(got, expected, dtype):
    """float32: tight. bf16: relative to the tensor's scale, since a gradient summed over rows of bf16
    products differs by ulps of the largest term, not of the (possibly cancelled) result."""
    tol = dict(TOL[dtype])
    if dtype == torch.bfloat16:
        tol["atol"] *= max(1.0, expected.float().abs().max().item())
    torch.testing.assert_close(got, expected, **tol)


llama_rms_norm = reference.rms_norm
gemma_rms_norm = functools.partial(reference.rms_norm, offset=1.0, cast="gemma")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 8), (3, 7, 96), (2, 5, 131)])
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_rms_norm_llama(K, dtype, shape, noncontiguous):
    x = torch.randn(shape).to(dtype)
    if noncontiguous:
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    w = (1 + 0.1 * torch.randn(shape[-1])).to(dtype)
    _compare(lambda x, w: K.rms_norm(x, w, 1e-6), lambda x, w: llama_rms_norm(x, w, 1e-6), [x, w], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 96), (2, 5, 131)])
def test_rms_norm_gemma(K, dtype, shape):
    x, w = torch.randn(shape).to(dtype), (0.1 * torch.randn(shape[-1])).to(dtype)
    _compare(lambda x, w: K.rms_norm(x, w, 1e-6, offset=1.0, cast="gemma"), lambda x, w: gemma_rms_norm(x, w, 1e-6),
             [x, w], dtype)


def test_rms_norm_inference_is_the_reference_bit_for_bit():
    """Without autograd, float32 Llama norms take torch's one-op rms_norm: the same bits as the reference."""
    x, w = torch.randn(5, 3, 200), torch.randn(200)
    with torch.inference_mode():
        assert torch.equal(kernels.rms_norm(x, w, 1e-6, backend="torch"), llama_rms_norm(x, w, 1e-6))


def test_rope_into_rotates_like_the_reference():
    q, cos, sin = torch.randn(3, 4, 64), torch.randn(3, 1, 64), torch.randn(3, 1, 64)
    expected = reference.apply_rope(q, q, cos, sin)[0]
    torch.testing.assert_close(kernels.rope_into(q, cos, kernels.signed_sin(sin)), expected)
    slot = torch.empty(3, 10, 4, 64)[:, 2]  # a strided cache slot
    kernels.rope_into(q, cos, kernels.signed_sin(sin), out=slot)
    torch.testing.assert_close(slot, expected)


def test_rms_norm_mixed_weight_dtype(K):
    x, w = torch.randn(4, 33).to(torch.bfloat16), torch.randn(33)
    _compare(lambda x, w: K.rms_norm(x, w, 1e-5), lambda x, w: llama_rms_norm(x, w, 1e-5), [x, w], torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv,seq,dim", [(4, 2, 7, 16), (3, 1, 13, 10), (1, 1, 1, 2)])
@pytest.mark.parametrize("rotary", [1.0, 0.75, 0.5], ids=["full", "partial-0.75", "partial-0.5"])
def test_rope(K, dtype, heads, kv, seq, dim, rotary):
    width = 2 * max(1, int(dim * rotary) // 2)  # the rotary tables' width: Phi-4-mini rotates 0.75 of a head
    q = torch.randn(2, seq, heads, dim).to(dtype).transpose(1, 2)  # non-contiguous, as attention passes it
    k = torch.randn(2, seq, kv, dim).to(dtype).transpose(1, 2)
    angle = torch.randn(2, seq, width // 2).repeat(1, 1, 2)
    cos, sin = angle.cos().to(dtype)[:, None], angle.sin().to(dtype)[:, None]
    _compare(K.apply_rope, reference.apply_rope, [q, k, cos, sin], dtype, differentiable=2)  # cos/sin: no_grad buffers


def test_rope_float32_tables_on_bf16_compute_in_float32(K):
    """OLMo 2's rotary tables stay float32: transformers then rotates in float32 and casts once at the end."""
    q, k = torch.randn(2, 3, 5, 16).to(torch.bfloat16), torch.randn(2, 1, 5, 16).to(torch.bfloat16)
    angle = torch.randn(2, 5, 8).repeat(1, 1, 2)[:, None]
    got = K.apply_rope(q, k, angle.cos(), angle.sin())
    want = [t.to(torch.bfloat16) for t in reference.apply_rope(q, k, angle.cos(), angle.sin())]
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16 and torch.equal(g, w)


@pytest.mark.parametrize("rotary", [16, 12])
def test_rope_into_partial_and_into_a_slot(rotary):
    x = torch.randn(3, 4, 16)
    angle = torch.randn(3, 1, rotary // 2).repeat(1, 1, 2)
    cos, sin = angle.cos(), angle.sin()
    want = reference.apply_rope(x, x, cos, sin)[0]
    torch.testing.assert_close(kernels.rope_into(x, cos, kernels.signed_sin(sin)), want)
    slot = torch.empty(3, 4, 16)
    kernels.rope_into(x, cos, kernels.signed_sin(sin), out=slot)
    torch.testing.assert_close(slot, want)


def test_rope_rejects_tables_wider_than_the_head(K):
    q = torch.randn(1, 1, 2, 8)
    with pytest.raises(ValueError, match="rotary dim"):
        K.apply_rope(q, q, torch.ones(1, 1, 2, 10), torch.ones(1, 1, 2, 10))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 88), (1, 1, 1), (2, 7, 1408)])
@pytest.mark.parametrize("op", ["swiglu", "geglu"])
def test_gated_mlp(K, dtype, shape, op):
    gate, up = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    _compare(getattr(K, op), getattr(reference, op), [gate, up.transpose(0, 1).contiguous().transpose(0, 1)], dtype)


@pytest.fixture(params=[None, 1000], ids=["one-chunk", "many-chunks"])
def chunking(request, monkeypatch):
    from patchkit.kernels import cross_entropy

    if request.param:
        monkeypatch.setattr(cross_entropy, "CHUNK_ELEMENTS", request.param)


@pytest.fixture(params=["host", "device"])
def side(request, monkeypatch):
    """The cross-entropy's two forms: where reading values is free (a CPU: ignored tokens dropped before the
    matmul), and where it would stall a GPU (every decision kept on the device), run here on a CPU."""
    from patchkit.kernels import cross_entropy

    if request.param == "device":
        monkeypatch.setattr(cross_entropy, "on_host", lambda t: False)
    return request.param


CE_CASES = {
    "mean": {},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "num_items": {"num_items_in_batch": 23},
    "num_items_tensor": {"num_items_in_batch": torch.tensor(17)},
    "softcap": {"softcap": 2.5},
    "ignore_index": {"ignore_index": 7},
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CE_CASES))
def test_fused_linear_cross_entropy(K, dtype, case, chunking, side):
    kwargs = CE_CASES[case]
    hidden = torch.randn(3, 11, 40).to(dtype)
    weight = (0.3 * torch.randn(97, 40)).to(dtype)
    labels = torch.randint(0, 97, (3, 11))
    labels[0, :4] = kwargs.get("ignore_index", -100)
    labels[2, 6] = kwargs.get("ignore_index", -100)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    run = lambda h, w: K.fused_linear_cross_entropy(h, w, labels, **kwargs)  # noqa: E731
    ref = lambda h, w: reference.fused_linear_cross_entropy(h, w, labels, **kwargs)  # noqa: E731
    h1, w1, h2, w2 = _leaf(hidden), _leaf(weight, True), _leaf(hidden), _leaf(weight, True)
    out, expected = run(h1, w1), ref(h2, w2)
    torch.testing.assert_close(out.float(), expected.float(), **tol)
    g = torch.rand(expected.shape) if expected.dim() else torch.tensor(1.7)
    (out * g).sum().backward()
    (expected * g).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, **tol)
    torch.testing.assert_close(w1.grad, w2.grad, **tol)


def test_cross_entropy_shift_labels_and_frozen_weight(K):
    hidden, weight = torch.randn(2, 9, 16, requires_grad=True), torch.randn(50, 16)
    shift = torch.randint(0, 50, (2, 9))
    out = K.fused_linear_cross_entropy(hidden, weight, None, shift_labels=shift)
    expected = F.cross_entropy((hidden @ weight.t()).flatten(0, 1), shift.reshape(-1))
    torch.testing.assert_close(out, expected)
    (g1,) = torch.autograd.grad(out, hidden)
    (g2,) = torch.autograd.grad(expected, hidden)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("reduction,divisor", [("mean", None), ("mean", 0), ("mean", torch.tensor(0)), ("mean", 7),
                                               ("sum", None), ("none", None)])
def test_cross_entropy_all_ignored_gives_transformers_number(K, reduction, divisor, side):
    """Nothing to learn: what transformers' `ForCausalLMLoss` gives (NaN for a mean or a zero divisor: 0 / 0), with
    the zero gradients it gives."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    hidden, weight = torch.randn(2, 5, 8, requires_grad=True), torch.randn(13, 8, requires_grad=True)
    labels = torch.full((2, 5), -100)
    loss = K.fused_linear_cross_entropy(hidden, weight, labels, reduction=reduction, num_items_in_batch=divisor)
    if reduction == "mean":
        logits = hidden @ weight.t()
        expected = ForCausalLMLoss(logits, labels, 13, num_items_in_batch=divisor)
        assert torch.equal(loss.isnan(), expected.isnan()) and (expected.isnan() or expected == loss)
        grads = torch.autograd.grad(expected, (hidden, weight))
        assert all((g == 0).all() for g in grads)
    else:
        assert (loss == 0).all()
    loss.sum().backward()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


def test_a_model_batch_with_every_label_ignored_has_transformers_nan_loss():
    from patchkit.parity import tiny_model

    model = tiny_model(patchkit.architectures.Llama).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    labels = torch.full_like(ids, -100)
    reference = model(input_ids=ids, labels=labels).loss
    with patchkit.patched("llama"):
        out = model(input_ids=ids, labels=labels)
        assert out.logits is None and out.loss.isnan() and reference.isnan()
        out.loss.backward()
    assert all((p.grad == 0).all() for p in model.parameters() if p.grad is not None)


def test_cross_entropy_never_builds_full_logits(K, monkeypatch):
    """With a small chunk, no tensor of (tokens x vocab) is ever allocated, in forward or backward."""
    n, vocab = 64, 50
    monkeypatch.setattr(K.cross_entropy, "CHUNK_ELEMENTS", 8 * vocab)
    sizes = []
    from torch.utils._python_dispatch import TorchDispatchMode

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):  # bytes: Triton's interpreter takes byte views
                    sizes.append(t.numel() * t.element_size())
            return out

    hidden, weight = torch.randn(1, n, 16, requires_grad=True), torch.randn(vocab, 16, requires_grad=True)
    labels = torch.randint(0, vocab, (1, n))
    with Watch():
        K.fused_linear_cross_entropy(hidden, weight, labels).backward()
    assert max(sizes) <= 4 * max(8 * vocab, weight.numel(), hidden.numel()) < 4 * n * vocab


def test_unknown_backend_and_bad_arguments(K):
    from patchkit import kernels

    x, w = torch.randn(2, 4), torch.ones(4)
    with pytest.raises(K.BackendError, match="known backends: auto, torch, triton, liger"):
        kernels.rms_norm(x, w, 1e-6, backend="nope")
    with pytest.raises(ValueError, match="cast must be"):
        K.rms_norm(x, w, 1e-6, cast="other")
    with pytest.raises(ValueError, match="reduction"):
        K.fused_linear_cross_entropy(torch.randn(1, 3, 4), torch.randn(5, 4), torch.zeros(1, 3, dtype=torch.long),
                                     reduction="max")
