"""Nothing a patch does may lose a user's work or silently change their numbers."""

import copy
import filecmp
import gc
import os
import pickle
import subprocess
import sys
import textwrap
import tracemalloc

import pytest
import torch
import transformers.models.llama.modeling_llama as M

import patchkit
from patchkit import patcher
from patchkit.architectures import Llama
from patchkit.parity import compare, tiny_batch, tiny_model, text_vocab


def _originals(module=M):
    def own(obj):  # a class's own forward; apply_rotary_pos_emb is a module's with Hugging Face `kernels` installed
        cls = obj if isinstance(obj, type) else type(obj) if isinstance(obj, torch.nn.Module) else None
        return obj if cls is None else vars(cls).get("forward")

    return {name: own(getattr(module, name, None))
            for name in ("LlamaRMSNorm", "LlamaMLP", "LlamaForCausalLM", "apply_rotary_pos_emb")}


def _hook_counts():
    from torch.nn.modules import module

    hooks = [getattr(module, n) for n in dir(module) if n.startswith("_global_") and "hook" in n]
    return [len(h) for h in hooks if isinstance(h, dict)]


def test_a_thousand_patch_cycles_leave_nothing_behind():
    before, hooks = _originals(), _hook_counts()
    for _ in range(20):  # one-time costs first: the families' packages get imported (not their modeling files)
        patchkit.patch()
        patchkit.unpatch()
    gc.collect()
    tracemalloc.start()
    start = tracemalloc.take_snapshot()
    for _ in range(1000):
        patchkit.patch("llama")
        patchkit.unpatch("llama")
    for _ in range(100):
        patchkit.patch()
        patchkit.unpatch()
    gc.collect()
    grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(start, "filename"))
    tracemalloc.stop()
    assert grown < 32 * 1024, f"{grown} bytes retained by 1100 patch/unpatch cycles"
    assert _originals() == before and all(a is b for a, b in zip(_originals().values(), before.values()))
    assert not any(isinstance(f, patcher._Finder) for f in sys.meta_path)  # no import hook left waiting
    assert _hook_counts() == hooks
    assert not patcher._applied and not any(patcher._pending.values())


def test_unpatch_in_the_middle_of_training_restores_unpatched_numbers():
    model = tiny_model(Llama)
    batch = tiny_batch(text_vocab(model.config))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    original_forward = M.LlamaForCausalLM.forward
    with patchkit.patched("llama"):
        for _ in range(3):
            out = model(**batch)
            assert out.logits is None  # the fused path
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    assert M.LlamaForCausalLM.forward is original_forward
    after = model(**batch)
    assert after.logits is not None  # transformers' own path again, on the trained weights
    twin = copy.deepcopy(model)
    torch.testing.assert_close(after.loss, twin(**batch).loss, rtol=0, atol=0)
    after.loss.backward()
    optimizer.step()


def test_save_pretrained_is_byte_identical_and_loads_unpatched(tmp_path):
    model = tiny_model(Llama)
    model.save_pretrained(tmp_path / "unpatched")
    with patchkit.patched("llama"):
        model.save_pretrained(tmp_path / "patched")
    left, right = sorted(os.listdir(tmp_path / "unpatched")), sorted(os.listdir(tmp_path / "patched"))
    assert left == right and "model.safetensors" in left
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "unpatched", tmp_path / "patched", left, shallow=False)
    assert match == left and not mismatch and not errors
    ids = tiny_batch(text_vocab(model.config))["input_ids"]
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    code = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "patched")!r}).eval()
        assert "patchkit" not in sys.modules
        with torch.no_grad():
            torch.save(model(input_ids=torch.load({str(tmp_path / "ids.pt")!r})).logits, {str(tmp_path / "out.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=0, atol=0)


# --- version drift ---------------------------------------------------------------------------

def _runs_unpatched(model):
    out = model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]]))
    return out.logits is not None and torch.isfinite(out.loss)


def test_renamed_attribute_refuses_atomically(monkeypatch):
    model, before = tiny_model(Llama), _originals()
    monkeypatch.setattr(M, "LlamaFeedForward", M.LlamaMLP, raising=False)  # a release that renamed the class
    monkeypatch.delattr(M, "LlamaMLP")
    with pytest.raises(patchkit.PatchError) as err:
        patchkit.patch("llama")
    message = str(err.value)
    assert "transformers.models.llama.modeling_llama.LlamaMLP.forward does not exist" in message
    assert f"tested with transformers {patcher.TESTED_TRANSFORMERS}" in message
    assert "mlp=False" in message and "patchkit verify" in message
    assert not patchkit.is_patched("llama")
    assert vars(M.LlamaRMSNorm)["forward"] is before["LlamaRMSNorm"]
    assert vars(M.LlamaForCausalLM)["forward"] is before["LlamaForCausalLM"]
    assert _originals()["apply_rotary_pos_emb"] is before["apply_rotary_pos_emb"]
    assert _runs_unpatched(model)


@pytest.mark.parametrize("change", ["parameter inserted", "new keyword-only parameter", "renamed option"])
def test_changed_signature_refuses_atomically(monkeypatch, change):
    model, before = tiny_model(Llama), _originals()
    original = M.apply_rotary_pos_emb

    if change == "parameter inserted":
        def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
            return original(q, k, cos, sin, unsqueeze_dim)
    elif change == "new keyword-only parameter":
        def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, *, interleaved=False):
            return original(q, k, cos, sin, unsqueeze_dim)
    else:
        def apply_rotary_pos_emb(q, k, cos, sin, head_axis=1):
            return original(q, k, cos, sin, head_axis)

    monkeypatch.setattr(M, "apply_rotary_pos_emb", apply_rotary_pos_emb)
    with pytest.raises(patchkit.PatchError) as err:
        patchkit.patch("llama")
    message = str(err.value)
    assert "apply_rotary_pos_emb(" in message and f"tested with transformers {patcher.TESTED_TRANSFORMERS}" in message
    assert "rope=False" in message
    assert M.apply_rotary_pos_emb is apply_rotary_pos_emb
    assert all(_originals()[n] is before[n] for n in ("LlamaRMSNorm", "LlamaMLP", "LlamaForCausalLM"))
    assert _runs_unpatched(model)


# --- composability ---------------------------------------------------------------------------

def test_torch_compile_of_a_patched_model_matches():
    model = tiny_model(Llama).train()
    batch = tiny_batch(text_vocab(model.config))
    expected = model(**batch).loss
    expected.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with patchkit.patched("llama"):
        compiled = torch.compile(model)
        loss = compiled(**batch).loss
        loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)


def test_to_dtype_after_patching():
    model = tiny_model(Llama)
    patchkit.patch("llama")
    model.to(torch.bfloat16)
    assert compare(Llama(), model, tiny_batch(text_vocab(model.config)), torch.bfloat16).ok
    assert patchkit.is_patched("llama")  # compare() put the patch back as it found it


def test_deepcopy_and_pickle_of_a_patched_model():
    model = tiny_model(Llama).train()
    batch = tiny_batch(text_vocab(model.config))
    with patchkit.patched("llama"):
        expected = model(**batch).loss
        for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            torch.testing.assert_close(twin(**batch).loss, expected, rtol=0, atol=0)


# --- plugins that patch what another patched ----------------------------------------------------

def test_a_second_architecture_on_the_same_attributes_is_a_reported_conflict(register_plugin):
    class Alias(Llama):
        name = "llama-alias"
        module, prefix = Llama.module, Llama.prefix

    class Winner(Alias):
        name = "llama-winner"
        module, prefix = Llama.module, Llama.prefix
        overrides = True

    class Hooks:
        @patchkit.hookimpl
        def patchkit_architectures(self):
            return [Alias, Winner]

    register_plugin(Hooks(), name="alias-plugin")
    patchkit.patch("llama")
    patched = _originals()
    with pytest.raises(patchkit.PatchError, match=r"'llama-alias' \(plugin alias-plugin\) would replace what "
                                                  r"'llama' \(plugin patchkit.architectures\) patched"):
        patchkit.patch("llama-alias")
    assert _originals() == patched and patchkit.is_patched("llama") and not patchkit.is_patched("llama-alias")
    patchkit.patch("llama-winner")  # asks to override: the llama patch is undone first
    assert patchkit.is_patched("llama-winner") and not patchkit.is_patched("llama")
    patchkit.unpatch("llama-winner")
    assert all(getattr(f, "__patchkit__", None) is None for f in _originals().values())


def test_an_architecture_whose_module_does_not_exist_is_refused(register_plugin):
    class Nowhere(Llama):
        name = "nowhere"  # module transformers.models.nowhere.modeling_nowhere: not in transformers

    class Hooks:
        @patchkit.hookimpl
        def patchkit_architectures(self):
            return [Nowhere]

    register_plugin(Hooks())
    missing = "'nowhere' names module 'transformers.models.nowhere.modeling_nowhere'"
    with pytest.raises(patchkit.PatchError, match=missing):
        patchkit.patch("nowhere")
    assert not patchkit.is_patched("nowhere")
