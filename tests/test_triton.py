"""The `triton` and `liger` providers: interpreter-checked on CPU, compared on a GPU where there is one."""

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import patchkit
from patchkit import kernels
from patchkit.architectures import Llama
from patchkit.kernels._triton import cast, jit, tl
from patchkit.parity import compare, tiny_batch, tiny_model, text_vocab
from patchkit.plugins import manager

from . import test_kernels
from .families import BUILTIN

ARCHS = BUILTIN


def test_tests_run_the_interpreter():
    assert kernels._triton.INTERPRETED, "conftest must set TRITON_INTERPRET=1 before patchkit is imported"


# the kernels are the same for every family: the base and the family whose kernel inputs differ most (partial
# rotary, a chunked gate_up) run end to end under the interpreter (float32 rotary tables: test_kernels); every
# family runs end to end under torch
@pytest.mark.parametrize("arch", [a for a in ARCHS if a.name in ("llama", "phi3")], ids=lambda a: a.name)
def test_model_runs_end_to_end_on_triton_and_matches(arch):
    model = tiny_model(arch)
    result = compare(arch("triton"), model, tiny_batch(text_vocab(model.config)))
    assert result.ok and result.backend == "triton", result.table()


def test_bf16_model_on_triton_matches():
    model = tiny_model(Llama)
    # a small batch (its prompts still longer than decode_masks pads): the interpreter runs every program in Python
    # (8 minutes at the default 3 x 19 on a 2-core VM)
    result = compare(Llama("triton"), model, tiny_batch(text_vocab(model.config), batch=2, seq=14), torch.bfloat16)
    assert result.ok, result.table()


def test_without_the_interpreter_triton_on_cpu_is_a_clear_error():
    code = textwrap.dedent("""
        import torch, patchkit
        from patchkit.architectures import Llama
        from patchkit.parity import tiny_model
        model = tiny_model(Llama)
        try:
            patchkit.patch(model, backend="triton")
        except patchkit.BackendError as err:
            print("patch:", err)
        patchkit.patch("llama", backend="triton")  # by name: checked when the first op runs
        try:
            model(input_ids=torch.tensor([[1, 2, 3]]))
        except patchkit.BackendError as err:
            print("call:", err)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2
    for line in lines:
        assert "backend 'triton' runs on cuda" in line and "not on 'cpu'" in line and "TRITON_INTERPRET=1" in line


def test_liger_is_not_offered_on_cpu():
    with pytest.raises(patchkit.BackendError, match="backend 'liger' (needs liger-kernel|runs on cuda only).*'cpu'|"
                                                   "backend 'liger' needs liger-kernel"):
        patchkit.patch(tiny_model(Llama), backend="liger")
    for op in kernels.OPS:  # auto on CPU is the torch provider, even with triton interpreted
        assert kernels.resolve(op, "auto", "cpu") is kernels.TORCH.ops[op]


def test_an_op_a_backend_lacks_runs_torchs_where_the_backend_runs(monkeypatch):
    """The LoRA ops are the torch provider's alone; an explicit triton or liger backend runs them (and liger
    `linear_log_probs`) as torch's, once it can run on the device at all."""
    from dataclasses import replace

    kernels.clear_cache()
    for op in ("lora_linear", "lora_mlp"):
        assert op in kernels.TORCH.ops and op not in kernels.TRITON.ops and op not in kernels.LIGER.ops
        assert kernels.resolve(op, "triton", "cpu") is kernels.TORCH.ops[op]  # TRITON_INTERPRET=1 here
        with pytest.raises(patchkit.BackendError, match="backend 'liger' (needs liger-kernel|runs on cuda only)"):
            kernels.resolve(op, "liger", "cpu")
    runnable = replace(manager().providers["liger"], check=lambda device: None)  # as on a GPU
    monkeypatch.setitem(manager().providers, "liger", runnable)
    kernels.clear_cache()
    try:
        assert kernels.resolve("linear_log_probs", "liger", "cuda") is kernels.TORCH.ops["linear_log_probs"]
        assert kernels.resolve("rms_norm", "liger", "cuda") is runnable.ops["rms_norm"]
        with pytest.raises(patchkit.BackendError, match="backend 'liger' has no 'nope'"):
            kernels.resolve("nope", "liger", "cuda")
    finally:
        kernels.clear_cache()


def test_auto_on_cuda_prefers_liger_then_triton(monkeypatch):
    """The rule itself, with both providers declared runnable (there is no GPU here)."""
    from dataclasses import replace

    providers = dict(manager().providers)
    ok = lambda device: None  # noqa: E731
    providers["liger"] = replace(providers["liger"], check=ok, ops={"rms_norm": providers["liger"].ops["rms_norm"]})
    providers["triton"] = replace(providers["triton"], check=ok)
    monkeypatch.setattr(manager(), "providers", providers)
    kernels.clear_cache()
    try:
        assert kernels.resolve("rms_norm", "auto", "cuda") is providers["liger"].ops["rms_norm"]
        assert kernels.resolve("swiglu", "auto", "cuda") is kernels.TRITON.ops["swiglu"]
        assert kernels.resolve("swiglu", "auto", "cpu") is kernels.TORCH.ops["swiglu"]
    finally:
        kernels.clear_cache()


# Breaking a kernel must fail the kernel tests: each mutation drops one term of a backward pass.
MUTATIONS = {
    "rms_norm backward drops the mean term": (
        "rms_norm", "_dx_dw", "(dn - normed * (dot / n_cols)[:, None])", "dn",
        lambda K: test_kernels.test_rms_norm_llama(K, torch.float32, (3, 7, 96), False)),
    "swiglu backward drops the activation's derivative": (
        "mlp", "_gated_bwd", "cast(dyu * da, DG.dtype.element_ty)", "cast(dyu, DG.dtype.element_ty)",
        lambda K: test_kernels.test_gated_mlp(K, torch.float32, (3, 5, 88), "swiglu")),
    "rope backward uses the forward rotation": (
        "rope", "_rotate_heads", "y1, y2 = x1 * c1 + x2 * s2, x2 * c2 - x1 * s1",
        "y1, y2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2",
        lambda K: test_kernels.test_rope(K, torch.float32, 4, 2, 7, 16, 1.0)),
    "cross-entropy gradient drops the one-hot term": (
        "cross_entropy", "unit_grads_", "g = (tl.exp(x * inv_t - m) * inv - (cols == target)) * inv_t",
        "g = tl.exp(x * inv_t - m) * inv * inv_t",
        lambda K: test_kernels.test_fused_linear_cross_entropy(K, torch.float32, "mean", None, "host")),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_broken_kernel_fails_its_test(mutation, tmp_path, monkeypatch):
    import inspect

    module_name, kernel, old, new, run_test = MUTATIONS[mutation]
    module = importlib.import_module(f"patchkit.kernels.{module_name}")
    source = textwrap.dedent(inspect.getsource(getattr(module, kernel).fn))
    assert old in source, f"mutation no longer applies to {kernel}"
    path = tmp_path / f"broken_{module_name}.py"
    header = ["import sys", f"globals().update({{k: v for k, v in vars(sys.modules['{module.__name__}']).items() "
              "if not k.startswith('__')})"]  # the kernel's module's names, private helpers included
    path.write_text("\n".join(header) + "\n\n" + source.replace(old, new))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    broken = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(broken)
    monkeypatch.setattr(module, kernel, getattr(broken, kernel))
    bound = _bound_ops("triton")
    with pytest.raises(AssertionError):
        run_test(bound)
    monkeypatch.undo()
    run_test(bound)  # and the intact kernel passes the same test


def _bound_ops(backend):
    import functools
    from types import SimpleNamespace

    ops = {name: functools.partial(getattr(kernels, name), backend=backend) for name in kernels.OPS}
    return SimpleNamespace(**ops, cross_entropy=kernels.cross_entropy, BackendError=kernels.BackendError)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "liger"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_providers_match_torch(backend, dtype):
    """On a GPU: every op of `backend` against the torch provider, forward and backward."""
    device = "cuda"
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(4, 77, 1000, device=device, generator=g).to(dtype)
    w = torch.randn(1000, device=device, generator=g).to(dtype)
    q = torch.randn(2, 8, 77, 64, device=device, generator=g).to(dtype)
    k = torch.randn(2, 2, 77, 64, device=device, generator=g).to(dtype)
    angle = torch.randn(2, 77, 32, device=device, generator=g).repeat(1, 1, 2)
    cos, sin = angle.cos().to(dtype)[:, None], angle.sin().to(dtype)[:, None]
    gate = torch.randn(2, 77, 2816, device=device, generator=g).to(dtype)
    up = torch.randn(2, 77, 2816, device=device, generator=g).to(dtype)
    hidden = torch.randn(2, 77, 256, device=device, generator=g).to(dtype)
    weight = torch.randn(32000, 256, device=device, generator=g).to(dtype) * 0.05
    labels = torch.randint(0, 32000, (2, 77), device=device, generator=g)
    cases = [("rms_norm", (x, w, 1e-6)), ("apply_rope", (q, k, cos, sin)), ("swiglu", (gate, up)),
             ("geglu", (gate, up)), ("fused_linear_cross_entropy", (hidden, weight, labels))]
    for op, args in cases:
        results = []
        for b in ("torch", backend):
            leaves = [a.detach().requires_grad_() if torch.is_tensor(a) and a.is_floating_point()
                      and a is not cos and a is not sin else a for a in args]
            out = getattr(kernels, op)(*leaves, backend=b)
            outs = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
            grads = [a.grad.float() for a in leaves if getattr(a, "grad", None) is not None]
            results.append([o.float() for o in outs] + grads)
        for got, expected in zip(results[1], results[0]):
            test_kernels._close(got, expected, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_log_probs_twins_match(dtype):
    """On a GPU: the Triton log-probs twin against the torch one, every field and both gradients (the form that
    reads nothing on the host: a trained head's weight gradient recomputed)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(300, 256, device="cuda", generator=g).to(dtype)
    w = (torch.randn(50000, 256, device="cuda", generator=g) * 0.05).to(dtype)
    t = torch.randint(0, 50000, (300,), device="cuda", generator=g)
    weights = torch.rand(300, device="cuda", generator=g)
    results = []
    for backend in ("torch", "triton"):
        hl, wl = h.detach().requires_grad_(), w.detach().requires_grad_()
        fields = kernels.linear_log_probs(hl, wl, t, softcap=20.0, temperature=0.8, backend=backend)
        (-(fields[0] * weights).sum() + 0.1 * fields[1].sum()).backward()
        results.append([f.float() for f in fields[:4]] + [fields[4], hl.grad.float(), wl.grad.float()])
    for got, expected in zip(results[1], results[0]):
        if got.dtype == torch.bool:
            assert (got == expected).float().mean() > 0.99  # ties at bf16 may break either way
        else:
            test_kernels._close(got, expected, dtype)


@pytest.mark.cuda
def test_kernels_run_on_their_tensors_gpu():
    """A tensor on the second GPU, the first current: each Triton op runs there and gives the first GPU's result."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    x, w = torch.randn(64, 4096, device="cuda:0"), torch.randn(4096, device="cuda:0")
    torch.cuda.set_device(0)
    want = kernels.rms_norm(x, w, 1e-6, backend="triton")
    got = kernels.rms_norm(x.to("cuda:1"), w.to("cuda:1"), 1e-6, backend="triton")
    assert got.device == torch.device("cuda:1")
    torch.testing.assert_close(got.cpu(), want.cpu())


NAN_BITS = [0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0xFFC00000, 0x7FC00000]  # NVIDIA's canonical NaN, low payloads


@jit
def _cast_kernel(X, Y, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(Y + i, cast(tl.load(X + i, mask=i < n), Y.dtype.element_ty), mask=i < n)


def test_bf16_cast_rounds_like_a_gpu_and_keeps_nan():
    """The interpreter truncates to bfloat16; GPUs round to nearest even and keep NaN NaN: `cast` must give the
    GPU's result, which is torch's, bit for bit, NaN payloads included in their NaN-ness."""
    values = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-9, -(1 + 3 * 2**-9), 3.0e38, 65504.0, 1e-40, 0.0])
    nans = torch.tensor(NAN_BITS, dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = torch.cat([values, nans, torch.randn(100)])
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, y, x.numel(), BLOCK=128)
    want = x.to(torch.bfloat16)
    assert torch.equal(y.isnan(), x.isnan()) and y.isnan()[len(values):len(values) + len(NAN_BITS)].all()
    assert torch.equal(y[~x.isnan()].view(torch.int16), want[~x.isnan()].view(torch.int16))


def test_a_nan_in_a_bf16_row_comes_out_nan():
    x = torch.randn(4, 64).to(torch.bfloat16)
    x[1, 5] = float("nan")
    w = torch.randn(64).to(torch.bfloat16)
    y = kernels.rms_norm(x, w, 1e-6, backend="triton")
    assert y[1].isnan().all() and not y[[0, 2, 3]].isnan().any()
    gate, up = torch.randn(3, 40).to(torch.bfloat16), torch.randn(3, 40).to(torch.bfloat16)
    gate[2, 7] = float("inf")
    up[2, 7] = 0.0  # silu(inf) * 0: NaN, as the reference gives
    out = kernels.swiglu(gate, up, backend="triton")
    assert out[2, 7].isnan() and out.isnan().sum() == 1
