"""Per-document attention in packed rows: the same numbers as transformers' block-diagonal mask, less work."""

import pytest
import torch

import patchkit
from patchkit import attention
from patchkit.parity import tiny_model, text_vocab
from .families import BUILTIN

ARCHS = BUILTIN
LENGTHS = [[13, 20, 7], [30, 10]]  # documents per row; every family's tiny window (8) is shorter than some
# transformers builds GPT-OSS's mask without the position ids: its packed documents see each other, so they must
# not be split
UNSEPARATED = {"gpt_oss"}


def _packed(vocab):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 40), generator=g)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in LENGTHS])
    return {"input_ids": ids, "position_ids": pos, "labels": ids, "use_cache": False}


def _run(model, batch, spy):
    model.zero_grad(set_to_none=True)
    spy.clear()
    out = model(**batch)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, list(spy)


@pytest.fixture
def splits(monkeypatch):
    """The documents each attention call split its rows into (None: unsplit)."""
    seen = []
    original = attention.documents

    def spy(*args):
        docs = original(*args)
        seen.append(docs)
        return docs

    monkeypatch.setattr(attention, "documents", spy)
    return seen


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
@pytest.mark.parametrize("masked", [False, True], ids=["packed", "with_attention_mask"])
def test_packed_rows_match_the_block_diagonal_mask(arch, attn, masked, splits):
    model = tiny_model(arch, attn_implementation=attn).train()
    batch = _packed(text_vocab(model.config))
    if masked:  # an explicit mask: transformers lets documents see each other, and so must we
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    logits, grads, _ = _run(model, batch, splits)
    with patchkit.patched(arch.name, cross_entropy=False):
        got_logits, got, docs = _run(model, batch, splits)
    expected = None if masked or arch.name in UNSEPARATED else [[0, 13, 33, 40], [0, 30, 40]]
    assert docs and all(d == expected for d in docs)
    assert (got_logits - logits).abs().max() <= 1e-5 * logits.abs().max()
    for name, g in grads.items():
        assert (got[name] - g).abs().max() <= 1e-5 * g.abs().max(), name


def test_unsplit_with_a_cache_or_recorded_attentions(splits):
    from patchkit.architectures import Llama

    model = tiny_model(Llama, attn_implementation="eager").eval()
    batch = {k: v for k, v in _packed(text_vocab(model.config)).items() if k != "labels"}
    with torch.no_grad():
        expected = model(**batch, output_attentions=True).attentions
        with patchkit.patched("llama"):
            got = model(**batch, output_attentions=True).attentions
            assert splits and not any(splits)
            splits.clear()
            model(**{**batch, "use_cache": True})
            assert splits and not any(splits)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_work_grows_with_the_sum_of_squares():
    """Eager attention saves its probabilities: per document that is sum(len^2), not (sum len)^2."""
    from patchkit.architectures import Llama

    model = tiny_model(Llama, attn_implementation="eager").train()
    batch = _packed(text_vocab(model.config))
    batch.pop("labels")
    sizes = {}
    for variant in ("unpatched", "patched"):
        saved = []
        with patchkit.patched("llama") if variant == "patched" else patchkit.patched("llama", attention=False):
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
                model(**batch)
        sizes[variant] = sum(saved)
    heads, layers = model.config.num_attention_heads, model.config.num_hidden_layers
    squares = len(LENGTHS) * 40 ** 2 - sum(n * n for row in LENGTHS for n in row)  # 3200 - 1618 per head
    assert sizes["unpatched"] - sizes["patched"] >= heads * layers * squares  # at least one (heads x len^2) copy
