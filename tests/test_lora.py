"""Fused LoRA: the kernels against autograd of the unfused math, and PEFT models patched vs unpatched."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

import patchkit
from patchkit import kernels as K
from patchkit.parity import tiny_batch, tiny_model, text_vocab
from .families import BUILTIN

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ARCHS = BUILTIN


def _projection(n_in, n_out, *, lora=True, bias=False, trainable=False, dtype=torch.float32):
    def param(*shape, grad=True):
        return (torch.randn(*shape) * 0.5).to(dtype).requires_grad_(grad)

    weight, b = param(n_out, n_in, grad=trainable), param(n_out) if bias else None
    if not lora:
        return K.Projection(weight, b)
    return K.Projection(weight, b, param(4, n_in), param(n_out, 4), 0.75)


def _unfused(x, p):
    y = F.linear(x, p.weight, p.bias)
    return y if p.lora_a is None else y + F.linear(F.linear(x, p.lora_a), p.lora_b) * p.scaling


def _grads(fn, tensors):
    out = fn(*tensors)
    wanted = [t for t in tensors if t is not None and t.requires_grad]
    return [out, *torch.autograd.grad((out.float() * torch.linspace(-1, 1, out.shape[-1])).sum(), wanted)]


def _check(fused, unfused, tensors):
    """fp32: within 1e-5 of the unfused math. bf16: no further from a float64 run than twice the unfused bf16 run."""
    got, ref = _grads(fused, tensors), _grads(unfused, tensors)
    if tensors[0].dtype == torch.float32:
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
        return
    exact = _grads(unfused, [None if t is None else t.detach().double().requires_grad_(t.requires_grad)
                             for t in tensors])
    for a, b, e in zip(got, ref, exact, strict=True):
        scale = e.abs().max().item()
        assert (a.double() - e).abs().max() <= 2 * (b.double() - e).abs().max() + 2 ** -8 * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_lora_linear(dtype, bias, trainable):
    x = torch.randn(3, 7, 12, dtype=dtype, requires_grad=True)
    p = _projection(12, 10, bias=bias, trainable=trainable, dtype=dtype)

    def project(fn):
        return lambda x, *params: fn(x, K.Projection(*params, p.scaling))

    _check(project(K.lora_linear), project(_unfused), [x, *p[:4]])


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
@pytest.mark.parametrize("adapted", ["all", "gate+down", "down", "gate+up"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lora_mlp(activation, adapted, dtype):
    act = F.silu if activation == "swiglu" else (lambda t: F.gelu(t, approximate="tanh"))
    x = torch.randn(2, 9, 12, dtype=dtype, requires_grad=True)
    gate, up, down = (_projection(*shape, lora=adapted == "all" or name in adapted, trainable=name == "up",
                                  dtype=dtype) for name, shape in (("gate", (12, 20)), ("up", (12, 20)),
                                                                   ("down", (20, 12))))
    def mlp(fn):
        def run(x, *params):
            g, u, d = (K.Projection(*params[i:i + 4], 0.75) for i in (0, 4, 8))
            return fn(x, g, u, d)
        return run

    fused = mlp(lambda x, g, u, d: K.lora_mlp(x, g, u, d, activation=activation))
    _check(fused, mlp(lambda x, g, u, d: _unfused(act(_unfused(x, g)) * _unfused(x, u), d)),
           [x, *gate[:4], *up[:4], *down[:4]])


def test_lora_mlp_saves_less_than_unfused_peft():
    """Saved for backward: x, gate, up and the rank-r inputs; no activation, no down-projection input."""
    x = torch.randn(64, 32, requires_grad=True)
    gate, up, down = _projection(32, 96), _projection(32, 96), _projection(96, 32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        K.lora_mlp(x, gate, up, down)
    big = {t.data_ptr() for t in saved if t.numel() >= 64 * 96}
    assert len(big) == 2  # gate and up outputs (the weights are 96 x 32 and count too: only 64 x 96 here)


def _peft(arch, targets=PROJECTIONS, **lora):
    model = tiny_model(arch)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=lora.pop("dropout", 0.0),
                        task_type="CAUSAL_LM", **lora)
    model = get_peft_model(model, config)
    with torch.no_grad():  # B starts at zero; make the adapters count
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


@contextlib.contextmanager
def _count(monkeypatch):
    calls = {"lora_linear": 0, "lora_mlp": 0}
    for op in calls:
        original = K.resolve(op, "auto", "cpu")

        def spy(*a, _op=op, _f=original, **k):
            calls[_op] += 1
            return _f(*a, **k)

        monkeypatch.setitem(K._dispatch._resolved, (op, "auto", "cpu"), spy)
    yield calls


def _train_step(model, batch, seed=0):
    model.zero_grad(set_to_none=True)
    model.train()
    torch.manual_seed(seed)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(model, arch, monkeypatch, **patch_kw):
    batch = tiny_batch(text_vocab(model.config))
    loss, grads = _train_step(model, batch)
    with patchkit.patched(arch.name, **patch_kw), _count(monkeypatch) as calls:
        got_loss, got = _train_step(model, batch)
    torch.testing.assert_close(got_loss, loss, rtol=1e-5, atol=0)
    assert got.keys() == grads.keys() and any("lora_A" in n for n in got)
    for name, g in grads.items():  # the design's measure: max difference relative to the largest gradient
        assert (got[name] - g).abs().max() <= 1e-4 * g.abs().max(), name
    return calls


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_peft_lora_gradients_match_and_run_fused(arch, monkeypatch):
    model = _peft(arch, targets="all-linear")  # fused projections too: Phi-3's qkv_proj, gate_up_proj
    calls = _compare(model, arch, monkeypatch)
    layers = model.config.num_hidden_layers
    decoder = model.base_model.model.model.layers
    attention = sum(hasattr(m, "lora_A") for m in decoder[0].self_attn.modules())
    # every dense MLP with adapters is one lora_mlp; PEFT moves an MoE model's MLP targets onto its experts' weights
    ffns = [layer._modules[arch.ffn] for layer in decoder]
    adapted = sum("experts" not in f._modules and any(hasattr(m, "lora_A") for m in f.modules()) for f in ffns)
    assert adapted == layers or any("experts" in f._modules for f in ffns)
    assert calls == {"lora_linear": attention * layers, "lora_mlp": adapted}


@pytest.mark.parametrize("case", ["dropout", "lora_bias", "dora", "two_adapters", "attention_only", "lora_op_off"])
def test_fallbacks_match_peft(case, monkeypatch):
    """What the fused path cannot serve runs PEFT's own forward, with the same numbers."""
    from patchkit.architectures import Llama

    kw = {"dropout": {"dropout": 0.1}, "lora_bias": {"lora_bias": True}, "dora": {"use_dora": True}}.get(case, {})
    model = _peft(Llama, ["q_proj", "v_proj"] if case == "attention_only" else PROJECTIONS, **kw)
    if case == "two_adapters":
        model.add_adapter("second", LoraConfig(r=2, target_modules=PROJECTIONS, task_type="CAUSAL_LM"))
        model.base_model.set_adapter(["default", "second"])
    calls = _compare(model, Llama, monkeypatch, **({"lora": False} if case == "lora_op_off" else {}))
    layers = model.config.num_hidden_layers
    expected = {"attention_only": {"lora_linear": 2 * layers, "lora_mlp": 0}}.get(case, {"lora_linear": 0,
                                                                                       "lora_mlp": 0})
    assert calls == expected


def test_autocast_bf16(monkeypatch):
    """Mixed precision (fp32 weights, bf16 autocast, TRL's CPU default): fused, and as close to fp32 as PEFT."""
    from patchkit.architectures import Llama

    model = _peft(Llama)
    batch = tiny_batch(text_vocab(model.config))
    exact_loss, exact = _train_step(model, batch)
    runs = {}
    for variant in ("unpatched", "patched"):
        with torch.autocast("cpu", dtype=torch.bfloat16), _count(monkeypatch) as calls, \
                patchkit.patched("llama") if variant == "patched" else contextlib.nullcontext():
            runs[variant] = _train_step(model, batch)
        assert calls["lora_mlp"] == (2 if variant == "patched" else 0)
    def err(run):  # over all LoRA gradients: per tensor, bf16 noise on a tiny model is too random to rank
        return sum((run[1][n] - g).square().sum() for n, g in exact.items()).sqrt().item()

    assert err(runs["patched"]) <= 2 * err(runs["unpatched"])
    assert abs(runs["patched"][0] - exact_loss) <= 2 * abs(runs["unpatched"][0] - exact_loss) + 2 ** -8


def test_half_precision_base_with_float32_adapters(monkeypatch):
    """PEFT's default on a bf16 model: adapters in float32. Fused, and as close to float64 as PEFT is."""
    from patchkit.architectures import Llama

    model = _peft(Llama)
    batch = tiny_batch(text_vocab(model.config))
    exact_loss, exact = _train_step(model.double(), batch)
    model.float()
    for name, module in model.named_modules():
        if hasattr(module, "base_layer") or name.endswith(("norm", "embed_tokens", "lm_head")):
            getattr(module, "base_layer", module).to(torch.bfloat16)
    assert model.base_model.model.model.layers[0].mlp.up_proj.lora_A.default.weight.dtype == torch.float32
    runs = {}
    for variant in ("unpatched", "patched"):
        with _count(monkeypatch) as calls, \
                patchkit.patched("llama") if variant == "patched" else contextlib.nullcontext():
            runs[variant] = _train_step(model, batch)
        assert calls["lora_mlp"] == (2 if variant == "patched" else 0)

    def err(run):
        return sum((run[1][n].double() - g).square().sum() for n, g in exact.items()).sqrt().item()

    assert err(runs["patched"]) <= 2 * err(runs["unpatched"])


def test_merged_and_disabled_adapters(monkeypatch):
    from patchkit.architectures import Llama

    model = _peft(Llama)
    batch = {k: v for k, v in tiny_batch(text_vocab(model.config)).items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        adapted = model(**batch).logits
        with model.disable_adapter():
            base = model(**batch).logits
        with patchkit.patched("llama"), _count(monkeypatch) as calls:
            torch.testing.assert_close(model(**batch).logits, adapted, rtol=1e-5, atol=1e-5)
            with model.disable_adapter():
                torch.testing.assert_close(model(**batch).logits, base, rtol=1e-5, atol=1e-5)
            fused = dict(calls)
            model.merge_adapter()
            torch.testing.assert_close(model(**batch).logits, adapted, rtol=1e-4, atol=1e-4)
            model.unmerge_adapter()
    assert fused == {"lora_linear": 8, "lora_mlp": 2}
    assert calls == fused  # merged: the base layers alone, no adapter math


def test_peft_layer_is_restored_exactly():
    from peft.tuners.lora import layer

    original = layer.Linear.forward
    with patchkit.patched("qwen3"):
        assert layer.Linear.forward is not original
        with patchkit.patched("llama"):
            pass
        assert layer.Linear.forward is not original  # qwen3 still needs it
    assert layer.Linear.forward is original
    with patchkit.patched("llama", lora=False):
        assert layer.Linear.forward is original
