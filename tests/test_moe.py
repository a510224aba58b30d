"""Mixture-of-experts families: the experts' gate fused through transformers' experts seam, the router's auxiliary
loss and logits kept, decode through the sparse block."""

import contextlib
import inspect

import pytest
import torch

import patchkit
from patchkit.generation import generate
from patchkit.parity import tiny_batch, tiny_model, text_vocab
from patchkit.plugins import manager

from .families import BUILTIN, experts_class, train_step

MOE = [a.name for a in BUILTIN if "experts" in a.ops()]
IMPLEMENTATIONS = ["grouped_mm", "batched_mm", "eager"]


@contextlib.contextmanager
def _patched_counting_gates(name, model):
    """`patchkit.patched(name)`, recording each call of the experts' patched gate."""
    experts, gates = experts_class(model), []
    with patchkit.patched(name):
        patched_gate = experts._apply_gate
        assert getattr(patched_gate, "__patchkit__", None) == (name, "experts")
        experts._apply_gate = lambda self, x: gates.append(1) or patched_gate(self, x)
        try:
            yield gates
        finally:
            experts._apply_gate = patched_gate


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", MOE)
def test_loss_aux_loss_router_logits_and_gradients_match(name, implementation):
    model = tiny_model(manager().architectures[name]).train()
    model.set_experts_implementation(implementation)
    batch = tiny_batch(text_vocab(model.config))
    batch["labels"][0, :4] = -100
    ref, ref_grads = train_step(model, batch, output_router_logits=True)
    with _patched_counting_gates(name, model) as gates:
        out, grads = train_step(model, batch, output_router_logits=True)
    assert type(out) is type(ref) and out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    assert ref.aux_loss is not None
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=1e-6, atol=1e-7)
    # the first layer's router sees the same input; later ones a rounding apart where the fused gate computes
    # another formula (GPT-OSS: swiglu(alpha * gate, up + 1) / alpha)
    assert len(out.router_logits) == len(ref.router_logits) and torch.equal(out.router_logits[0], ref.router_logits[0])
    for got, want in zip(out.router_logits, ref.router_logits):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for n, g in ref_grads.items():  # the router's weight among them
        assert (grads[n] - g).abs().max() <= 1e-5 * g.abs().max(), n
    # grouped_mm and batched_mm call the patched gate once per sparse layer; eager computes it inline, except
    # GPT-OSS's, which calls it once per expert a token was routed to
    experts = experts_class(model)
    sparse = sum(type(m) is experts for m in model.modules())
    if implementation != "eager":
        assert len(gates) == sparse
    elif "_apply_gate" in inspect.getsource(experts.forward):  # GPT-OSS's loop
        assert gates
    else:
        assert not gates


@pytest.mark.parametrize("name", MOE)
@pytest.mark.parametrize("config,argument", [(False, None), (True, None), (False, True), (True, False)])
def test_output_router_logits_from_the_config_or_the_call(name, config, argument):
    model = tiny_model(manager().architectures[name], output_router_logits=config).train()
    batch = tiny_batch(text_vocab(model.config))
    kwargs = {} if argument is None else {"output_router_logits": argument}
    ref = model(**batch, **kwargs)
    with patchkit.patched(name):
        out = model(**batch, **kwargs)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    wanted = config if argument is None else argument
    assert (out.aux_loss is None) == (ref.aux_loss is None) == (not wanted)


def test_auxiliary_loss_coefficient_counts():
    """The tiny config's coefficient is far from the default: a dropped aux term would show in the loss."""
    arch = manager().architectures["qwen3_moe"]
    batch = tiny_batch(211)
    losses = []
    for coef in (0.0, 0.37):
        model = tiny_model(arch, router_aux_loss_coef=coef).train()
        with patchkit.patched("qwen3_moe"):
            losses.append(model(**batch, output_router_logits=True).loss)
    assert (losses[1] - losses[0]).abs() > 1e-3


@pytest.mark.parametrize("name", MOE)
def test_decode_through_the_sparse_block_gives_transformers_tokens(name):
    model = tiny_model(manager().architectures[name]).eval()
    ids = tiny_batch(text_vocab(model.config), batch=2, seq=7)["input_ids"]
    expected = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with patchkit.patched(name):
        got = generate(model, ids, 6, min_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", ["qwen3_moe", "granitemoe"])
def test_peft_lora_on_experts_and_projections(name):
    """PEFT's LoRA on the experts' 3-D weights (`target_parameters`) and on attention projections: the patched
    gate still serves the wrapped experts, and every adapter gradient is the unpatched one."""
    from peft import LoraConfig, get_peft_model

    model = tiny_model(manager().architectures[name]).train()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                        target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    model = get_peft_model(model, config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    batch = tiny_batch(text_vocab(model.config))
    ref, ref_grads = train_step(model, batch, output_router_logits=True)
    with _patched_counting_gates(name, model) as gates:
        out, grads = train_step(model, batch, output_router_logits=True)
    assert gates and any("experts" in n for n in ref_grads)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    for n, g in ref_grads.items():
        assert (grads[n] - g).abs().max() <= 1e-5 * g.abs().max(), n


def test_bench_train_times_the_sparse_blocks_share(monkeypatch):
    """`patchkit bench train --arch qwen3_moe` also times one sparse block: the blocks' share of the step."""
    from patchkit.bench import train

    # the MFU's yardstick and the memory marks (a full garbage collection each) are not what is tested
    monkeypatch.setattr(train, "matmul_flops", lambda: 1e11)
    monkeypatch.setattr(train, "reset_peak", lambda: 0)
    dims = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, vocab_size=128, max_position_embeddings=64)
    summary = train.train("qwen3_moe", batch=1, seq=16, dims=dims, rounds=1, steps=1)
    assert summary["sparse_blocks"] == 2
    assert all(summary[v]["block_s"] > 0 and summary[v]["fwd_bwd_s"] > 0 for v in train.VARIANTS)
    assert "one sparse block (router and experts)" in train.report(summary)
