"""TRL's preference and RL trainers end to end: DPO, KTO, GRPO and RLOO, patched and unpatched.

Each case trains a tiny random fp32 model (saved to disk and loaded by path, as a user names a Hub model, so that
the trainer builds its own reference model) a few steps with the real libraries, unpatched and then patched, with
the same seeds. Compared: every logged step's loss, gradient norm and metrics (rewards, log-probs, KL, margins,
entropy, completion lengths), and every optimizer step's gradients. Counted: patchkit's log-probs kernel served
every `fused_lm_head=True` call (TRL's own chunked kernel never ran), and GRPO's and RLOO's generation ran
patchkit's decode loop for every `generate` (transformers' `_sample` never ran). Generation samples with TRL's
settings (temperature, top-p, top-k, min-p, repetition penalty, EOS, several generations per prompt); the decode
loop draws in transformers' order, so with the same seed the completions are the same tokens.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import patchkit
from patchkit import toy

from .test_trl import LORA_TARGETS, Recorder, _compare, _counting_kernel_calls

for _package in ("trl", "peft", "datasets"):
    pytest.importorskip(_package)

RTOL = 1e-4
VOCAB = 64
SAMPLING = dict(temperature=0.7, top_p=0.9, top_k=20, min_p=0.02, repetition_penalty=1.1)


@dataclass
class Case:
    id: str
    trainer: str  # dpo | kto | grpo | rloo
    lora: bool = False  # PEFT LoRA: the reference model is the policy with its adapter off
    args: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case("dpo-full-grad_accum", "dpo", args=dict(gradient_accumulation_steps=2)),
    Case("dpo-lora-wpo", "dpo", lora=True, args=dict(use_weighting=True)),
    Case("kto-full", "kto"),
    Case("kto-lora-grad_accum", "kto", lora=True, args=dict(gradient_accumulation_steps=2)),
    Case("grpo-full-kl-sampling", "grpo", args=dict(beta=0.04, **SAMPLING)),
    Case("grpo-lora-grad_accum-entropy_mask", "grpo", lora=True,
         args=dict(gradient_accumulation_steps=2, top_entropy_quantile=0.5)),
    Case("grpo-full-fp32_head", "grpo", args=dict(cast_lm_head_to_fp32=True, temperature=1.3)),
    Case("rloo-full-kl-sampling", "rloo", args=dict(beta=0.04, **SAMPLING)),
    Case("rloo-lora", "rloo", lora=True),
]
ARGS = dict(max_steps=3, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0, data_seed=0,
            bf16=False, per_device_train_batch_size=4, learning_rate=0.05, optim="sgd", disable_tqdm=True,
            dataloader_num_workers=0)


def _words(rng, n):
    return " ".join(f"w{rng.randrange(VOCAB - 3)}" for _ in range(n))


def _dataset(trainer: str):
    from datasets import Dataset

    rng = random.Random(0)
    if trainer == "dpo":
        rows = [{"prompt": _words(rng, 5), "chosen": _words(rng, rng.randint(2, 6)),
                 "rejected": _words(rng, rng.randint(2, 6))} for _ in range(24)]
    elif trainer == "kto":
        rows = [{"prompt": _words(rng, 5), "completion": _words(rng, rng.randint(2, 6)), "label": i % 3 != 0}
                for i in range(24)]
    else:
        rows = [{"prompt": _words(rng, rng.randint(3, 6))} for _ in range(24)]
    return Dataset.from_list(rows)


def _reward(completions, **kwargs):  # longer completions, and the word w7, pay
    return [len(c.split()) / 10 + c.count("w7") for c in completions]


def _build(case: Case, path: str, output_dir: str, callbacks):
    import trl
    from peft import LoraConfig

    config_class, trainer_class = {"dpo": (trl.DPOConfig, trl.DPOTrainer), "kto": (trl.KTOConfig, trl.KTOTrainer),
                                   "grpo": (trl.GRPOConfig, trl.GRPOTrainer),
                                   "rloo": (trl.RLOOConfig, trl.RLOOTrainer)}[case.trainer]
    args = {**ARGS, "output_dir": output_dir, **case.args}
    if case.trainer in ("grpo", "rloo"):
        args = {"num_generations": 4, "max_completion_length": 8, **args}
    peft = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    kwargs = {"reward_funcs": _reward} if case.trainer in ("grpo", "rloo") else {}
    return trainer_class(model=path, args=config_class(**args), train_dataset=_dataset(case.trainer),
                         processing_class=toy.word_tokenizer(VOCAB), peft_config=peft if case.lora else None,
                         callbacks=callbacks, **kwargs)


@contextlib.contextmanager
def _counting_trl_and_generation(calls: dict[str, int]):
    """Count TRL's own chunked log-probs kernel, transformers' `_sample`, patchkit's decode loop and its decode
    calls that may make packed weight copies."""
    from transformers.generation.utils import GenerationMixin
    from trl.kernels import ChunkedLogProbFunction

    from patchkit import generation, inference, products

    class Products(inference.Products):
        def __init__(self, rows, packed=True):
            super().__init__(rows, packed)
            if packed:
                calls["packed_copies_allowed"] = calls.get("packed_copies_allowed", 0) + 1

    def counted(owner, attr, name):
        original = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return original(*args, **kwargs)

        mp.setattr(owner, attr, wrapper)

    with pytest.MonkeyPatch.context() as mp:
        counted(ChunkedLogProbFunction, "apply", "trl_log_probs")
        counted(GenerationMixin, "_sample", "transformers_sample")
        counted(generation, "_decode_loop", "decode_loop")
        mp.setattr(inference, "Products", Products)
        mp.setattr(products, "_ranked", {})  # every shape timed afresh in this run
        yield


def _train(case: Case, tmp_path, patched: bool) -> dict[str, Any]:
    path = tmp_path / "model"
    if not path.exists():
        tokenizer = toy.word_tokenizer(VOCAB)
        torch.manual_seed(0)
        # GRPO's and RLOO's: weights large enough that the decode loop times its products (`products.MEASURED`),
        # which must draw nothing from the run's seeded generator
        sizes = dict(hidden_size=128, intermediate_size=256, head_dim=32) if case.trainer in ("grpo", "rloo") else {}
        toy.model("llama", tokenizer, **sizes).save_pretrained(path)
        tokenizer.save_pretrained(path)
    recorder, calls = Recorder(), {}
    with (patchkit.patched("llama") if patched else contextlib.nullcontext()), _counting_kernel_calls(calls), \
            _counting_trl_and_generation(calls):
        trainer = _build(case, str(path), str(tmp_path / ("patched" if patched else "unpatched")), [recorder])
        trainer.train()
    return dict(logs=[h for h in trainer.state.log_history if "loss" in h], grads=recorder.grads, calls=calls,
                reference=getattr(trainer, "ref_model", None))


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_preference_and_rl_training_matches_unpatched(case, tmp_path):
    ref = _train(case, tmp_path, patched=False)
    got = _train(case, tmp_path, patched=True)

    assert len(ref["logs"]) == len(got["logs"]) == ARGS["max_steps"]
    # a reference model: a separate one for a full fine-tune (built by the trainer from the path, where it has a
    # KL term), the policy with its adapter off under LoRA
    if not case.lora and (case.trainer in ("dpo", "kto") or case.args.get("beta")):
        assert got["reference"] is not None
    calls = got["calls"]
    assert calls.get("linear_log_probs", 0) > 0 and "trl_log_probs" not in calls, calls
    assert ref["calls"].get("trl_log_probs", 0) > 0 and "linear_log_probs" not in ref["calls"], ref["calls"]
    if case.trainer in ("grpo", "rloo"):
        assert calls.get("decode_loop", 0) == ref["calls"]["transformers_sample"] > 0, (calls, ref["calls"])
        assert "transformers_sample" not in calls and "packed_copies_allowed" not in calls, calls
    if case.lora:
        assert calls.get("lora_linear", 0) > 0, calls

    keys = sorted(k for k in ref["logs"][0] if isinstance(ref["logs"][0][k], float) and k not in
                  ("learning_rate", "epoch", "step_time"))
    assert {"loss", "grad_norm"} <= set(keys) and any(k.startswith(("rewards", "reward", "logps", "kl")) for k in keys)
    # relative to the series' largest value, or to 0.01 where all are smaller: rewards, margins and KL are small
    # differences of log-probs of size ~20, which float32 rounding moves by ~1e-7 in either run
    deviation = {k: max(abs(h[k] - r[k]) for h, r in zip(got["logs"], ref["logs"]))
                 / max(max(abs(r[k]) for r in ref["logs"]), 1e-2) for k in keys}
    worst = max(deviation, key=deviation.get)
    assert deviation[worst] <= RTOL, (f"{case.id}: logged {worst} deviates {deviation[worst]:.1e}: "
                                      f"{[h[worst] for h in got['logs']]} vs {[r[worst] for r in ref['logs']]}")
    grads = max(_compare(f"{case.id}: step {step} gradient of", h, w, RTOL)
                for step, (h, w) in enumerate(zip(got["grads"], ref["grads"]), 1))
    print(f"{case.id}: max relative deviation logged {deviation[worst]:.1e} ({worst}), grads {grads:.1e}; "
          f"calls {calls}")
