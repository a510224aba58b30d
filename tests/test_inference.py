"""The decode step of every family: its logits against the full forward in every padding layout, its cache,
its packed weights, its kernels."""

import importlib

import pytest
import torch

import patchkit
from patchkit import architectures as A
from patchkit import inference
from patchkit.architectures.moe import Moe
from patchkit.parity import DECODE_LAYOUTS, _inference_decode, _reference_decode, decode_masks, tiny_model, text_vocab
from .families import BUILTIN

FAMILIES = BUILTIN


def _prompts(vocab, batch=3, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:  # left padding of different lengths
        mask[1, :3] = 0
        mask[-1, :5] = 0
        ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


@pytest.mark.parametrize("config", [{}, {"tie_word_embeddings": True, "num_key_value_heads": 1},
                                    {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 2,
                                     "num_key_value_heads": 2, "vocab_size": 99}], ids=["gqa", "mqa-tied", "tester"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", FAMILIES, ids=lambda a: a.name)
def test_every_decode_step_matches_the_full_forward_in_every_layout(arch, attn, config):
    """fp32, 1e-5 relative: 14 teacher-forced steps after a 16-token prompt (past every tiny sliding window), for
    unpadded, left-padded and right-padded prompts; "tester" is transformers' test config (heads of 16, init 0.02,
    no noise on the norms), where attention is nearly uniform except through q/k norms."""
    if "intermediate_size" in config and issubclass(arch, Moe):  # Mixtral's experts are that wide, and
        config = {**config, "intermediate_size": 40}  # transformers' grouped_mm needs rows of 16-byte multiples
    model = tiny_model(arch, attn_implementation=attn, **config).eval()
    if "vocab_size" in config:
        torch.manual_seed(0)
        model = type(model)(model.config).eval()
    ids = torch.randint(3, text_vocab(model.config), (3, 30), generator=torch.Generator().manual_seed(1))
    for layout, mask in decode_masks(3, 16).items():
        with torch.no_grad():
            reference = _reference_decode(model, ids, mask)
            with patchkit.patched(arch.name):
                got = _inference_decode(model, ids, mask)
        error = ((got - reference).abs().max() / reference.abs().max()).item()
        assert error < 1e-5, f"{layout}: {error:.2e}"


def test_the_verifier_checks_every_layout():
    result = patchkit.verify("qwen3")[0]
    assert [r.tensor for r in result.rows if r.tensor.startswith("decode")] == [f"decode {d}" for d in DECODE_LAYOUTS]
    assert all(r.tol == 1e-5 for r in result.rows if r.tensor.startswith("decode"))


@pytest.mark.parametrize("arch", [A.Llama, A.Gemma2], ids=lambda a: a.name)
def test_decode_runs_the_triton_kernels(arch):
    """With backend="triton" the decode step's norms and MLP are patchkit's Triton kernels (the interpreter on CPU)."""
    model = tiny_model(arch).eval()
    ids, mask = _prompts(text_vocab(model.config), batch=2, length=7)
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with patchkit.patched(arch.name, backend="triton"):
        assert torch.equal(patchkit.generate(model, ids, 8, attention_mask=mask, pad_token_id=0), reference)


def test_cache_holds_what_a_full_forward_computes():
    """The keys and values the decode steps write into the pre-allocated cache are transformers' own."""
    model = tiny_model(A.Llama).eval()
    ids, _ = _prompts(text_vocab(model.config), batch=1)
    decoding = inference.Decoding.prefill(model, ids[:, :5], None, ids.shape[1] - 5)
    storage = [k.data_ptr() for k in decoding.state.keys]
    with torch.inference_mode():
        for t in range(5, ids.shape[1]):
            decoding.step(ids[:, t])
    cache = model(ids, use_cache=True)
    cache = getattr(cache, "cache", None) or cache.past_key_values
    for i, layer in enumerate(cache.layers):
        torch.testing.assert_close(decoding.state.keys[i][:, :, :ids.shape[1]], layer.keys, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(decoding.state.values[i][:, :, :ids.shape[1]], layer.values, rtol=1e-5, atol=1e-6)
    assert [k.data_ptr() for k in decoding.state.keys] == storage  # written in place, never reallocated


def test_decode_uses_the_backend_the_family_was_patched_with(monkeypatch):
    norm_module = importlib.import_module("patchkit.kernels.rms_norm")  # the package exports the op by that name
    model = tiny_model(A.Llama).eval()
    seen = []
    real = norm_module.dispatch
    monkeypatch.setattr(norm_module, "dispatch", lambda op, backend, device: seen.append(backend) or real(
        op, backend, device))
    with patchkit.patched("llama", backend="torch"):
        patchkit.generate(model, torch.ones(1, 4, dtype=torch.long), 3)
    assert seen and set(seen) == {"torch"}
