"""TRL's fused LM head served by patchkit: the same per-token numbers and gradients as TRL's own kernel,
routing that follows patch and unpatch, and exact restoration of TRL."""

import contextlib
import dataclasses
import subprocess
import sys

import pytest
import torch
from trl.kernels import ChunkedLogProbFunction

import patchkit
from patchkit.kernels import log_probs
from patchkit.parity import tiny_batch, tiny_model, text_vocab

OUTPUTS = log_probs.OUTPUTS  # every field TRL's head computes


def _trl(h, w, t, softcap, temperature):
    return ChunkedLogProbFunction.apply(h, w, None, t, temperature, 32768, softcap, 1.0, OUTPUTS)


def _grads(fn, h, w, t, weights, entropy_coef, autocast):
    h.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        fields = fn(h, w, t)
    (-(fields[0] * weights).sum() / len(t) + entropy_coef * fields[1].sum()).backward()
    return (*(f.detach() for f in fields), h.grad, w.grad)


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["nocap", "softcap"])
@pytest.mark.parametrize("temperature", [1.0, 0.7], ids=["t1", "t0.7"])
@pytest.mark.parametrize("loss", ["mean", "weighted", "entropy"])
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen_head", "trained_head"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast_bf16"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("side", ["host", "device"])
def test_log_probs_match_trl_kernel(softcap, temperature, loss, weight_grad, autocast, backend, side, monkeypatch):
    """Every output field and both gradients, for a mean, a per-token weighted sum (DPO's, GRPO's) and an entropy
    bonus, at TRL's temperatures; the Triton twin under the interpreter; and in the form a GPU runs, where
    nothing is read on the host (a trained head's weight gradient always recomputed)."""
    from patchkit.kernels import cross_entropy

    if side == "device":
        monkeypatch.setattr(cross_entropy, "on_host", lambda t: False)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(45, 24, generator=g).requires_grad_()
    w = (torch.randn(157, 24, generator=g) * 0.4).requires_grad_(weight_grad)
    t = torch.randint(0, 157, (45,), generator=g)
    weights = torch.rand(45, generator=g) if loss == "weighted" else torch.ones(45)
    args = (h, w, t, weights, 0.3 if loss == "entropy" else 0.0, autocast)
    dtype = torch.bfloat16 if autocast else None
    kw = dict(softcap=softcap, temperature=temperature)
    got = _grads(lambda *a: log_probs.linear_log_probs(*a, compute_dtype=dtype, backend=backend, **kw), *args)
    expected = _grads(lambda *a: _trl(*a, softcap, temperature), *args)
    exact = _grads(lambda *a: log_probs.linear_log_probs(*a, **kw), h.detach().double().requires_grad_(),
                   w.detach().double().requires_grad_(weight_grad), t, weights.double(), *args[4:5], False)
    if not autocast:
        assert torch.equal(got[4], expected[4])  # is_top1
    for a, b, e in zip(got[:4] + got[5:], expected[:4] + expected[5:], exact[:4] + exact[5:], strict=True):
        if b is None:
            assert a is None and e is None
            continue
        scale = e.abs().max()
        if autocast:  # both in bf16: patchkit no further from the float64 result than TRL (x2)
            assert (a - e).abs().max() <= 2 * (b - e).abs().max() + 1e-6 * scale
        else:
            assert (a - b).abs().max() <= 1e-5 * scale


@pytest.mark.parametrize("softcap", [None, 3.0], ids=["nocap", "softcap"])
def test_triton_log_probs_stream_the_vocabulary_in_blocks(softcap, monkeypatch):
    """Rows far wider than a block (the online log-sum-exp, entropy and argmax carried across blocks) at large
    logits, where the entropy as lse - sum(p z) would cancel: the same fields as the torch twin."""
    from patchkit.kernels import _triton

    monkeypatch.setattr(_triton, "ROW_BLOCK", 32)
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(9, 16, generator=g) * 8, torch.randn(301, 16, generator=g)
    t = torch.randint(0, 301, (9,), generator=g)
    w[t[0]] = w[(t[0] + 40) % 301]  # a tie for the top logit: the first argmax counts
    kw = dict(softcap=softcap, temperature=0.8)
    got = log_probs.linear_log_probs(h, w, t, backend="triton", **kw)
    want = log_probs.linear_log_probs(h.double(), w.double(), t, backend="torch", **kw)
    assert torch.equal(got[4], want[4])
    for a, b in zip(got[:4], want[:4], strict=True):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_only_the_fields_asked_for_are_computed(backend):
    g = torch.Generator().manual_seed(0)
    h, w, t = torch.randn(7, 8, generator=g), torch.randn(31, 8, generator=g), torch.randint(0, 31, (7,), generator=g)
    fields = log_probs.linear_log_probs(h, w, t, outputs=("log_probs", "mean_logits"), backend=backend)
    assert [f is not None for f in fields] == [True, False, False, True, False]
    torch.testing.assert_close(fields[3], (h @ w.T).mean(-1))


def test_trainer_head_follows_patch_and_unpatch(tmp_path, monkeypatch):
    """Built while patched, the trainer's model answers `fused_lm_head=True` with patchkit; after unpatch,
    with TRL's head; either way the per-token outputs agree."""
    from trl import SFTConfig, SFTTrainer

    from patchkit.architectures import Llama
    from patchkit.toy import documents, word_tokenizer

    calls = {"patchkit": 0, "trl": 0}
    for name, owner, attr in (("patchkit", log_probs._LogProbs, "apply"), ("trl", ChunkedLogProbFunction, "apply")):
        original = getattr(owner, attr)
        monkeypatch.setattr(owner, attr, lambda *a, _o=original, _n=name: calls.__setitem__(_n, calls[_n] + 1)
                            or _o(*a))
    model = tiny_model(Llama)
    args = SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, max_steps=1)
    with patchkit.patched("llama"):
        trainer = SFTTrainer(model=model, args=args, train_dataset=documents(4, 211, 40),
                             processing_class=word_tokenizer(211))
        model = trainer.model
        batch = tiny_batch(text_vocab(model.config))
        model.train()
        patched = model(**batch, fused_lm_head=True)
        assert calls == {"patchkit": 1, "trl": 0}
    unpatched = model(**batch, fused_lm_head=True)
    assert calls == {"patchkit": 1, "trl": 1}
    for field in ("loss", "log_probs", "entropy"):
        torch.testing.assert_close(getattr(patched, field), getattr(unpatched, field), rtol=1e-5, atol=1e-6)
    assert torch.equal(patched.is_top1, unpatched.is_top1) and torch.equal(patched.label_mask, unpatched.label_mask)
    eval_logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # other calls: the class forward
    assert eval_logits.shape[-1] == text_vocab(model.config)


@pytest.mark.parametrize("side", ["host", "device"])
@pytest.mark.parametrize("module", ["sft_trainer", "dpo_trainer", "kto_trainer", "grpo_trainer", "rloo_trainer"])
def test_every_trainers_head_is_patchkits_with_its_options(module, side, caplog, monkeypatch):
    """Each trainer's module holds its own `add_fused_lm_head`; each is patched, and the options reach the head;
    in the form a GPU runs too (ignored tokens through the matmul with their fields zeroed: no `nonzero`)."""
    import importlib

    from patchkit.kernels import cross_entropy

    if side == "device":
        monkeypatch.setattr(cross_entropy, "on_host", lambda t: False)

    from trl.trainer.utils import add_fused_lm_head as trl_head

    from patchkit.architectures import Llama

    trainer = importlib.import_module(f"trl.trainer.{module}")
    batch = tiny_batch(211)
    assert (batch["labels"] == -100).any()  # ignored tokens to skip or zero
    with patchkit.patched("llama"):
        model = tiny_model(Llama).train()
        reference = tiny_model(Llama).train()
        reference.load_state_dict(model.state_dict())
        trainer.add_fused_lm_head(model, temperature=0.7, cast_lm_head_to_fp32=True, outputs=OUTPUTS)
        assert trainer.add_fused_lm_head.__patchkit__[1] == "cross_entropy"
        with log_probs_calls() as calls:
            got = model(**batch, fused_lm_head=True)
        assert calls == [1]
    trl_head(reference, temperature=0.7, cast_lm_head_to_fp32=True, outputs=OUTPUTS)
    want = reference(**batch, fused_lm_head=True)
    for name in ("loss", *OUTPUTS, "label_mask"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_trls_head_runs_the_backend_the_patch_was_made_with(backend, monkeypatch):
    """`patch(..., backend=...)` holds for TRL's head as for the loss: Triton's log-probs (under the interpreter) for
    "triton", torch's for "torch" even where `auto` would pick Triton (made to here)."""
    from trl.trainer import grpo_trainer
    from trl.trainer.utils import add_fused_lm_head as trl_head

    from patchkit import kernels
    from patchkit.architectures import Llama
    from patchkit.plugins import manager

    ran = []
    for name in ("_step_torch", "_step_triton"):
        real = getattr(log_probs, name)
        monkeypatch.setattr(log_probs, name, lambda *a, _r=real, _n=name: ran.append(_n) or _r(*a))
    triton_on_cpu = dataclasses.replace(kernels.TRITON, auto_devices=("cuda", "cpu"))  # auto: Triton, on CPU too
    monkeypatch.setitem(manager().providers, "triton", triton_on_cpu)
    kernels.clear_cache()
    batch = tiny_batch(211)
    try:
        with patchkit.patched("llama", backend=backend):
            model = tiny_model(Llama).train()
            reference = tiny_model(Llama).train()
            reference.load_state_dict(model.state_dict())
            grpo_trainer.add_fused_lm_head(model, outputs=OUTPUTS)
            got = model(**batch, fused_lm_head=True)
    finally:
        kernels.clear_cache()
    assert ran and set(ran) == {f"_step_{backend}"}
    trl_head(reference, outputs=OUTPUTS)
    want = reference(**batch, fused_lm_head=True)
    for name in ("loss", "log_probs", "entropy"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-5)


def test_a_head_patchkit_cannot_serve_stays_with_trl_and_says_why(caplog):
    from trl.trainer import dpo_trainer

    from patchkit.architectures import Llama

    with patchkit.patched("llama"), caplog.at_level("WARNING", logger="patchkit"):
        model = tiny_model(Llama, logits_scaling=2.0)  # a multiplier Llama's forward does not apply
        dpo_trainer.add_fused_lm_head(model)
        assert model.forward.__func__.__code__.co_name == "_fused_forward"  # TRL's own
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(211))
        biased = tiny_model(Llama)
        dpo_trainer.add_fused_lm_head(biased)  # served when added; PEFT or a user may change the head after
        biased.lm_head = torch.nn.Linear(64, 211)
        with log_probs_calls() as calls:
            out = biased(**tiny_batch(211), fused_lm_head=True)
        assert calls == [0] and out.log_probs is not None
    assert "logits_scaling" in caplog.text and "has a bias" in caplog.text


@contextlib.contextmanager
def log_probs_calls():
    from patchkit.kernels import _dispatch

    with _dispatch.serving() as served:
        calls = [0]
        yield calls
        calls[0] = served.kernels["linear_log_probs"]


def test_trl_is_restored_exactly_and_patched_on_import():
    from trl.trainer import sft_trainer

    original = sft_trainer.add_fused_lm_head
    with patchkit.patched("gemma"):
        assert sft_trainer.add_fused_lm_head is not original
    assert sft_trainer.add_fused_lm_head is original
    with patchkit.patched("llama", cross_entropy=False):
        assert sft_trainer.add_fused_lm_head is original
    code = ("import sys, patchkit; patchkit.patch('llama'); assert 'trl.trainer.sft_trainer' not in sys.modules;"
            "assert 'peft' not in sys.modules; from trl.trainer import sft_trainer; import peft.tuners.lora.layer as L;"
            "assert sft_trainer.add_fused_lm_head.__patchkit__ == ('trl.fused_lm_head', 'cross_entropy');"
            "assert L.Linear.forward.__patchkit__ == ('peft.lora', 'lora')")
    subprocess.run([sys.executable, "-c", code], check=True)
