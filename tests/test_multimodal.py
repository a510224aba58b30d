"""Vision-language models: the language model's ops fused, the conditional-generation loss without logits with
and without images (every gradient, the vision tower's too, as unpatched), TRL's fused head, LoRA, and generation
that prefills with the images through the model's forward and decodes in patchkit's loop."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

import patchkit
from patchkit import kernels as K
from patchkit.parity import compare, tiny_batch, tiny_model, text_vocab
from patchkit.plugins import manager
from patchkit.vision import with_images

from .families import train_step

# (family, head): Gemma 3's vision-language model is gemma3_text's second head
CASES = [("gemma3_text", 1), ("llava", 0), ("mistral3", 0), ("qwen2_5_vl", 0), ("qwen3_vl", 0)]
IDS = ["gemma3", "llava", "mistral3", "qwen2_5_vl", "qwen3_vl"]
VISION = ("vision_tower", "visual")  # the vision tower's module name in each wrapper


def _model(case, **overrides):
    name, head = case
    return tiny_model(manager().architectures[name], head=head, **overrides)


def _images(model, **kw):
    return with_images(model.config, tiny_batch(text_vocab(model.config), **kw))


def _assert_grads(got, want):
    assert got.keys() == want.keys()
    for name, g in want.items():
        assert (got[name] - g).abs().max() <= 1e-4 * g.abs().max() + 1e-7, name


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_training_with_images_matches_unpatched_without_logits(case):
    model = _model(case).train()
    batch = _images(model)
    ref, ref_grads = train_step(model, batch)
    assert any(part in name for name in ref_grads for part in VISION)  # the vision tower learns from the loss
    with patchkit.patched(model), K.serving() as served:
        out, grads = train_step(model, batch)
    assert out.logits is None and served.kernels["fused_linear_cross_entropy"] == 1
    assert served.kernels["rms_norm"] and served.kernels["apply_rope"]  # the language model's ops ran fused
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    _assert_grads(grads, ref_grads)
    if hasattr(ref, "image_hidden_states"):  # the wrapper's own output fields are kept
        torch.testing.assert_close(out.image_hidden_states, ref.image_hidden_states)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_text_only_batches_match_in_every_path(case):
    """No pixel values: loss, gradients, logits, decode steps and TRL's head, as the verifier runs them."""
    model = _model(case)
    result = compare(manager().architectures[case[0]](), model, tiny_batch(text_vocab(model.config)))
    assert result.ok, result.table()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_trl_fused_head_with_images(case):
    model = _model(case).eval()
    batch = _images(model)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        mask = targets != -100
        want = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0].masked_fill(~mask, 0)
        with patchkit.patched(model):
            got = model(**batch, fused_lm_head=True)
    assert torch.equal(got.label_mask, mask)
    torch.testing.assert_close(got.log_probs, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lora_on_the_language_model_with_images(case):
    model = get_peft_model(_model(case), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                                                    lora_dropout=0.0, init_lora_weights=False))
    model.train()
    batch = _images(model.base_model.model)
    ref, ref_grads = train_step(model, batch)
    with patchkit.patched(model), K.serving() as served:
        out, grads = train_step(model, batch)
    adapted = sum(hasattr(m, "lora_A") for m in model.modules())  # the vision tower's projections of those names too
    assert served.kernels["lora_linear"] == adapted >= 3 * model.config.get_text_config().num_hidden_layers
    assert served.kernels["fused_linear_cross_entropy"] == 1
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    _assert_grads(grads, ref_grads)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_generation_prefills_the_images_then_runs_the_decode_loop(case, steps):
    model = _model(case).eval()
    inputs = _images(model, batch=2, seq=14)
    inputs.pop("labels")
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True,
                  output_logits=True)
    reference = model.generate(**inputs, **kwargs)
    with patchkit.patched(model):
        patchkit.for_inference(model)
        try:
            ours = model.generate(**inputs, **kwargs)
        finally:
            patchkit.for_training(model)
    assert len(steps) == 5  # the prefill, then five decode steps of patchkit's loop
    assert torch.equal(ours.sequences, reference.sequences)
    for got, want in zip(ours.logits, reference.logits, strict=True):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_gemma3_by_name_patches_the_vision_language_forward():
    import transformers.models.gemma3.modeling_gemma3 as G

    with patchkit.patched("gemma3") as handle:
        assert handle.architectures == ["gemma3_text"]
        assert G.Gemma3ForConditionalGeneration.forward.__patchkit__ == ("gemma3_text", "cross_entropy")
        assert G.Gemma3ForCausalLM.forward.__patchkit__ == ("gemma3_text", "cross_entropy")
    assert not hasattr(G.Gemma3ForConditionalGeneration.forward, "__patchkit__")


def test_a_wrapper_patches_its_language_models_family_and_unpatches_it():
    import transformers.models.llava.modeling_llava as L

    model = _model(("llava", 0), model_type="qwen2")  # LLaVA over a Qwen 2 language model
    assert type(model.model.language_model).__name__ == "Qwen2Model"
    with patchkit.patched(model) as handle:
        assert handle.architectures == ["llava", "qwen2"]
        assert L.LlavaForConditionalGeneration.forward.__patchkit__ == ("llava", "cross_entropy")
    assert not patchkit.is_patched("qwen2") and not patchkit.is_patched("llava")


def test_gemma3_wrapper_does_not_soft_cap_as_transformers_does_not():
    model = _model(("gemma3_text", 1), final_logit_softcapping=0.5).train()
    batch = _images(model)
    ref, ref_grads = train_step(model, batch)
    with patchkit.patched(model):
        out, grads = train_step(model, batch)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    _assert_grads(grads, ref_grads)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradient_checkpointing_with_images_recomputes_and_matches(case):
    model = _model(case).train()
    model.gradient_checkpointing_enable()
    batch = _images(model)
    layer = model.model.language_model.layers[0]
    calls, inner = [], layer._gradient_checkpointing_func
    layer._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or inner(*a, **k)
    ref, ref_grads = train_step(model, batch)
    with patchkit.patched(model):
        out, grads = train_step(model, batch)
    assert len(calls) == 2  # checkpointed unpatched and patched: the patch did not lose it
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    _assert_grads(grads, ref_grads)


@pytest.mark.parametrize("case", [pytest.param(c, id=i, marks=[] if i == "llava" else pytest.mark.slow)
                                  for c, i in zip(CASES, IDS)])  # dynamo's explain, twice: slow but for one
def test_compiles_with_no_more_graph_breaks_than_unpatched(case):
    """transformers' image merging syncs with the host (graph breaks unpatched); patchkit adds none."""
    model = _model(case).train()
    batch = _images(model)

    def breaks():
        torch._dynamo.reset()
        return torch._dynamo.explain(lambda **b: model(**b).loss)(**batch).graph_break_count

    unpatched = breaks()
    with patchkit.patched(model):
        assert breaks() <= unpatched


def test_compiled_training_with_images_matches_eager_unpatched():
    model = _model(("llava", 0)).train()
    batch = _images(model)
    ref, ref_grads = train_step(model, batch)
    torch._dynamo.reset()
    with patchkit.patched(model):
        out, grads = train_step(torch.compile(model, backend="aot_eager"), batch)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    grads = {n.removeprefix("_orig_mod."): g for n, g in grads.items()}
    unused = {n: grads.pop(n) for n in set(grads) - set(ref_grads)}  # LLaVA's last vision layer: zeros compiled
    assert all(not g.any() for g in unused.values())
    _assert_grads(grads, ref_grads)


class _Images(torch.utils.data.Dataset):
    """Rows of one image each, as a vision-language collator gives them (pixel values per row)."""

    def __init__(self, model, rows=8):
        batch = with_images(model.config, tiny_batch(text_vocab(model.config), batch=rows, seed=5))
        self.rows = [{k: v[i] for k, v in batch.items()} for i in range(rows)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _trainer_run(model, patched, tmp_path):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=0.5, optim="sgd", logging_steps=1,
                             report_to="none", save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Images(model))
    with patchkit.patched(model) if patched else torch.enable_grad(), K.serving() as served:
        trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], served


def test_trainer_with_images_and_gradient_accumulation_matches_unpatched(tmp_path):
    """transformers' Trainer over rows with images (Gemma 3, its pixel values stacked per row), two micro-batches
    per step: the losses it logs and the weights it ends with, patched as unpatched."""
    import copy

    model = _model(("gemma3_text", 1))
    twin = copy.deepcopy(model)
    want, _ = _trainer_run(model, False, tmp_path / "unpatched")
    got, served = _trainer_run(twin, True, tmp_path / "patched")
    assert served.kernels["fused_linear_cross_entropy"] == 6  # three steps of two micro-batches
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert (p - q).abs().max() <= 1e-4 * p.abs().max() + 1e-6, name
