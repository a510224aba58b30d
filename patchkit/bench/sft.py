"""`patchkit bench sft`: TRL's `SFTTrainer` on packed batches, patched vs unpatched, in one process.

A Llama-shaped model (hidden 512, 4 layers, vocab 128256) trains on synthetic documents of
random length, packed (best-fit decreasing, padding-free) into 4 x 512 tokens, once with LoRA
r=16 on every projection and once as a full fine-tune; with `--qlora`, QLoRA (the same LoRA over
the model loaded in 4-bit nf4 with double quantization, `prepare_model_for_kbit_training`) beside
fp32 LoRA. Each round builds a fresh trainer per
variant from the same initial weights and times its steps; variants alternate (ABBA) so the
machine's drift cancels. Peak memory is the process's resident high-water mark during a step.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
from transformers import PrinterCallback, TrainerCallback

import patchkit

from ..system import reset_peak, status_bytes
from .machine import matmul_flops
from .models import LORA_TARGETS, model_for
from .stats import cell, medians, summarised

SCENARIOS = ("lora", "full", "qlora")
MODEL = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=1408, vocab_size=128256, max_position_embeddings=2048)


def _model(state, lora: bool, dims: dict = MODEL, arch: str = "llama", quantized_from: str | None = None):
    """The benchmark's model from `state`; with `quantized_from` (the model saved there), loaded in 4-bit."""
    from peft import LoraConfig, get_peft_model

    if quantized_from:
        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(quantized_from, quantization_config=quant, device_map="cpu",
                                                     dtype=torch.float32)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # the trainer's setting
    else:
        model = model_for(arch, dims)[1]
        model.load_state_dict(state)
    if not lora:
        return model
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                            task_type="CAUSAL_LM"))


class _Timer(TrainerCallback):
    """Records each step's seconds and peak resident memory (after a warm-up step)."""

    def __init__(self, record):
        self.record, self.start = record, None

    def on_step_begin(self, args, state, control, **kw):
        reset_peak()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if state.global_step > 1:
            self.record["s"].append(time.perf_counter() - self.start)
            self.record["peak"].append(status_bytes("VmHWM"))


def run(steps: int = 4, rounds: int = 2, batch: int = 4, seq: int = 512, scenarios=("lora", "full"),
        dims: dict = MODEL, arch: str = "llama", progress=None) -> dict:
    from trl import SFTConfig, SFTTrainer

    from patchkit.toy import documents, word_tokenizer

    torch.manual_seed(0)
    arch, model = model_for(arch, dims)
    config, state = model.config, model.state_dict()
    tokenizer = word_tokenizer(config.vocab_size)
    data = documents(batch * (steps + 2) * 3, config.vocab_size, seq)
    n_params = sum(t.numel() for t in state.values())
    matmul_params = n_params - state["model.embed_tokens.weight"].numel()
    summary = {"scenario": "sft", "arch": arch, "batch": batch, "seq": seq, "params": n_params,
               "threads": torch.get_num_threads()}
    saved = None
    if "qlora" in scenarios:  # loaded by path, quantized on load, as from the Hub
        import tempfile

        saved = tempfile.TemporaryDirectory(prefix="patchkit-bench-qlora-")
        model.save_pretrained(saved.name)
    del model
    for scenario in scenarios:
        results = {v: {"s": [], "peak": [], "tokens": []} for v in ("unpatched", "patched")}
        order = ["unpatched", "patched"]
        for round_ in range(-1, rounds):  # round -1 warms up (first calls, allocator): one step each, not recorded
            for variant in order if round_ % 2 else order[::-1]:
                record = results[variant] if round_ >= 0 else {"s": [], "peak": [], "tokens": []}
                with patchkit.patched(arch) if variant == "patched" else contextlib.nullcontext():
                    args = SFTConfig(output_dir="/tmp/patchkit-bench-sft", max_steps=steps + 1 if round_ >= 0 else 2,
                                     per_device_train_batch_size=batch, packing=True, max_length=seq,
                                     learning_rate=1e-4, logging_strategy="no", report_to="none", save_strategy="no",
                                     use_cpu=True, bf16=False, seed=0, data_seed=0, dataloader_num_workers=0,
                                     disable_tqdm=True)
                    model = _model(state, scenario != "full", dims, arch, saved.name if scenario == "qlora" else None)
                    trainer = SFTTrainer(model=model, args=args,
                                         train_dataset=data, processing_class=tokenizer, callbacks=[_Timer(record)])
                    trainer.remove_callback(PrinterCallback)  # no metrics dict on stdout: the tables are the output
                    collate = trainer.data_collator
                    trainer.data_collator = lambda rows, _c=collate, _r=record: _count(_c(rows), _r)
                    trainer.train()
                    del trainer, model
                if progress and round_ >= 0:
                    progress(f"{scenario} round {round_ + 1}/{rounds} {variant}: "
                             f"{statistics.median(record['s'][-steps:]):.2f} s/step")
        if "attention" not in summary:
            summary["attention"] = attention_profile(state, results["unpatched"]["batch"], dims=dims,
                                                     arch=arch)
        summary[scenario] = _summarise(results, matmul_params, config, seq, scenario != "full")
    if saved is not None:
        saved.cleanup()
    summary["matmul_gflops"] = matmul_flops() / 1e9
    for scenario in scenarios:
        for variant in ("unpatched", "patched"):
            r = summary[scenario][variant]
            r["samples"]["mfu"] = [f / (summary["matmul_gflops"] * 1e9) for f in r["samples"]["flops_per_s"]]
            r["mfu"] = statistics.median(r["samples"]["mfu"])
    return summary


def attention_profile(state, batch, rounds: int = 5, dims: dict = MODEL, arch: str = "llama") -> dict:
    """The backbone's forward+backward on one packed batch of the benchmark, with only the `attention` op
    switched: what per-document attention changes, apart from every other op."""
    model = _model(state, lora=False, dims=dims, arch=arch).train()
    inputs = {k: batch[k] for k in ("input_ids", "position_ids")}
    only_attention = {op: op == "attention" for op in ("rms_norm", "rope", "mlp", "cross_entropy", "attention", "lora")}
    times = {"unpatched": [], "patched": []}
    for round_ in range(rounds + 1):
        for variant in ("unpatched", "patched") if round_ % 2 else ("patched", "unpatched"):
            with patchkit.patched(arch, **only_attention) if variant == "patched" else contextlib.nullcontext():
                start = time.perf_counter()
                model.model(**inputs, use_cache=False).last_hidden_state.sum().backward()
                if round_:  # the first round warms up
                    times[variant].append(time.perf_counter() - start)
    documents = int((batch["position_ids"] == 0).sum())
    out = {v: statistics.median(t) * 1e3 for v, t in times.items()}
    return {"tokens": batch["input_ids"].numel(), "documents": documents, "unpatched_ms": out["unpatched"],
            "patched_ms": out["patched"], "speedup": out["unpatched"] / out["patched"]}


def _count(batch, record):
    record["tokens"].append(batch["input_ids"].numel())
    record["batch"] = batch
    return batch


def _summarise(results, matmul_params, config, seq, lora):
    # LoRA: no weight gradients for frozen matmuls, so forward + input gradients = 4 FLOPs per parameter-token
    per_token = (4 if lora else 6) * matmul_params + 6 * config.num_hidden_layers * seq * config.hidden_size
    out = {}
    for variant, r in results.items():
        r.pop("batch", None)
        tokens = statistics.mean(r["tokens"])
        out[variant] = medians({"s_per_step": r["s"], "steps_per_s": [1 / s for s in r["s"]],
                                "tokens_per_s": [tokens / s for s in r["s"]],
                                "flops_per_s": [per_token * tokens / s for s in r["s"]],
                                "peak_gib": [b / 2**30 for b in r["peak"]]})
        out[variant]["tokens_per_step"] = tokens
    return summarised(out)


def report(summary: dict) -> str:
    lines = [f"| {summary.get('arch', 'llama')} SFTTrainer, packed {summary['batch']} x {summary['seq']} tokens, "
             f"{summary['params'] / 1e6:.0f} M "
             f"params, {summary['threads']} threads | unpatched | patched | patched / unpatched |", "|---|---|---|---|"]
    for scenario in SCENARIOS:
        if scenario not in summary:
            continue
        u, p = summary[scenario]["unpatched"], summary[scenario]["patched"]
        for label, key, fmt in (("steps/s", "steps_per_s", "{:.3f}"), ("tokens/s", "tokens_per_s", "{:.0f}"),
                                ("MFU vs measured matmul", "mfu", "{:.0%}"),
                                ("peak RSS during a step (GiB)", "peak_gib", "{:.2f}")):
            lines.append(f"| {scenario}: {label} | {fmt.format(u[key])} | {fmt.format(p[key])} | "
                         f"{cell(u['samples'][key], p['samples'][key])} |")
    if "qlora" in summary and "lora" in summary:
        for variant in ("unpatched", "patched"):
            q, f = summary["qlora"][variant], summary["lora"][variant]
            lines.append(f"| QLoRA against fp32 LoRA, {variant}: steps/s, peak RSS | | | "
                         f"{q['steps_per_s'] / f['steps_per_s']:.2f}x, {q['peak_gib'] / f['peak_gib']:.2f}x |")
    if "attention" in summary:
        a = summary["attention"]
        lines.append(f"| backbone fwd+bwd, packed row of {a['tokens']} tokens in {a['documents']} documents, only "
                     f"`attention` switched (ms) | {a['unpatched_ms']:.0f} | {a['patched_ms']:.0f} | "
                     f"{a['patched_ms'] / a['unpatched_ms']:.2f}x |")
    lines.append(f"\nmatmul measured in the same run: {summary['matmul_gflops']:.0f} GFLOP/s")
    return "\n".join(lines)

