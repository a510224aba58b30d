"""Whole-model parity of every built-in architecture against unpatched transformers."""

import pytest
import torch

import patchkit
from patchkit.architectures import Gemma2, Gemma3Text, Llama, Mistral
from patchkit.parity import compare, tiny_batch, tiny_model, text_vocab
from patchkit.plugins import BUILTINS, manager

from .families import experts_class


def _builtin():
    return [a for a in manager().architectures.values() if a.__module__.startswith(BUILTINS[0])]


ARCHS = pytest.mark.parametrize("arch", _builtin(), ids=lambda a: a.name)


def _check(result):
    assert result.ok, result.table()


def test_every_family_is_covered():
    assert {a.name for a in _builtin()} == {"llama", "mistral", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3",
                                            "phi3", "granite", "olmo2", "olmo3", "smollm3", "glm4", "cohere2",
                                            "exaone4", "ministral", "qwen3_moe", "mixtral", "olmoe", "granitemoe",
                                            "gpt_oss", "llava", "mistral3", "qwen2_5_vl", "qwen3_vl"}


@ARCHS
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("kv_heads", [1, 2, 4], ids=["MQA", "GQA", "MHA"])
def test_parity_fp32(arch, attn, tied, kv_heads):
    model = tiny_model(arch, attn_implementation=attn, tie_word_embeddings=tied, num_key_value_heads=kv_heads)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    _check(compare(arch(), model, tiny_batch(text_vocab(model.config))))


def test_llama_parity_uses_llama3_rope_scaling():
    assert tiny_model(Llama).config.rope_parameters["rope_type"] == "llama3"


@ARCHS
def test_parity_bf16(arch):
    model = tiny_model(arch)
    _check(compare(arch(), model, tiny_batch(text_vocab(model.config)), torch.bfloat16))


@ARCHS
def test_parity_odd_sizes(arch):
    # a partial rotary factor keeps the rotary width even (transformers' LongRoPE cannot take an odd one)
    partial = {"partial_rotary_factor": 0.8} if "partial_rotary_factor" in arch.tiny_config else {}
    rope = arch.tiny_config.get("rope_parameters", {})
    if "mrope_section" in rope:  # Qwen-VL: the sections cover half the head
        partial["rope_parameters"] = {**rope, "mrope_section": [1, 2, 2]}
    model = tiny_model(arch, hidden_size=60, intermediate_size=97, head_dim=10, num_attention_heads=6,
                       num_key_value_heads=3, vocab_size=333, **partial)
    if experts_class(model):  # transformers' grouped_mm wants rows of
        model.set_experts_implementation("batched_mm")  # 16-byte multiples (unpatched too); batched_mm calls our gate
    _check(compare(arch(), model, tiny_batch(333, batch=2, seq=23)))


@ARCHS
@pytest.mark.parametrize("op", ["rms_norm", "rope", "mlp", "cross_entropy", "attention"])
def test_each_op_alone(arch, op):
    model = tiny_model(arch)
    others = {o: o == op for o in arch.ops()}
    _check(compare(arch("auto", others), model, tiny_batch(text_vocab(model.config))))


@pytest.mark.parametrize("arch", [Mistral, Gemma2, Gemma3Text], ids=lambda a: a.name)
def test_sliding_window_is_exercised(arch):
    """The parity batches are longer than the window, and the window changes the numbers."""
    model = tiny_model(arch).eval()
    batch = tiny_batch(text_vocab(model.config))
    assert model.config.sliding_window < batch["input_ids"].shape[1]
    wide = tiny_model(arch, sliding_window=4096).eval()
    inputs = {"input_ids": batch["input_ids"]}
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits, wide(**inputs).logits, atol=1e-4)


@pytest.mark.parametrize("arch", [Gemma2, Gemma3Text], ids=lambda a: a.name)
def test_final_logit_softcapping_is_exercised(arch):
    """The cap bends the tiny model's logits, so parity of the loss covers the fused soft-capping."""
    model = tiny_model(arch)
    batch = tiny_batch(text_vocab(model.config))
    uncapped = tiny_model(arch, final_logit_softcapping=None)
    model.train(), uncapped.train()
    with patchkit.patched(arch.name):
        capped_loss, plain_loss = model(**batch).loss, uncapped(**batch).loss
    assert abs(capped_loss.item() - plain_loss.item()) > 1e-3
    _check(compare(arch(), model, batch))


@pytest.fixture(params=_builtin(), ids=lambda a: a.name)
def arch(request):
    return request.param


@pytest.fixture
def model_and_batch(arch):
    model = tiny_model(arch)
    return model, tiny_batch(text_vocab(model.config))


def _twice(model, fn):
    """fn(model) unpatched, then patched."""
    name = model.config.model_type
    patchkit.unpatch(name)
    expected = fn(model)
    with patchkit.patched(name):
        got = fn(model)
    return expected, got


def test_training_loss_does_not_build_logits(model_and_batch):
    model, batch = model_and_batch
    model.train()
    with patchkit.patched(model):
        out = model(**batch)
        assert out.logits is None and out.loss is not None
        kept = model(**batch, skip_logits=False)
        assert kept.logits is not None
        torch.testing.assert_close(kept.loss, out.loss, rtol=1e-5, atol=1e-6)
    model.eval()
    with patchkit.patched(model):
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
def test_generation_with_cache_unchanged(arch, batch_size):
    model = tiny_model(arch).eval()
    batch = tiny_batch(text_vocab(model.config), batch=batch_size, seq=9)
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
    with patchkit.patched(model):
        got_ours = run(model)  # our forward answers the call itself
        got_trl = run(trl_model)  # TRL's head over our backbone
    for a, b, c in zip(expected, got_ours, got_trl):
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(c.float(), a.float(), rtol=1e-4, atol=1e-5)


def test_instances_and_peft_wrapped_instances_are_recognised(arch):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(arch)
    names = [arch.name, *([arch.text_model_type] if arch.text_model_type else [])]  # a wrapper: its language model's
    assert patchkit.patch(model).architectures == names
    patchkit.unpatch()
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["o_proj"]))  # every family has an o_proj
    assert patchkit.patch(wrapped).architectures == names
    assert patchkit.is_patched(wrapped)


def test_patch_with_no_target_covers_every_family():
    handle = patchkit.patch()
    assert set(handle.architectures) == set(patchkit.architectures()) >= {a.name for a in _builtin()}
    assert all(patchkit.is_patched(a.name) for a in _builtin())
