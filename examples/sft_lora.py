"""Supervised fine-tuning with LoRA, TRL's SFTTrainer and patchkit's fused kernels.

Offline on a CPU, a built-in tiny Llama-shaped model learns toy arithmetic chats (well under two minutes):

    python examples/sft_lora.py
    python examples/sft_lora.py --compare --max-steps 50    # also an unpatched run: steps/s side by side

A real model from a local Hugging Face directory, on a JSON/JSONL file of chat `messages`
(one row: {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}):

    python examples/sft_lora.py --model ./Llama-3.2-1B-Instruct --dataset chats.jsonl --packing \\
        --max-steps 500 --batch-size 4 --lr 2e-4 --output-dir ./llama-lora
"""

from __future__ import annotations

import argparse
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainerCallback
from trl import SFTConfig, SFTTrainer

import patchkit
from patchkit import toy

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CUDA = torch.cuda.is_available()
BF16 = CUDA and torch.cuda.is_bf16_supported()


def load(args):
    """(model, tokenizer, dataset): the local model and data if given, else the built-in tiny ones."""
    if args.model:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16 if BF16 else torch.float32)
    else:
        tokenizer = toy.chat_tokenizer()
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             bos_token_id=None)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        torch.set_num_threads(1)  # a model this small runs fastest on one CPU thread
    if args.dataset:
        from datasets import load_dataset

        dataset = load_dataset("json", data_files=args.dataset, split="train")
    else:
        dataset = toy.arithmetic(2000, max_operand=9)
    torch.manual_seed(0)  # the same LoRA initialisation in every run
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                             task_type="CAUSAL_LM"))
    return model, tokenizer, dataset


class StepTimer(TrainerCallback):
    """Seconds per optimizer step, leaving out the first (warm-up: lazy initialisation, kernel compilation)."""

    def __init__(self):
        self.times, self.start = [], 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)

    def steps_per_second(self) -> float:
        timed = self.times[1:] or self.times
        return len(timed) / sum(timed)


def train(args, model, tokenizer, dataset, output_dir):
    """Train; return (trainer, last logged loss, steps/s)."""
    config = SFTConfig(output_dir=output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
                       learning_rate=args.lr, packing=args.packing, assistant_only_loss=args.assistant_only_loss,
                       max_length=args.max_length or (1024 if args.model else 128),
                       logging_steps=max(1, args.max_steps // 10), save_strategy="no", report_to="none",
                       bf16=BF16, use_cpu=not CUDA, seed=0, data_seed=0)  # fp32 on CPU (SFTConfig defaults to bf16)
    timer = StepTimer()
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[timer])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, losses[-1], timer.steps_per_second()


def sample(model, tokenizer, messages) -> tuple[str, str]:
    """Greedy answer of the fine-tuned model to the conversation without its last assistant turn."""
    prompt = messages[:-1] if messages[-1]["role"] == "assistant" else messages
    inputs = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True).to(model.device)
    model.eval()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return prompt[-1]["content"], tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", help="local Hugging Face model directory (default: a built-in tiny Llama)")
    parser.add_argument("--dataset", help="local JSON/JSONL file of chat `messages` (default: toy arithmetic)")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3, help="learning rate (a real model wants ~1e-4..2e-4)")
    parser.add_argument("--max-length", type=int, help="tokens per row (default: 1024, or 128 for the tiny model)")
    parser.add_argument("--packing", action="store_true", help="pack conversations into full rows (padding-free)")
    parser.add_argument("--assistant-only-loss", action=argparse.BooleanOptionalAction,
                        help="loss on assistant turns only; needs {%% generation %%} in the chat template "
                             "(default: on for the built-in model, off for --model)")
    parser.add_argument("--output-dir", default="sft-lora-output", help="where the LoRA adapter is saved")
    parser.add_argument("--compare", action="store_true", help="also train unpatched and compare steps/s")
    args = parser.parse_args(argv)
    if args.assistant_only_loss is None:
        args.assistant_only_loss = not args.model

    model, tokenizer, dataset = load(args)
    model.print_trainable_parameters()
    handle = patchkit.patch(model)  # before SFTTrainer: it binds the model's forward when it is built
    print(f"patchkit: {handle}")
    trainer, loss, speed = train(args, model, tokenizer, dataset, args.output_dir)
    trainer.save_model(args.output_dir)
    print(f"final loss: {loss:.4f} (adapter saved to {args.output_dir})")
    question, answer = sample(model, tokenizer, dataset[0]["messages"])
    print(f"sample: {question!r} -> {answer!r}")

    if args.compare:
        handle.unpatch()  # the same run, from the same initial weights and data order, without patchkit
        model, tokenizer, dataset = load(args)
        _, base_loss, base_speed = train(args, model, tokenizer, dataset, args.output_dir + "-unpatched")
        print(f"{'':10}{'unpatched':>12}{'patched':>12}")
        print(f"{'steps/s':10}{base_speed:12.2f}{speed:12.2f}")
        print(f"{'loss':10}{base_loss:12.4f}{loss:12.4f}")
        print(f"speed-up: {speed / base_speed:.2f}x")


if __name__ == "__main__":
    main()
