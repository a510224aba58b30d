"""Whole-model parity of the Llama plugin against unpatched transformers."""

import pytest
import torch

import patchkit
from patchkit.architectures import Llama
from patchkit.parity import compare, tiny_batch, tiny_model


def _check(result):
    assert result.ok, result.table()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("kv_heads", [1, 2, 4], ids=["MQA", "GQA", "MHA"])
def test_parity_fp32(attn, tied, kv_heads):
    model = tiny_model(Llama, attn_implementation=attn, tie_word_embeddings=tied, num_key_value_heads=kv_heads)
    assert model.config.rope_parameters["rope_type"] == "llama3"
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    _check(compare(Llama(), model, tiny_batch(model.config.vocab_size)))


def test_parity_bf16():
    model = tiny_model(Llama)
    _check(compare(Llama(), model, tiny_batch(model.config.vocab_size), torch.bfloat16))


def test_parity_odd_sizes_and_default_rope():
    model = tiny_model(Llama, hidden_size=60, intermediate_size=97, head_dim=10, num_attention_heads=6,
                       num_key_value_heads=3, vocab_size=333, rope_parameters={"rope_type": "default",
                                                                               "rope_theta": 500.0})
    _check(compare(Llama(), model, tiny_batch(333, batch=2, seq=23)))


@pytest.mark.parametrize("op", ["rms_norm", "rope", "mlp", "cross_entropy"])
def test_each_op_alone(op):
    model = tiny_model(Llama)
    others = {o: o == op for o in Llama.ops()}
    _check(compare(Llama("auto", others), model, tiny_batch(model.config.vocab_size)))


@pytest.fixture
def model_and_batch():
    model = tiny_model(Llama)
    return model, tiny_batch(model.config.vocab_size)


def _twice(model, fn):
    """fn(model) unpatched, then patched."""
    patchkit.unpatch("llama")
    expected = fn(model)
    with patchkit.patched("llama"):
        got = fn(model)
    return expected, got


def test_training_loss_does_not_build_logits(model_and_batch):
    model, batch = model_and_batch
    model.train()
    with patchkit.patched("llama"):
        out = model(**batch)
        assert out.logits is None and out.loss is not None
        kept = model(**batch, skip_logits=False)
        assert kept.logits is not None
        torch.testing.assert_close(kept.loss, out.loss, rtol=1e-5, atol=1e-6)
    model.eval()
    with patchkit.patched("llama"):
        assert model(**batch).logits is not None  # eval: unchanged behaviour


def test_logits_to_keep(model_and_batch):
    model, batch = model_and_batch
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    expected, got = _twice(model, lambda m: m(**inputs, logits_to_keep=1).logits)
    assert got.shape[1] == 1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_num_items_in_batch_shift_labels_and_tuples(model_and_batch):
    model, batch = model_and_batch
    model.train()
    shift = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:].contiguous()
    for kwargs in ({"num_items_in_batch": torch.tensor(11)}, {"shift_labels": shift},
                   {"return_dict": False}):
        expected, got = _twice(model, lambda m: m(**batch, **kwargs))
        loss = got[0] if isinstance(got, tuple) else got.loss
        ref = expected[0] if isinstance(expected, tuple) else expected.loss
        assert isinstance(got, tuple) == ("return_dict" in kwargs)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_generation_with_cache_unchanged(batch_size):
    model = tiny_model(Llama).eval()
    batch = tiny_batch(model.config.vocab_size, batch=batch_size, seq=9)
    if batch_size == 1:
        batch["attention_mask"][:] = 1
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    generate = lambda m: m.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=0)  # noqa: E731
    expected, got = _twice(model, generate)
    assert torch.equal(got, expected)


def test_trl_fused_lm_head_call(model_and_batch):
    """TRL's SFTTrainer calls model(..., fused_lm_head=True); patched, with or without TRL's head, it agrees."""
    from trl.trainer.utils import add_fused_lm_head

    model, batch = model_and_batch
    model.train()
    fields = ("log_probs", "entropy", "is_top1", "label_mask")

    def run(m):
        m.zero_grad()
        out = m(**batch, fused_lm_head=True)
        out.loss.backward()
        return [out.loss.detach()] + [getattr(out, f).detach() for f in fields] + [m.lm_head.weight.grad.clone()]

    import copy

    trl_model = copy.deepcopy(model)
    add_fused_lm_head(trl_model, outputs=("log_probs", "entropy", "is_top1"))
    expected = run(trl_model)  # TRL's own chunked head over the unpatched backbone
    with patchkit.patched("llama"):
        got_ours = run(model)  # our forward answers the call itself
        got_trl = run(trl_model)  # TRL's head over our backbone
    for a, b, c in zip(expected, got_ours, got_trl):
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(c.float(), a.float(), rtol=1e-4, atol=1e-5)
