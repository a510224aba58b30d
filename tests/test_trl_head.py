"""TRL's fused LM head served by patchkit: the same per-token numbers and gradients as TRL's own kernel,
routing that follows patch and unpatch, and exact restoration of TRL."""

import subprocess
import sys

import pytest
import torch
from trl.kernels import ChunkedLogProbFunction

import patchkit
from patchkit.kernels import log_probs
from patchkit.parity import tiny_batch, tiny_model, text_vocab

OUTPUTS = ("log_probs", "entropy", "is_top1")


def _trl(h, w, t, softcap):
    lp, ent, _, _, top = ChunkedLogProbFunction.apply(h, w, None, t, 1.0, 32768, softcap, 1.0, OUTPUTS)
    return lp, ent, top


def _grads(fn, h, w, t, weights, entropy_coef, autocast):
    h.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        lp, ent, top = fn(h, w, t)
    (-(lp * weights).sum() / len(t) + entropy_coef * ent.sum()).backward()
    return lp.detach(), ent.detach(), top, h.grad, w.grad


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["nocap", "softcap"])
@pytest.mark.parametrize("loss", ["mean", "weighted", "entropy"])
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen_head", "trained_head"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast_bf16"])
def test_log_probs_match_trl_kernel(softcap, loss, weight_grad, autocast):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(45, 24, generator=g).requires_grad_()
    w = (torch.randn(157, 24, generator=g) * 0.4).requires_grad_(weight_grad)
    t = torch.randint(0, 157, (45,), generator=g)
    weights = torch.rand(45, generator=g) if loss == "weighted" else torch.ones(45)
    args = (h, w, t, weights, 0.3 if loss == "entropy" else 0.0, autocast)
    dtype = torch.bfloat16 if autocast else None
    got = _grads(lambda *a: log_probs.linear_log_probs(*a, softcap=softcap, compute_dtype=dtype), *args)
    expected = _grads(lambda *a: _trl(*a, softcap), *args)
    exact = _grads(lambda *a: log_probs.linear_log_probs(*a, softcap=softcap), h.detach().double().requires_grad_(),
                   w.detach().double().requires_grad_(weight_grad), t, weights.double(), *args[4:5], False)
    if not autocast:
        assert torch.equal(got[2], expected[2])
    for a, b, e in zip(got[:2] + got[3:], expected[:2] + expected[3:], exact[:2] + exact[3:], strict=True):
        if b is None:
            assert a is None and e is None
            continue
        scale = e.abs().max()
        if autocast:  # both in bf16: patchkit no further from the float64 result than TRL (x2)
            assert (a - e).abs().max() <= 2 * (b - e).abs().max() + 1e-6 * scale
        else:
            assert (a - b).abs().max() <= 1e-5 * scale


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


def test_options_patchkit_does_not_compute_stay_with_trl():
    from trl.trainer import sft_trainer

    from patchkit.architectures import Llama

    with patchkit.patched("llama"):
        model = tiny_model(Llama)
        sft_trainer.add_fused_lm_head(model, temperature=0.7, outputs=OUTPUTS)
        assert model.forward.__func__.__code__.co_name == "_fused_forward"  # TRL's own, not patchkit's router


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
