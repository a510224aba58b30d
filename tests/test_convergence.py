"""Convergence: a tiny random Llama and Gemma learn the toy arithmetic chat task with TRL's SFTTrainer,
patched and unpatched, along the same loss curve step by step (fp32, CPU, nothing downloaded).

Training amplifies fp32 rounding: how much depends on the settings, not on patchkit. Here the curves
agree within 7.3e-06 relative at worst (both families, measured). With lr 3e-3 instead, a 1e-7 relative
perturbation of the initial weights alone (no patch) drifts past 1e-4 by step 24; with Gemma's loss over
the whole conversation, patched and unpatched drift past 1e-4 near step 125 even at lr 2e-3.
"""

import contextlib

import pytest
import torch
import transformers
from trl import SFTConfig, SFTTrainer

import patchkit
from patchkit import toy

STEPS = 150
MAX_OPERAND = 5  # 72 distinct sums and differences: learnable in STEPS steps
CASES = {  # arch: (config class, model class, assistant_only_loss)
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, False),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, True),
}


@pytest.fixture
def one_thread():
    """One thread: tiny matmuls gain nothing from more, and the rounding does not depend on the core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(arch: str, tmp_path, data, questions):
    config_class, model_class, assistant_only = CASES[arch]
    tokenizer = toy.chat_tokenizer()
    config = config_class(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = model_class(config)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=16, learning_rate=1.5e-3,
                     assistant_only_loss=assistant_only, bf16=False,  # SFTConfig defaults to bf16 autocast, even on CPU
                     logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0, data_seed=0,
                     dataloader_num_workers=0, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    losses = torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h], dtype=torch.float64)

    tokenizer.padding_side = "left"  # greedy answers to training questions, one left-padded batch
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=False) for q in questions]
    batch = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    model.eval()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    # one token per character: join them (the toy tokenizer's `decode` puts spaces between tokens)
    return losses, ["".join(tokenizer.convert_ids_to_tokens(row, skip_special_tokens=True))
                    for row in out[:, batch["input_ids"].shape[1]:].tolist()]


@pytest.mark.parametrize("arch", list(CASES))
def test_sft_converges_identically_patched(arch, tmp_path, one_thread):
    data = toy.arithmetic(256, max_operand=MAX_OPERAND)
    solutions = {}
    for row in data:
        solutions.setdefault(row["messages"][0]["content"], row["messages"][1]["content"])
    questions = list(solutions)[:30]

    results = {}
    for variant in ("unpatched", "patched"):
        # TRL binds the model's forward when the trainer is built: patch around construction and training
        with patchkit.patched(arch) if variant == "patched" else contextlib.nullcontext():
            assert patchkit.is_patched(arch) == (variant == "patched")
            results[variant] = _train(arch, tmp_path / variant, data, questions)
    (unpatched, unpatched_answers), (patched, patched_answers) = results["unpatched"], results["patched"]

    # (a) the same curve, every logged step
    assert len(patched) == len(unpatched) == STEPS
    torch.testing.assert_close(patched, unpatched, rtol=1e-4, atol=0.0)

    # (b) the task was learned: the loss fell, and training sums are answered (measured: 13 and 12 of 30)
    first, last = patched[:10].mean().item(), patched[-10:].mean().item()
    assert last < 0.4 * first, f"{arch}: mean loss of the last 10 steps {last:.3f} vs the first 10 {first:.3f}"
    correct = sum(answer == solutions[q] for q, answer in zip(questions, patched_answers))
    assert correct >= 8, f"{arch}: {correct}/30 training sums answered: {dict(zip(questions, patched_answers))}"
    assert patched_answers == unpatched_answers
