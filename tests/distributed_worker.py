"""Training runs shared by tests/test_distributed.py: one process, or one rank of a torchrun job.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py OUT_DIR

Each rank patches Llama, builds the same tiny random model and trains it for a few steps with
TRL's `SFTTrainer` (its fused LM head over patchkit's backbone) and with `transformers.Trainer`
(patchkit's fused cross-entropy with `num_items_in_batch`), under accelerate's DDP on gloo. The
order is the Trainer's default (a random sampler, seeded the same in every process; accelerate hands
rank r the batches r, r + 2, ...); rather than trust that, every process records the rows it trained on.
Rank 0 writes `OUT_DIR/<trainer>.json` (per-step logs and the rows every rank trained on) and
`OUT_DIR/<trainer>.pt` (the final weights). The test runs `train()` in its own process for the
one-process reference, with per-device batch `GLOBAL_BATCH` instead of `GLOBAL_BATCH / 2`.
"""

from __future__ import annotations

import json
import os
import sys

import torch

GLOBAL_BATCH = 4  # rows per optimizer step, summed over ranks
STEPS = 3
VOCAB = 211
TRAINERS = ("sft", "trainer")
LOGGED = ("loss", "grad_norm", "mean_token_accuracy", "entropy")  # what a step logs (the last two: SFT only)


def dataset():
    """Exactly STEPS global batches of pre-tokenized documents whose lengths differ a lot, so that the
    ranks' shards hold different token counts and per-rank means would not average to the global mean."""
    from patchkit.toy import documents

    return documents(STEPS * GLOBAL_BATCH, VOCAB, 24, seed=3, min_len=4)


def train(kind: str, out_dir: str, per_device_batch: int) -> dict:
    """Train a fresh tiny Llama with `kind` ("sft" or "trainer"); patching is the caller's business.

    Returns the per-step logs, the rows (unpadded input ids) the model saw in each training forward of
    this process, and the final weights (on the main process; DDP keeps every rank's copy identical).
    """
    import transformers
    from trl import SFTConfig, SFTTrainer

    from patchkit.architectures import Llama
    from patchkit.parity import tiny_model
    from patchkit.toy import word_tokenizer

    model = tiny_model(Llama)
    tokenizer = word_tokenizer(VOCAB)
    common = dict(output_dir=out_dir, max_steps=STEPS, per_device_train_batch_size=per_device_batch,
                  learning_rate=1e-3, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
                  seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
                  bf16=False,  # fp32: SFTConfig defaults to bf16 autocast, even on CPU
                  # the default, spelled out: every rank divides its token-loss sum by the token count of all
                  # ranks, and the loss is scaled by the world size because DDP averages the gradients
                  average_tokens_across_devices=True,
                  ddp_backend="gloo" if "LOCAL_RANK" in os.environ else None)
    seen: list[list[list[int]]] = []
    fused_ce: list[bool] = []  # per training forward: transformers.Trainer got its loss without logits

    def record_rows(module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        if torch.is_grad_enabled():
            seen.append([row[m.bool()].tolist() for row, m in zip(ids, mask)])

    def record_logits(module, args, kwargs, output):
        if torch.is_grad_enabled():
            fused_ce.append(output.logits is None and output.loss is not None)

    model.model.register_forward_pre_hook(record_rows, with_kwargs=True)
    if kind == "sft":
        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=dataset(),
                             processing_class=tokenizer)
    elif kind == "trainer":
        model.register_forward_hook(record_logits, with_kwargs=True)
        trainer = transformers.Trainer(
            model=model, args=transformers.TrainingArguments(**common), train_dataset=dataset(),
            data_collator=transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False))
    else:
        raise ValueError(kind)
    trainer.train()
    logs = [{k: h[k] for k in LOGGED if k in h} for h in trainer.state.log_history if "loss" in h]
    weights = {n: p.detach().clone() for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()}
    return {"logs": logs, "seen": seen, "fused_ce": fused_ce, "weights": weights,
            "world_size": trainer.accelerator.num_processes,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "model_wrapper": type(trainer.model_wrapped).__name__}


def main(out_dir: str) -> None:
    import torch.distributed as dist

    import patchkit

    world = int(os.environ["WORLD_SIZE"])
    assert GLOBAL_BATCH % world == 0
    patchkit.patch("llama")
    for kind in TRAINERS:
        result = train(kind, os.path.join(out_dir, f"run-{kind}"), GLOBAL_BATCH // world)
        assert patchkit.is_patched("llama")
        shards = [None] * world
        dist.all_gather_object(shards, {"seen": result["seen"], "fused_ce": result["fused_ce"]})
        if dist.get_rank() == 0:
            torch.save(result.pop("weights"), os.path.join(out_dir, f"{kind}.pt"))
            result.pop("seen"), result.pop("fused_ce")
            result["ranks"] = shards
            with open(os.path.join(out_dir, f"{kind}.json"), "w") as f:
                json.dump(result, f)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
