"""Guards for the transformers 5.x / TRL traps listed in shared/TRANSFORMERS-5.md."""

import contextlib

import pytest
import torch

import patchkit
from patchkit.architectures import Llama
from patchkit.parity import tiny_batch, tiny_model


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_survives_the_patch(reentrant):
    model = tiny_model(Llama)
    batch = tiny_batch(model.config.vocab_size)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    calls = []
    for layer in model.model.layers:
        inner = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, _f=inner, **k: calls.append(1) or _f(*a, **k)
    patchkit.unpatch("llama")
    model(**batch).loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    unpatched_calls = len(calls)
    model.zero_grad()
    with patchkit.patched("llama"):
        model(**batch).loss.backward()
    assert unpatched_calls == model.config.num_hidden_layers
    assert len(calls) == 2 * unpatched_calls  # still checkpointed with the patch on
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6)


def test_output_capture_hidden_states_and_attentions():
    model = tiny_model(Llama, attn_implementation="eager").eval()
    batch = tiny_batch(model.config.vocab_size)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    kwargs = dict(output_hidden_states=True, output_attentions=True)
    patchkit.unpatch("llama")
    expected = model(**inputs, **kwargs)
    with patchkit.patched("llama"):
        got = model(**inputs, **kwargs)
        model.train()
        trained = model(**batch, **kwargs)  # the fused-loss path returns them too
    assert len(got.hidden_states) == len(expected.hidden_states) == model.config.num_hidden_layers + 1
    for a, b in zip(got.hidden_states + got.attentions, expected.hidden_states + expected.attentions):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert trained.logits is None and len(trained.hidden_states) == len(expected.hidden_states)


def test_from_pretrained_while_patched_initialises_buffers(tmp_path):
    """Weights load and rotary buffers rebuild by class name: the patch must not rename classes."""
    from transformers import AutoModelForCausalLM

    model = tiny_model(Llama).eval()
    model.save_pretrained(tmp_path)
    ids = tiny_batch(model.config.vocab_size)["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    with patchkit.patched("llama"):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)


def test_trainer_still_passes_num_items_in_batch():
    """Trainer passes num_items_in_batch only to forwards whose signature has **kwargs."""
    import inspect

    from transformers import LlamaForCausalLM

    with patchkit.patched("llama"):
        params = inspect.signature(LlamaForCausalLM.forward).parameters.values()
        assert any(p.kind is p.VAR_KEYWORD for p in params)


def _tokenizer(vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(vocab_size - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def test_sft_trainer_runs_patched(tmp_path):
    """TRL's SFTTrainer (its own fused LM head over our backbone) trains and matches unpatched."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 211, (int(n),), generator=g).tolist()}
            for n in torch.randint(8, 20, (16,), generator=g)]
    losses = {}
    for variant in ("unpatched", "patched"):
        model = tiny_model(Llama)
        args = SFTConfig(output_dir=str(tmp_path / variant), max_steps=3, per_device_train_batch_size=4,
                         learning_rate=1e-3, logging_steps=1, report_to="none", save_strategy="no",
                         use_cpu=True, bf16=False, seed=0, data_seed=0, dataloader_num_workers=0,
                         disable_tqdm=True)
        with patchkit.patched("llama") if variant == "patched" else contextlib.nullcontext():
            trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=_tokenizer(211))
            trainer.train()
        losses[variant] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert all("mean_token_accuracy" in h for h in trainer.state.log_history if "loss" in h)
    assert len(losses["patched"]) == 3
    torch.testing.assert_close(torch.tensor(losses["patched"]), torch.tensor(losses["unpatched"]),
                               rtol=1e-4, atol=1e-5)


def test_hub_kernel_module_in_place_of_a_function(monkeypatch):
    """With Hugging Face `kernels` installed, apply_rotary_pos_emb is an nn.Module instance."""
    import transformers.models.llama.modeling_llama as M

    function = M.apply_rotary_pos_emb

    class RotaryPosEmb(torch.nn.Module):
        def forward(self, q, k, cos, sin, unsqueeze_dim=1):
            return function(q, k, cos, sin, unsqueeze_dim)

    layer = RotaryPosEmb()
    monkeypatch.setattr(M, "apply_rotary_pos_emb", layer)
    model = tiny_model(Llama)
    with patchkit.patched("llama"):
        assert M.apply_rotary_pos_emb is not layer and "unsqueeze_dim" in str(
            __import__("inspect").signature(M.apply_rotary_pos_emb))
        from patchkit.parity import compare
        assert compare(Llama(), model, tiny_batch(model.config.vocab_size)).ok
    assert M.apply_rotary_pos_emb is layer


def test_transformers_probe_for_hub_kernels_does_not_load_patchkit_kernels_twice():
    """From a checkout's root, `kernels/` is also a top-level `kernels` package, and transformers imports `kernels` to
    probe for Hugging Face's kernel hub. A second copy of patchkit's kernels would define its `torch.library` ops
    again, overwriting the first registration under the live op objects (seen: random `vector::reserve` errors)."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(patchkit.__file__).resolve().parent.parent
    code = ("import sys, patchkit, torch\n"
            "from transformers.utils.import_utils import is_kernels_available\n"
            "import kernels\n"
            "assert not hasattr(kernels, 'TORCH'), 'a second copy of patchkit.kernels'\n"
            "assert not [m for m in sys.modules if m.startswith('kernels.')], 'kernel modules imported twice'\n"
            "assert not is_kernels_available() or hasattr(kernels, 'kernelize')\n")
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=300)
