"""The seams a family overrides, and the verifier catching the plugin mistakes an outsider made with them."""

from typing import ClassVar

import pytest
import torch

import patchkit
from patchkit import kernels as K
from patchkit.architecture import camel_case
from patchkit.architectures import Granite, Llama, Phi3, Qwen2, Qwen3
from patchkit.parity import tiny_batch, tiny_model, verify_one, text_vocab


def _failed(result, prefix):
    return [r.tensor for r in result.rows if not r.ok and r.tensor.startswith(prefix)]


def test_default_prefix_is_transformers_camel_case():
    assert camel_case("qwen3_moe") == "Qwen3Moe" and camel_case("smollm3") == "SmolLM3"
    assert camel_case("not_a_model_type") == "NotAModelType"

    class Qwen3Moe(Qwen3):
        name = "qwen3_moe"

    assert Qwen3Moe.prefix == "Qwen3Moe" and Qwen3Moe.model_class().__name__ == "Qwen3MoeForCausalLM"


def test_tiny_config_merges_into_the_parents():
    class Child(Granite):
        name = "granite"
        tiny_config: ClassVar[dict] = {"logits_scaling": 3.0}

    assert Child.tiny_config["logits_scaling"] == 3.0
    assert Child.tiny_config["embedding_multiplier"] == Granite.tiny_config["embedding_multiplier"]
    assert Child.tiny_config["rope_parameters"] == Llama.tiny_config["rope_parameters"]


def test_tiny_configs_move_the_numbers_each_family_reads():
    granite = tiny_model(Granite).config
    assert all(getattr(granite, k) != 1.0 for k in ("embedding_multiplier", "residual_multiplier",
                                                      "attention_multiplier", "logits_scaling"))
    assert tiny_model(Phi3).config.rope_parameters["partial_rotary_factor"] == 0.75


class GraniteWithoutEmbedding(Granite):  # forgot the embedding multiplier: only the decode step embeds itself
    name = "granite"
    embed = Llama.embed


class GraniteWithoutLogitScale(Granite):  # forgot the logit scaling: loss, TRL head and decode are all off
    name = "granite"
    logit_scale = Llama.logit_scale


class GraniteWithoutResidual(Granite):
    name = "granite"
    residual = Llama.residual


@pytest.mark.parametrize("plugin,fails", [(GraniteWithoutEmbedding, ("decode",)),
                                          (GraniteWithoutResidual, ("decode",)),
                                          (GraniteWithoutLogitScale, ("loss", "trl", "decode"))],
                         ids=["embedding", "residual", "logit_scale"])
def test_a_missing_multiplier_fails_verify(plugin, fails):
    result = verify_one(plugin)
    assert not result.ok
    for prefix in fails:
        assert _failed(result, prefix), (prefix, result.table())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_wrong_norm_cast_fails_verify_in_every_dtype(dtype):
    class Qwen2GemmaCast(Qwen2):  # Qwen2RMSNorm casts as Llama does
        name = "qwen2"
        norm_cast = "gemma"

    result = verify_one(Qwen2GemmaCast, dtype=dtype)
    assert not result.ok and _failed(result, "module Qwen2RMSNorm.forward"), result.table()
    assert verify_one(Qwen2, dtype=dtype).ok


def test_an_mlp_that_runs_unfused_fails_verify():
    class Phi3WrongActivation(Phi3):  # looked for `act_fn`: Phi-3's activation is `activation_fn`
        name = "phi3"

        def mlp_parts(self, module):
            return module.gate_up_proj, module.down_proj, module._modules.get("act_fn")

    result = verify_one(Phi3WrongActivation)
    assert not result.ok and any("mlp ran the original" in p for p in result.problems), result.table()
    assert "fallback" in result.kernels["mlp"]
    good = verify_one(Phi3)
    assert good.ok and good.kernels["mlp"].startswith("swiglu"), good.table()


def test_a_declared_fallback_passes_and_is_reported():
    class LlamaQuickGelu(Llama):
        name = "llama"
        tiny_config: ClassVar[dict] = {"hidden_act": "quick_gelu"}  # no gated kernel for it
        fallbacks: ClassVar[dict] = {"mlp": "quick GELU has no gated kernel"}

    result = verify_one(LlamaQuickGelu)
    assert result.ok, result.table()
    assert "fallback" in result.kernels["mlp"] and "QuickGELUActivation" in result.kernels["mlp"]


def test_the_verifier_runs_trls_fused_head():
    result = verify_one(Granite)
    assert {"trl log_probs", "trl entropy"} <= {r.tensor for r in result.rows}


def test_activation_lookup_is_public_and_extensible():
    from transformers.activations import ACT2FN, QuickGELUActivation

    assert K.activation_kernel(ACT2FN["silu"]) == "swiglu" and K.activation_kernel(ACT2FN["gelu_pytorch_tanh"]) \
        == "geglu"
    assert K.activation_kernel(ACT2FN["quick_gelu"]) is None
    try:
        K.register_activation(QuickGELUActivation, "geglu")
        assert K.activation_kernel(ACT2FN["quick_gelu"]) == "geglu"
    finally:
        K.ACTIVATIONS.pop(QuickGELUActivation)
    with pytest.raises(ValueError, match="swiglu"):
        K.register_activation(QuickGELUActivation, "relu")


class Qwen3Moe(Qwen3):
    """A plugin for the MoE family through the output seams only (its sparse block is transformers')."""

    name = "qwen3_moe"
    overrides = True  # over the built-in family, for this test
    mlp = None
    tiny_config: ClassVar[dict] = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                                   "output_router_logits": True, "router_aux_loss_coef": 0.3}

    def extra_loss(self, lm, outputs, inputs):
        aux = self.load_module().load_balancing_loss_func(outputs.router_logits, lm.num_experts,
                                                          lm.num_experts_per_tok, inputs.get("attention_mask"))
        return lm.router_aux_loss_coef * aux, {"aux_loss": aux}


class _Plugin:
    @patchkit.hookimpl
    def patchkit_architectures(self):
        return [Qwen3Moe]


def test_the_output_class_and_extra_loss_terms_are_kept(register_plugin):
    register_plugin(_Plugin(), name="qwen3-moe-outputs")
    model = tiny_model(Qwen3Moe).train()
    batch = tiny_batch(text_vocab(model.config))
    ref = model(**batch)
    ref.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with patchkit.patched("qwen3_moe"):
        out = model(**batch)
        out.loss.backward()
    assert type(out) is type(ref) and type(out).__name__ == "MoeCausalLMOutputWithPast" and out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss)
    assert len(out.router_logits) == len(ref.router_logits)
    for got, want in zip(out.router_logits, ref.router_logits):
        torch.testing.assert_close(got, want)
    for name, g in grads.items():
        assert (model.get_parameter(name).grad - g).abs().max() <= 1e-4 * g.abs().max(), name


@pytest.mark.parametrize("wrapper,text,families", [("Mistral3Config", "ministral", ["mistral3", "ministral"]),
                                                   ("LlavaConfig", "qwen2", ["llava", "qwen2"]),
                                                   ("LlavaConfig", "olmo2", ["llava", "olmo2"]),
                                                   ("Gemma3Config", "gemma3_text", ["gemma3_text"]),
                                                   ("Qwen3VLConfig", "qwen3_vl_text", ["qwen3_vl"])])
def test_multimodal_wrappers_resolve_to_themselves_and_their_text_family(wrapper, text, families):
    import transformers

    config = getattr(transformers, wrapper)(text_config={"model_type": text})
    assert [a.name for a in patchkit._resolve(config)] == families


def test_a_wrapper_patched_by_name_brings_its_usual_language_model():
    assert [a.name for a in patchkit._resolve("llava")] == ["llava", "llama"]
    assert [a.name for a in patchkit._resolve("mistral3")] == ["mistral3", "mistral"]
    assert [a.name for a in patchkit._resolve("gemma3")] == ["gemma3_text"]


def test_trls_head_is_answered_only_where_the_family_applies_the_logit_scale():
    from patchkit.integrations import fused_head_unserved

    assert fused_head_unserved(tiny_model(Granite)) is None
    scaled_llama = tiny_model(Llama, logits_scaling=2.0)  # a multiplier Llama's forward does not apply: TRL's own
    assert "logits_scaling" in fused_head_unserved(scaled_llama)
    assert fused_head_unserved(tiny_model(Llama)) is None
