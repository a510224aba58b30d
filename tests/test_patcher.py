"""Patch lifecycle: exact restore, idempotence, atomicity, import-time patching, targets, errors."""

import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import transformers.models.llama.modeling_llama as M

import patchkit
from patchkit import patcher
from patchkit.architectures import Llama
from patchkit.parity import tiny_model

# with Hugging Face `kernels` installed (transformers 5.25+) apply_rotary_pos_emb is a module: its class's forward
ROPE = ((type(M.apply_rotary_pos_emb), "forward") if isinstance(M.apply_rotary_pos_emb, torch.nn.Module)
        else (M, "apply_rotary_pos_emb"))
TARGETS = [(M.LlamaRMSNorm, "forward"), ROPE, (M.LlamaMLP, "forward"), (M.LlamaForCausalLM, "forward")]


def _originals():
    return [vars(owner)[name] if isinstance(owner, type) else getattr(owner, name) for owner, name in TARGETS]


def test_unpatch_restores_every_original_exactly():
    before = _originals()
    handle = patchkit.patch("llama")
    assert patchkit.is_patched("llama")
    after = _originals()
    assert all(a is not b for a, b in zip(after, before))
    assert all(getattr(a, "__patchkit__", None) for a in after)
    handle.unpatch()
    assert all(a is b for a, b in zip(_originals(), before))
    assert not patchkit.is_patched("llama")


def test_patch_twice_is_a_noop_and_options_repatch():
    patchkit.patch("llama")
    first = _originals()
    second = patchkit.patch("llama")
    assert all(a is b for a, b in zip(_originals(), first))  # the same options: nothing replaced again
    second.unpatch()
    assert patchkit.is_patched("llama") and all(a is b for a, b in zip(_originals(), first))
    patchkit.patch("llama", rms_norm=False)
    assert getattr(M.LlamaRMSNorm.forward, "__patchkit__", None) is None
    assert getattr(M.LlamaMLP.forward, "__patchkit__", None) is not None


def _live_ops():
    record = patcher.state("llama")
    return None if record is None else {op for op, on in record.arch.enabled.items() if on}


ALL_OPS = {"attention", "cross_entropy", "generate", "lora", "mlp", "rms_norm", "rope"}


def test_patches_stack_and_each_handle_undoes_exactly_its_own():
    before = _originals()
    first = patchkit.patch("llama")
    second = patchkit.patch("llama", rms_norm=False)  # the latest options are live
    assert _live_ops() == ALL_OPS - {"rms_norm"} and not hasattr(M.LlamaRMSNorm.forward, "__patchkit__")
    second.unpatch()  # the first handle's patch is live again, exactly as it was
    assert _live_ops() == ALL_OPS and getattr(M.LlamaRMSNorm.forward, "__patchkit__", None)
    second.unpatch()  # twice: nothing more
    assert _live_ops() == ALL_OPS
    third = patchkit.patch("llama", mlp=False)
    first.unpatch()  # a patch lower in the stack goes; the live one stays
    assert _live_ops() == ALL_OPS - {"mlp"}
    third.unpatch()
    assert _live_ops() is None and all(a is b for a, b in zip(_originals(), before))
    patchkit.patch("llama")
    patchkit.patch("llama", rope=False)
    patchkit.unpatch("llama")  # the module-level unpatch takes out every handle's patch
    assert not patchkit.is_patched("llama") and all(a is b for a, b in zip(_originals(), before))


def test_context_manager_and_nesting():
    before = _originals()
    with patchkit.patched("llama") as handle:
        assert patchkit.is_patched("llama") and handle.architectures == ["llama"]
        outer = _originals()
        with patchkit.patched("llama"):
            pass
        assert all(a is b for a, b in zip(_originals(), outer))
        with patchkit.patched("llama", rms_norm=False, backend="torch"):
            assert _live_ops() == ALL_OPS - {"rms_norm"} and patcher.state("llama").arch.backend == "torch"
            with patchkit.patched("llama", cross_entropy=False):
                assert _live_ops() == ALL_OPS - {"cross_entropy"}
            assert _live_ops() == ALL_OPS - {"rms_norm"}
        assert _live_ops() == ALL_OPS and patcher.state("llama").arch.backend == "auto"
        assert all(a is b for a, b in zip(_originals(), outer))  # the outer patch as it was, object for object
    assert all(a is b for a, b in zip(_originals(), before))


def test_missing_attribute_changes_nothing(monkeypatch):
    before = _originals()
    monkeypatch.delattr(M, "apply_rotary_pos_emb")  # what a transformers release without it looks like
    with pytest.raises(patchkit.PatchError) as err:
        patchkit.patch("llama")
    message = str(err.value)
    assert "apply_rotary_pos_emb" in message and "'llama'" in message and "transformers 5." in message
    assert "rope=False" in message
    assert M.LlamaRMSNorm.forward is before[0] and vars(M.LlamaMLP)["forward"] is before[2]
    assert vars(M.LlamaForCausalLM)["forward"] is before[3]
    assert not patchkit.is_patched("llama")
    patchkit.patch("llama", rope=False)  # the way out the message names
    assert patchkit.is_patched("llama")


def test_failing_second_architecture_rolls_back_the_first(register_plugin):
    class Broken(Llama):
        name = "broken"
        module, prefix = Llama.module, "Missing"

    class Provide:
        @patchkit.hookimpl
        def patchkit_architectures(self):
            return [Broken]

    register_plugin(Provide())
    before = _originals()
    with pytest.raises(patchkit.PatchError, match="MissingRMSNorm"):
        patchkit.patch(["llama", "broken"])
    assert all(a is b for a, b in zip(_originals(), before))
    assert not patchkit.is_patched("llama")
    patchkit.patch("llama", rms_norm=False)  # under a live patch, the failed one leaves the stack as it was
    with pytest.raises(patchkit.PatchError, match="MissingRMSNorm"):
        patchkit.patch(["llama", "broken"])
    assert _live_ops() == ALL_OPS - {"rms_norm"}


def test_unknown_target_lists_known_ones():
    with pytest.raises(patchkit.UnknownArchitectureError, match="known architectures and model types: .*llama"):
        patchkit.patch("no-such-model")
    with pytest.raises(patchkit.UnknownArchitectureError, match=r"'lama' \(did you mean 'llama'\?\)"):
        patchkit.patch("lama")
    with pytest.raises(patchkit.UnknownArchitectureError, match=r"did you mean 'qwen3'"):
        patchkit.patch("Qwen-3")
    for bad in (42, 3.5, object()):
        with pytest.raises(patchkit.UsageError, match="takes an architecture name, a model type, a config, a model"):
            patchkit.patch(bad)
    with pytest.raises(patchkit.UsageError,  # a TypeError, as Python's own for an unexpected keyword
                       match="unknown op.*the ops are attention, cross_entropy, generate, lora, mlp, rms_norm, rope"):
        patchkit.patch("llama", flash=True)
    with pytest.raises(patchkit.BackendError, match="unknown backend 'gpu'; known backends: auto, torch"):
        patchkit.patch("llama", backend="gpu")


def test_backend_that_cannot_run_on_the_device(register_plugin):
    from patchkit.kernels import Provider, rms_norm_torch

    class GpuOnly:
        @patchkit.hookimpl
        def patchkit_kernel_providers(self):
            return [Provider("gpuonly", {"rms_norm": rms_norm_torch}, devices=("cuda",))]

    register_plugin(GpuOnly())
    model = tiny_model(Llama)
    with pytest.raises(patchkit.BackendError, match="runs on cuda, not on 'cpu'.*model is on cpu"):
        patchkit.patch(model, backend="gpuonly")
    assert not patchkit.is_patched("llama")
    patchkit.patch("llama", backend="gpuonly")  # by name the device is unknown: checked at the first call
    with pytest.raises(patchkit.BackendError, match="runs on cuda, not on 'cpu'"):
        model(input_ids=torch.tensor([[1, 2, 3]]))


def test_patch_targets_config_instance_peft_and_all():
    model = tiny_model(Llama)
    assert patchkit.patch(model.config).architectures == ["llama"]
    patchkit.unpatch(model)
    assert not patchkit.is_patched(model)
    patchkit.patch(model)
    assert patchkit.is_patched("llama")
    patchkit.unpatch()
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert patchkit.patch(peft_model).architectures == ["llama"]
    assert patchkit.patch(None).architectures == patchkit.architectures()
    out = peft_model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]]))
    assert out.loss is not None and out.logits is None


def test_patching_from_many_threads_is_consistent():
    before = _originals()
    barrier = threading.Barrier(8)
    errors = []

    def worker(i):
        try:
            barrier.wait()
            for _ in range(25):
                patchkit.patch("llama", rms_norm=bool(i % 2))
                if i % 3 == 0:
                    patchkit.unpatch("llama")
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    patchkit.unpatch("llama")
    assert all(a is b for a, b in zip(_originals(), before))


def _run(code):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_patch_before_transformers_imports_the_module():
    proc = _run("""
        import sys, patchkit
        patchkit.patch("llama")
        assert "transformers.models.llama.modeling_llama" not in sys.modules, "patch imported the module"
        assert patchkit.is_patched("llama")
        from transformers import LlamaConfig, LlamaForCausalLM
        import transformers.models.llama.modeling_llama as M
        assert M.LlamaRMSNorm.forward.__patchkit__ == ("llama", "rms_norm")
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1, vocab_size=50))
        out = model(input_ids=__import__("torch").tensor([[1, 2, 3]]), labels=__import__("torch").tensor([[1, 2, 3]]))
        assert out.logits is None
        patchkit.unpatch("llama")
        assert not hasattr(M.LlamaRMSNorm.forward, "__patchkit__")
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_unpatch_before_import_cancels_the_pending_patch():
    proc = _run("""
        import patchkit
        patchkit.patch("llama"); patchkit.unpatch("llama")
        import transformers.models.llama.modeling_llama as M
        assert not hasattr(M.LlamaRMSNorm.forward, "__patchkit__")
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_patched_forward_keeps_the_signature():
    import inspect

    before = inspect.signature(M.LlamaForCausalLM.forward)
    with patchkit.patched("llama"):
        after = inspect.signature(M.LlamaForCausalLM.forward)
    assert after == before and "logits_to_keep" in after.parameters  # generate() and Trainer inspect it
