"""Checks transformers' common model tests make, restated as patched-against-unpatched comparisons.

transformers' own `ModelTesterMixin` runs in tests/test_transformers_suite.py, checking each patched model on its
own; these compare the patched numbers with the unpatched ones with the same tiny random models: training with
and without gradient checkpointing, tuple and dict outputs, hidden states and attentions captured while the
fused loss runs, resized embeddings, save and load while patched, and exact unpatching.
"""

import pytest
import torch

import patchkit
from patchkit.parity import tiny_batch, tiny_model, text_vocab

from .families import BUILTIN

FAMILIES = pytest.mark.parametrize("arch", BUILTIN, ids=lambda a: a.name)


def _step(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**batch, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out.loss
    loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(got, want, name=""):
    assert got.keys() == want.keys()
    for key, g in want.items():
        assert (got[key] - g).abs().max() <= 1e-4 * g.abs().max().clamp(min=1e-12), f"{name} {key}"


@FAMILIES
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_training_matches(arch, checkpointing):
    model = tiny_model(arch, attn_implementation="eager").train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = tiny_batch(text_vocab(model.config))
    ref, ref_grads = _step(model, batch, output_hidden_states=True, output_attentions=True)
    with patchkit.patched(arch.name):
        out, grads = _step(model, batch, output_hidden_states=True, output_attentions=True)
        as_tuple, _ = _step(model, batch, return_dict=False)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(as_tuple[0], ref.loss, rtol=1e-5, atol=0)
    _close(grads, ref_grads, arch.name)
    for kind in ("hidden_states", "attentions"):
        assert len(out[kind]) == len(ref[kind]), kind
        for got, want in zip(out[kind], ref[kind]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@FAMILIES
def test_resized_embeddings_and_save_load_while_patched(arch, tmp_path):
    model = tiny_model(arch)
    model.resize_token_embeddings(text_vocab(model.config) + 5)
    batch = tiny_batch(text_vocab(model.config))
    model.eval()
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    model.train()
    loss = model(**batch).loss
    originals = {cls: vars(cls).get("forward") for cls in {type(m) for m in model.modules()}}
    with patchkit.patched(arch.name):
        torch.testing.assert_close(model(**batch).loss, loss, rtol=1e-5, atol=0)
        model.save_pretrained(tmp_path)
        loaded = type(model).from_pretrained(tmp_path).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(**{k: v for k, v in batch.items() if k != "labels"}).logits, logits,
                                       rtol=1e-5, atol=1e-6)
    assert {cls: vars(cls).get("forward") for cls in originals} == originals  # unpatched exactly
