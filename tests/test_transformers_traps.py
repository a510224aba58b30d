"""Guards for transformers 5.x and TRL traps: checkpointing, output capture, signatures, import names."""

import contextlib

import pytest
import torch

import patchkit
from patchkit.architectures import Llama
from patchkit.parity import tiny_batch, tiny_model, text_vocab


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_survives_the_patch(reentrant):
    model = tiny_model(Llama)
    batch = tiny_batch(text_vocab(model.config))
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
    batch = tiny_batch(text_vocab(model.config))
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
    ids = tiny_batch(text_vocab(model.config))["input_ids"]
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


class _RotaryPosEmb(torch.nn.Module):
    """A function made a module, as Hugging Face `kernels` makes apply_rotary_pos_emb."""
    function = None

    def forward(self, q, k, cos, sin, unsqueeze_dim=1):
        return type(self).function(q, k, cos, sin, unsqueeze_dim)

    def __reduce__(self):  # as kernels' function modules do: rebuilt from the module attribute's class
        import transformers.models.llama.modeling_llama as M

        return type(M.apply_rotary_pos_emb), ()


def test_hub_kernel_module_in_place_of_a_function(monkeypatch):
    """With Hugging Face `kernels` installed (a dependency of transformers 5.25+), apply_rotary_pos_emb is an
    nn.Module instance, and each attention layer holds private instances of its class, pickled by the function's
    name: the class's forward is patched, so every instance runs the kernel, a model pickled while patched
    unpickles, and unpatching restores them all."""
    import inspect
    import pickle

    import transformers.models.llama.modeling_llama as M

    if not isinstance(M.apply_rotary_pos_emb, torch.nn.Module):  # `kernels` not installed: made one as it would
        monkeypatch.setattr(_RotaryPosEmb, "function", staticmethod(M.apply_rotary_pos_emb))
        monkeypatch.setattr(M, "apply_rotary_pos_emb", _RotaryPosEmb())
    layer = M.apply_rotary_pos_emb
    cls, original = type(layer), vars(type(layer))["forward"]
    model = tiny_model(Llama)
    attention = model.model.layers[0].self_attn
    attention.__dict__.setdefault("_kernel_funcs", {})["private"] = cls()  # as kernels' use_kernelized_func does
    with patchkit.patched("llama"):
        assert M.apply_rotary_pos_emb is layer and cls.forward.__patchkit__ == ("llama", "rope")
        assert "unsqueeze_dim" in str(inspect.signature(cls.forward))
        twin = pickle.loads(pickle.dumps(model))
        assert type(twin.model.layers[0].self_attn._kernel_funcs["private"]) is cls
        from patchkit.parity import compare
        assert compare(Llama(), model, tiny_batch(text_vocab(model.config))).ok
    assert M.apply_rotary_pos_emb is layer and vars(cls)["forward"] is original


def test_transformers_probe_for_hub_kernels_does_not_load_patchkit_kernels_twice():
    """From a checkout's root, `kernels/` is also a top-level `kernels` package, and transformers imports `kernels` to
    probe for Hugging Face's kernel hub, and from 5.25 on imports it (CI: every test module failed to collect). A
    second copy of patchkit's kernels would define its `torch.library` ops again, overwriting the first registration
    under the live op objects (seen: random `vector::reserve` errors)."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(patchkit.__file__).resolve().parent.parent
    code = ("import os, sys, patchkit, torch\n"
            "import transformers.modeling_utils  # imports Hugging Face's kernels where installed (5.25+)\n"
            "from transformers.utils.import_utils import is_kernels_available\n"
            "import kernels\n"
            "assert not hasattr(kernels, 'TORCH'), 'a second copy of patchkit.kernels'\n"
            "mine = os.path.join(os.getcwd(), 'kernels')\n"
            "assert not [m for m, v in sys.modules.items() if m.startswith('kernels.')\n"
            "            and (getattr(v, '__file__', None) or '').startswith(mine)], 'kernel modules imported twice'\n"
            "assert not is_kernels_available() or hasattr(kernels, 'kernelize')\n")
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=300)
    # a script in examples/ has its folder first on the path: nothing there may be named `kernels`
    script = "import sys; sys.path.insert(0, 'examples'); import transformers.modeling_utils"
    subprocess.run([sys.executable, "-c", script], cwd=root, check=True, timeout=300)
