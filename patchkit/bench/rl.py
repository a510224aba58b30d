"""`patchkit bench rl`: TRL's `GRPOTrainer` (its generation included) and `DPOTrainer`, patched vs unpatched.

The SFT benchmark's Llama-shaped model (hidden 512, 4 layers, vocab 128256) with LoRA r=16 on every projection,
TRL's defaults otherwise (gradient checkpointing on; DPO's reference model is the policy with its adapter off):
- GRPO: prompts of 32 random words, 4 completions each of up to 64 tokens sampled at temperature 1, 8
  completions per step, a reward for length; no vLLM, so each step generates with `model.generate`. Patched,
  that runs patchkit's decode loop; the step's seconds are split into generation and the rest.
- DPO: prompts of 64 words, chosen and rejected answers of 128..256, 4 pairs per step.

The model is saved once and each trainer loads it by path, as from the Hub. Each round builds a fresh trainer per
variant and times its steps after a warm-up step; variants alternate (ABBA). Peak memory is the process's
resident high-water mark during a step, and what the step added above its start.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import tempfile
import time

import torch
from transformers import PrinterCallback

import patchkit

from ..system import status_bytes
from .models import LORA_TARGETS, model_for
from .sft import MODEL, _Timer
from .stats import cell, medians, summarised

SCENARIOS = ("grpo", "dpo")


class _GenerationClock:
    """Seconds spent in `generate` (transformers' or the decode loop), for the step's split."""

    def __init__(self):
        self.seconds = 0.0

    @contextlib.contextmanager
    def installed(self):
        from transformers.generation.utils import GenerationMixin

        original = GenerationMixin.generate

        def generate(model, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(model, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        GenerationMixin.generate = generate
        try:
            yield self
        finally:
            GenerationMixin.generate = original


class _Split(_Timer):
    """`_Timer`, plus each step's generation seconds and the memory it added above its start."""

    def __init__(self, record, clock):
        super().__init__(record)
        self.clock, self.base = clock, 0

    def on_step_begin(self, args, state, control, **kw):
        self.clock.seconds = 0.0
        super().on_step_begin(args, state, control, **kw)
        self.base = status_bytes("VmRSS")

    def on_step_end(self, args, state, control, **kw):
        super().on_step_end(args, state, control, **kw)
        if state.global_step > 1:
            self.record["generate_s"].append(self.clock.seconds)
            self.record["added"].append(self.record["peak"][-1] - self.base)


def _words(rng, vocab, n):
    return " ".join(f"w{rng.randrange(vocab - 3)}" for _ in range(n))


def _dataset(scenario, vocab, rows, quick):
    from datasets import Dataset

    rng = random.Random(0)
    if scenario == "grpo":
        return Dataset.from_list([{"prompt": _words(rng, vocab, 32)} for _ in range(rows)])
    low, high = (32, 64) if quick else (128, 256)
    return Dataset.from_list([{"prompt": _words(rng, vocab, 64),  # answers start with a space: prompt + answer splits
                               "chosen": " " + _words(rng, vocab, rng.randint(low, high)),  # where the prompt ends
                               "rejected": " " + _words(rng, vocab, rng.randint(low, high))} for _ in range(rows)])


def _reward(completions, **kwargs):
    return [len(c.split()) / 64 for c in completions]


def _trainer(scenario, path, tokenizer, data, steps, quick, callbacks):
    """A trainer of the model saved at `path`, loaded from there as a user names a Hub model (the process holds no
    other copy of its weights)."""
    import trl
    from peft import LoraConfig

    common = dict(output_dir=f"/tmp/patchkit-bench-{scenario}", max_steps=steps, learning_rate=1e-5,
                  logging_strategy="no", report_to="none", save_strategy="no", use_cpu=True, bf16=False, seed=0,
                  data_seed=0, dataloader_num_workers=0, disable_tqdm=True)
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    if scenario == "grpo":
        args = trl.GRPOConfig(**common, per_device_train_batch_size=8, num_generations=4,
                              max_completion_length=16 if quick else 64)
        trainer = trl.GRPOTrainer(model=path, reward_funcs=_reward, args=args, train_dataset=data,
                                  processing_class=tokenizer, peft_config=peft, callbacks=callbacks)
    else:
        args = trl.DPOConfig(**common, per_device_train_batch_size=4)
        trainer = trl.DPOTrainer(model=path, args=args, train_dataset=data, processing_class=tokenizer,
                                 peft_config=peft, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    return trainer


def run(steps: int = 2, rounds: int = 2, scenarios=SCENARIOS, dims: dict = MODEL, arch: str = "llama",
        quick: bool = False, progress=None) -> dict:
    import datasets

    from patchkit.toy import word_tokenizer

    datasets.disable_progress_bars()  # the trainers tokenize their data each round
    torch.manual_seed(0)
    arch, model = model_for(arch, dims)
    tokenizer = word_tokenizer(model.config.vocab_size)
    for config in (model.config, model.generation_config):
        config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        config.bos_token_id = None
    summary = {"scenario": "rl", "arch": arch, "params": sum(t.numel() for t in model.parameters()),
               "threads": torch.get_num_threads(), "quick": quick}
    folder = tempfile.TemporaryDirectory(prefix="patchkit-bench-rl-")
    model.save_pretrained(folder.name)
    tokenizer.save_pretrained(folder.name)
    del model
    clock = _GenerationClock()
    for scenario in scenarios:
        data = _dataset(scenario, dims["vocab_size"], 8 * (steps + 2) * (rounds + 1), quick)
        results = {v: {"s": [], "peak": [], "generate_s": [], "added": []} for v in ("unpatched", "patched")}
        order = ["unpatched", "patched"]
        for round_ in range(-1, rounds):  # round -1 warms up: one step each, not recorded
            for variant in order if round_ % 2 else order[::-1]:
                record = results[variant] if round_ >= 0 else {"s": [], "peak": [], "generate_s": [], "added": []}
                with patchkit.patched(arch) if variant == "patched" else contextlib.nullcontext(), clock.installed():
                    trainer = _trainer(scenario, folder.name, tokenizer, data, steps + 1 if round_ >= 0 else 2, quick,
                                       [_Split(record, clock)])
                    trainer.train()
                    del trainer
                if progress and round_ >= 0:
                    progress(f"{scenario} round {round_ + 1}/{rounds} {variant}: "
                             f"{statistics.median(record['s'][-steps:]):.2f} s/step")
        summary[scenario] = _summarise(results)
    folder.cleanup()
    return summary


def _summarise(results):
    out = {}
    for variant, r in results.items():
        samples = {"s_per_step": r["s"], "steps_per_s": [1 / s for s in r["s"]],
                   "peak_gib": [b / 2**30 for b in r["peak"]], "added_gib": [b / 2**30 for b in r["added"]]}
        if any(r["generate_s"]):
            samples["generate_s"] = r["generate_s"]
            samples["train_s"] = [s - g for s, g in zip(r["s"], r["generate_s"])]
        out[variant] = medians(samples)
    return summarised(out)


def report(summary: dict) -> str:
    lines = [f"| {summary['arch']} TRL trainers, LoRA r=16, {summary['params'] / 1e6:.0f} M params, "
             f"{summary['threads']} threads | unpatched | patched | patched / unpatched |", "|---|---|---|---|"]
    for scenario in SCENARIOS:
        if scenario not in summary:
            continue
        u, p = summary[scenario]["unpatched"], summary[scenario]["patched"]
        figures = [("steps/s", "steps_per_s", "{:.3f}"), ("peak RSS during a step (GiB)", "peak_gib", "{:.2f}"),
                   ("memory a step adds above its start (GiB)", "added_gib", "{:.2f}")]
        if "generate_s" in u:
            figures += [("generation s/step", "generate_s", "{:.2f}"), ("the rest of the step, s", "train_s",
                                                                        "{:.2f}")]
        for label, key, fmt in figures:
            lines.append(f"| {scenario}: {label} | {fmt.format(u[key])} | {fmt.format(p[key])} | "
                         f"{cell(u['samples'][key], p['samples'][key])} |")
    return "\n".join(lines)
