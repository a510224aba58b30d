"""End to end: unchanged TRL / transformers / PEFT training code plus `patchkit.patch` trains exactly as without it.

Each case builds the same tiny random fp32 model twice and trains a few steps with the real libraries (nothing
mocked), unpatched and then patched. The patch is on while the trainer is built (TRL binds the model's forward
then) and while it trains. Compared: every logged step's loss and gradient norm (and, under SFTTrainer, the
`entropy` and `mean_token_accuracy` its fused LM head computes), every optimizer step's gradients, and the final
trainable parameters (LoRA weights, or all weights for a full fine-tune). A case's id lists the features it combines.

Cases train with SGD unless they say otherwise, so that the final weights are the sum of every step's gradients.
AdamW divides each gradient element by its own running magnitude: where an element's gradient is near AdamW's eps
(1e-8), a 1e-7 relative rounding difference in it moves that weight by a good part of the learning rate (measured:
6.5e-4 relative on a LoRA B after 4 steps, where SGD keeps every tensor within 2e-6). A case on AdamW compares the
logged series and the first step's gradients (same weights in both runs), not later gradients or the final weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import torch

import patchkit
from patchkit import toy
from patchkit.architectures import Gemma, Llama, Qwen2_5_VL, Qwen3, Qwen3Moe
from patchkit.parity import text_vocab, tiny_model

for _package in ("trl", "peft", "datasets"):
    pytest.importorskip(_package)

from transformers import TrainerCallback  # noqa: E402
from transformers.modeling_layers import GradientCheckpointingLayer  # noqa: E402

RTOL = 1e-4  # max|patched - unpatched| / max|unpatched| per logged series and per tensor, as in patchkit.parity
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Case:
    id: str
    trainer: str = "sft"  # "sft": trl.SFTTrainer; "hf": transformers.Trainer with a causal-LM collator
    arch: type = Llama
    data: str = "documents"  # pre-tokenized documents | "chat" messages | "prompt_completion"
    lora: str | None = None  # None: full fine-tune; "peft_config": given to SFTTrainer; "wrapped": get_peft_model
    steps: int = 4
    optim: str = "sgd"  # or SFTConfig's default, "adamw_torch_fused" (see the module docstring)
    args: dict[str, Any] = field(default_factory=dict)  # on top of ARGS, into SFTConfig / TrainingArguments
    check: Callable[[Any], bool] = lambda trainer: True  # the feature under test is really on in this trainer
    # PEFT turns `gate_proj`/`up_proj`/`down_proj` targets of an MoE model into LoRA on its experts' 3-D weights
    # (`target_parameters`), so the dense MLPs there carry no adapters
    dense_lora: bool = True


def _several_docs_per_row(trainer):  # bfd packing: padding-free rows holding several documents
    return trainer.padding_free and any(len(s) > 1 for s in trainer.train_dataset["seq_lengths"])


def _labels_masked(trainer):  # every example has tokens left out of the loss
    return all(-100 in labels for labels in trainer.train_dataset["labels"])


PACKED = dict(packing=True, max_length=64, per_device_train_batch_size=2)  # packing_strategy="bfd", the default
GRAD_ACCUM = dict(gradient_accumulation_steps=2)  # Trainer passes num_items_in_batch to the loss
CASES = [
    Case("sft-packing-lora_config-grad_accum", lora="peft_config", args=PACKED | GRAD_ACCUM,
         check=_several_docs_per_row),
    Case("sft-padding_free-full-adamw", optim="adamw_torch_fused", args=dict(padding_free=True, max_length=None),
         check=lambda t: t.padding_free and not t.args.packing),
    Case("sft-padded-grad_ckpt-full", args=dict(gradient_checkpointing=True), check=lambda t: not t.padding_free),
    Case("sft-assistant_only-chat-full", data="chat", args=dict(assistant_only_loss=True),
         check=lambda t: t.args.assistant_only_loss and _labels_masked(t)),
    Case("sft-completion_only-grad_ckpt-lora_wrapped", data="prompt_completion", lora="wrapped",
         args=dict(completion_only_loss=True, gradient_checkpointing=True),
         check=lambda t: t.completion_only_loss and _labels_masked(t)),
    Case("sft-qwen3-packing-lora_config", arch=Qwen3, lora="peft_config", args=PACKED, check=_several_docs_per_row),
    Case("sft-qwen3_moe-packing-lora_config", arch=Qwen3Moe, lora="peft_config", args=PACKED, dense_lora=False,
         check=lambda t: _several_docs_per_row(t) and t.aux_loss_enabled),
    # a vision-language model's language model, on text (its image tokens stay out of the toy vocabulary)
    Case("sft-qwen2_5_vl-packing-lora_config", arch=Qwen2_5_VL, lora="peft_config", args=PACKED,
         check=_several_docs_per_row),
    Case("sft-gemma-packing-lora_config-grad_accum", arch=Gemma, lora="peft_config", args=PACKED | GRAD_ACCUM,
         check=_several_docs_per_row),
    Case("hf_trainer-padded-grad_accum-full", trainer="hf", args=GRAD_ACCUM),
    Case("hf_trainer-padded-grad_accum-lora_wrapped", trainer="hf", lora="wrapped", args=GRAD_ACCUM),
]
# Trainer clips the gradient norm to 1, so an SGD step moves the weights by at most 1: the chat cases learn visibly
LEARNING_RATE = {"sgd": 1.0, "adamw_torch_fused": 1e-3}
ARGS = dict(per_device_train_batch_size=4, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
            seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
            bf16=False, gradient_checkpointing=False)  # SFTConfig turns bf16 and checkpointing on by default


def _dataset(case, vocab):
    if case.data == "documents":  # varied lengths: several packed to a row, or padded
        return toy.documents(48, vocab, 40, min_len=6), toy.word_tokenizer(vocab)
    return toy.arithmetic(48, prompt_completion=case.data == "prompt_completion"), toy.chat_tokenizer()


def _lora(model=None):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    return config if model is None else get_peft_model(model, config)


@contextlib.contextmanager
def _counting_kernel_calls(calls: dict[str, int]):
    """Count calls of patchkit's ops, which the patched code looks up at each call: the dispatching functions on
    `patchkit.kernels`, and the log-probs kernel that answers TRL's `fused_lm_head=True` call."""
    import patchkit.kernels as K
    import patchkit.kernels.log_probs as log_probs

    def counted(*args, _op, _fn, **kwargs):
        calls[_op] = calls.get(_op, 0) + 1
        return _fn(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        for module, op in [(K, op) for op in K.OPS] + [(log_probs, "linear_log_probs")]:
            mp.setattr(module, op, partial(counted, _op=op, _fn=getattr(module, op)))
        yield


class Recorder(TrainerCallback):
    """Counts the decoder layers' checkpoint calls and keeps every optimizer step's gradients.

    `train()` enables checkpointing before `on_train_begin`; `on_pre_optimizer_step` sees the accumulated,
    clipped gradients.
    """

    def __init__(self):
        self.checkpoint_calls, self.grads = 0, []

    def _checkpoint(self, *args, _inner, **kwargs):
        self.checkpoint_calls += 1
        return _inner(*args, **kwargs)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for layer in model.modules():
            if isinstance(layer, GradientCheckpointingLayer) and layer.gradient_checkpointing:
                inner = layer._gradient_checkpointing_func
                layer._gradient_checkpointing_func = partial(self._checkpoint, _inner=inner)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()
                           if p.requires_grad and p.grad is not None})  # a vision tower on text: none


def _train(case: Case, output_dir: str, patched: bool) -> dict[str, Any]:
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments
    from trl import SFTConfig, SFTTrainer

    model = tiny_model(case.arch)
    dataset, tokenizer = _dataset(case, text_vocab(model.config))
    torch.manual_seed(0)  # LoRA's A matrices come from the global generator
    if case.lora == "wrapped":
        model = _lora(model)
    args = {**ARGS, "max_steps": case.steps, "optim": case.optim, "learning_rate": LEARNING_RATE[case.optim],
            "output_dir": output_dir, **case.args}
    recorder, kernel_calls = Recorder(), {}
    with (patchkit.patched(case.arch.name) if patched else contextlib.nullcontext()), \
            _counting_kernel_calls(kernel_calls):
        if case.trainer == "sft":
            trainer = SFTTrainer(model=model, args=SFTConfig(**args), train_dataset=dataset, processing_class=tokenizer,
                                 peft_config=_lora() if case.lora == "peft_config" else None, callbacks=[recorder])
        else:
            trainer = Trainer(model=model, args=TrainingArguments(**args), train_dataset=dataset,
                              data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                              processing_class=tokenizer, callbacks=[recorder])
        assert case.check(trainer), f"{case.id}: the feature under test is off"
        trainer.train()
    return dict(logs=[h for h in trainer.state.log_history if "loss" in h], grads=recorder.grads,
                params={n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad},
                checkpoint_calls=recorder.checkpoint_calls, kernel_calls=kernel_calls,
                layers=trainer.model.config.get_text_config().num_hidden_layers)


def _rel(have, want) -> float:
    have, want = torch.as_tensor(have, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    return ((have - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()  # NaN stays NaN


def _compare(what: str, have: dict, want: dict, tol: float, show: bool = False) -> float:
    """The largest relative deviation over the entries of `want`; fails, naming the entry, above `tol`."""
    assert have.keys() == want.keys(), what
    errors = {name: _rel(have[name], want[name]) for name in want}
    for name, err in errors.items():
        assert err <= tol, (f"{what} {name}: relative deviation {err:.2e} > {tol:.0e}"
                            + (f"\n  patched   {have[name]}\n  unpatched {want[name]}" if show else ""))
    return max(errors.values())


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_patched_training_matches_unpatched(case, tmp_path):
    ref = _train(case, str(tmp_path / "unpatched"), patched=False)
    got = _train(case, str(tmp_path / "patched"), patched=True)

    # each run did what the case says, and only the patched one ran patchkit: its norm, its LoRA, and its loss head
    # (TRL's fused head under SFTTrainer is answered by patchkit's log-probs; transformers.Trainer goes through
    # patchkit's fused cross-entropy)
    micro_steps = case.steps * case.args.get("gradient_accumulation_steps", 1)
    calls = got["kernel_calls"]
    assert len(ref["logs"]) == len(got["logs"]) == len(got["grads"]) == case.steps
    assert not ref["kernel_calls"] and calls.get("rms_norm", 0) > 0, calls
    head = "linear_log_probs" if case.trainer == "sft" else "fused_linear_cross_entropy"
    assert calls.get(head) == micro_steps, calls
    if case.lora and case.dense_lora:
        assert calls.get("lora_linear", 0) > 0 and calls.get("lora_mlp", 0) > 0, calls
        vision = ("vision_tower", "visual")  # a vision-language model's tower has projections of those names too
        text = [n for n in got["params"] if not any(v in n for v in vision)]
        assert len(text) == 2 * len(LORA_TARGETS) * got["layers"]
    elif case.lora:
        assert calls.get("lora_linear", 0) > 0 and any(".experts." in n for n in got["params"]), calls
        assert all(".lora_A." in n or ".lora_B." in n for n in got["params"])
    checkpointed = micro_steps * got["layers"] if case.args.get("gradient_checkpointing") else 0
    assert (ref["checkpoint_calls"], got["checkpoint_calls"]) == (checkpointed, checkpointed), \
        "checkpointed layer calls (unpatched, patched): the patch must leave gradient checkpointing on"

    logged = ("loss", "grad_norm") + (("entropy", "mean_token_accuracy") if case.trainer == "sft" else ())
    assert [h.get("num_tokens") for h in got["logs"]] == [h.get("num_tokens") for h in ref["logs"]]
    deviation = {"logged": _compare(f"{case.id}: logged", {k: [h[k] for h in got["logs"]] for k in logged},
                                    {k: [h[k] for h in ref["logs"]] for k in logged}, RTOL, show=True)}
    steps = len(ref["grads"]) if case.optim == "sgd" else 1  # see the module docstring
    deviation["grads"] = max(_compare(f"{case.id}: step {step} gradient of", have, want, RTOL)
                             for step, (have, want) in enumerate(zip(got["grads"][:steps], ref["grads"][:steps]), 1))
    if case.optim == "sgd":
        deviation["params"] = _compare(f"{case.id}: final", got["params"], ref["params"], RTOL)
    print(f"{case.id}: max relative deviation " + ", ".join(f"{k} {v:.1e}" for k, v in deviation.items()))
