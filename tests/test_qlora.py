"""QLoRA: PEFT LoRA over bitsandbytes' 4-bit (nf4, fp4, with and without double quantization) and 8-bit bases runs
patchkit's fused projection and MLP, the base weight dequantized tile by tile (`kernels.quantized`).

Models are loaded the way users load them (`from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`,
`prepare_model_for_kbit_training`, `get_peft_model`) from a tiny random model saved here. The reference is PEFT's
own QLoRA path, unpatched, in training mode (in eval mode without gradients bitsandbytes repacks a 4-bit weight for
its bf16 CPU kernel; patchkit then leaves the layer to it, see the last tests)."""

import logging

import pytest
import torch

import patchkit
from patchkit.kernels import quantized, serving
from patchkit.parity import tiny_batch, tiny_model, text_vocab

from .families import BUILTIN, NAMES, train_step

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj"]
QUANT = {
    "nf4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> the directory of a tiny random model of that family (saved once)."""
    paths = {}

    def path(arch):
        if arch.name not in paths:
            paths[arch.name] = tmp_path_factory.mktemp(arch.name)
            tiny_model(arch).save_pretrained(paths[arch.name])
        return paths[arch.name]

    return path


def _qlora(path, quant, dtype=torch.float32):
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    options = dict(QUANT[quant])
    if "load_in_4bit" in options:
        options["bnb_4bit_compute_dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(**options),
                                                 device_map="cpu", dtype=dtype)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(1)
    targets = [t for t in TARGETS if any(n.endswith(t) for n, _ in model.named_modules())]
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(model, config).train()


def _compare(got, want, rtol):
    (out, grads), (ref_out, ref_grads) = got, want
    assert grads.keys() == ref_grads.keys() and grads and all("lora_" in n for n in grads)
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=rtol, atol=0)
    worst = max(((grads[n] - ref_grads[n]).abs().max() / ref_grads[n].abs().max()).item() for n in grads)
    assert worst <= rtol, worst


def _quantized_layers(model):
    return [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


@pytest.mark.parametrize("arch", BUILTIN, ids=NAMES)
def test_qlora_matches_peft_for_every_family(arch, saved):
    """nf4 with double quantization (QLoRA's recipe): loss and every adapter gradient equal to PEFT's own path in
    float32, and the fused ops served every adapted projection."""
    path = saved(arch)
    batch = tiny_batch(text_vocab(tiny_model(arch).config))
    ref = train_step(_qlora(path, "nf4-double"), batch)
    with patchkit.patched(arch.name):
        model = _qlora(path, "nf4-double")
        assert _quantized_layers(model)
        with serving() as served:
            got = train_step(model, batch)
    assert served.kernels["lora_linear"] + served.kernels["lora_mlp"] > 0, served.kernels
    assert not [f for f in served.fallbacks if f[0] == "lora"], served.fallbacks
    _compare(got, ref, 1e-5)


@pytest.mark.parametrize("quant", ["fp4", "int8"])
@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma2"])
def test_other_quantizations_match_peft(name, quant, saved):
    arch = next(a for a in BUILTIN if a.name == name)
    path = saved(arch)
    batch = tiny_batch(text_vocab(tiny_model(arch).config))
    ref = train_step(_qlora(path, quant), batch)
    with patchkit.patched(name):
        with serving() as served:
            got = train_step(_qlora(path, quant), batch)
    assert served.kernels["lora_linear"] > 0
    _compare(got, ref, 1e-5)


def test_the_fused_path_replaces_bitsandbytes_matmul(saved, monkeypatch):
    """Patched, no adapted layer calls bitsandbytes' own 4-bit matmul (each projection dequantizes in patchkit's
    tiles), and the frozen base gets no gradient."""
    arch = next(a for a in BUILTIN if a.name == "llama")
    path = saved(arch)
    calls, tiles = [], []
    real_matmul, real_tile = bnb.matmul_4bit, quantized.Quantized.dequantized
    monkeypatch.setattr(bnb, "matmul_4bit", lambda *a, **k: calls.append(1) or real_matmul(*a, **k))
    monkeypatch.setattr(quantized.Quantized, "dequantized", lambda self, *a: tiles.append(1) or real_tile(self, *a))
    with patchkit.patched("llama"):
        model = _qlora(path, "nf4-double")
        train_step(model, tiny_batch(text_vocab(model.config)))
    assert not calls and tiles
    assert all(not p.requires_grad and p.grad is None for m in _quantized_layers(model) for p in m.parameters())


def test_tiles_cover_the_weight_whatever_their_size(monkeypatch):
    """Small tiles (many per weight, a double-quantized absmax sliced per tile) give the whole weight's product."""
    layer = bnb.nn.Linear4bit(256, 96, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(96, 256), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True, blocksize=64)
    layer = layer.to("cpu")
    w = quantized.of(layer)
    dense = w.dequantized(torch.float32)
    x, g = torch.randn(7, 256), torch.randn(7, 96)
    for elements in (256, 256 * 5, 1 << 22):
        monkeypatch.setattr(quantized, "TILE_ELEMENTS", elements)
        torch.testing.assert_close(quantized.linear(x, w, layer.bias), x @ dense.t() + layer.bias, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(quantized.matmul(g, w), g @ dense, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(quantized.linear(x, w, layer.bias), layer(x), rtol=1e-4, atol=1e-4)


def test_adapters_saved_over_a_4bit_base_load_back(saved, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    arch = next(a for a in BUILTIN if a.name == "llama")
    path = saved(arch)
    batch = tiny_batch(text_vocab(tiny_model(arch).config))
    with patchkit.patched("llama"):
        model = _qlora(path, "nf4-double")
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        train_step(model, batch)
        optimizer.step()
        model.save_pretrained(tmp_path / "adapter")
        want = model(**batch).loss
        base = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(**QUANT["nf4-double"]),
                                                    device_map="cpu", dtype=torch.float32)
        loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").train()
        torch.testing.assert_close(loaded(**batch).loss, want)


def test_sft_trainer_qlora_patched_before_or_after_loading(saved, tmp_path):
    """TRL's SFTTrainer over a 4-bit base with LoRA: the same per-step losses patched (before loading, or after)
    as unpatched."""
    from trl import SFTConfig, SFTTrainer

    from patchkit import toy

    arch = next(a for a in BUILTIN if a.name == "llama")
    path = saved(arch)
    vocab = text_vocab(tiny_model(arch).config)
    losses = {}
    for variant in ("unpatched", "before", "after"):
        if variant == "before":
            patchkit.patch("llama")
        model = _qlora(path, "nf4-double")
        if variant == "after":
            patchkit.patch(model)
        args = SFTConfig(output_dir=str(tmp_path / variant), max_steps=3, per_device_train_batch_size=4,
                         learning_rate=1e-3, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
                         seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True, bf16=False,
                         gradient_checkpointing=False)
        trainer = SFTTrainer(model=model, args=args, train_dataset=toy.documents(24, vocab, 30, min_len=8),
                             processing_class=toy.word_tokenizer(vocab))
        trainer.train()
        losses[variant] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        patchkit.unpatch()
    assert len(losses["unpatched"]) == 3
    for variant in ("before", "after"):
        torch.testing.assert_close(torch.tensor(losses[variant]), torch.tensor(losses["unpatched"]), rtol=1e-4,
                                   atol=0)  # Adam's steps magnify float32 rounding, as in tests/test_trl.py


def test_a_repacked_or_foreign_base_runs_peft_and_says_so(saved, caplog):
    """A base patchkit cannot read (here: a layer of an unknown quantized type) keeps PEFT's forward, with one log
    line naming the type."""
    from patchkit import integrations

    class OtherQuantizedLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(8, 16), requires_grad=False)

        def forward(self, x):
            return x @ self.weight.t()

    class Layer(torch.nn.Module):
        base_layer = OtherQuantizedLinear()
        fan_in_fan_out = False

    integrations._unfused_types.clear()
    with caplog.at_level(logging.INFO, logger="patchkit"):
        assert integrations.lora_projection(Layer(), torch.randn(2, 16)) is None
        assert integrations.lora_projection(Layer(), torch.randn(2, 16)) is None
    lines = [r.getMessage() for r in caplog.records if "OtherQuantizedLinear" in r.getMessage()]
    assert len(lines) == 1 and "PEFT's own forward" in lines[0]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_dequantize_is_bitsandbytes(quant_type, dtype):
    """The Triton 4-bit dequantization (under the interpreter) against bitsandbytes' own, bit for bit: a weight
    whose size is no multiple of the kernel's block, double-quantized statistics, a tile from its middle."""
    layer = bnb.nn.Linear4bit(192, 37, bias=False, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(torch.randn(37, 192) * 3, requires_grad=False, quant_type=quant_type,
                                     compress_statistics=True, blocksize=64)
    w = quantized.of(layer.to("cpu"))
    for start, stop in ((0, 37), (4, 21)):
        packed = w.data.view(-1)[start * 96: stop * 96]
        absmax = w.absmax[start * 3: stop * 3]
        got = quantized.dequantize_4bit_triton(packed, absmax, 64, quant_type, (stop - start, 192), dtype)
        want = torch.ops.bitsandbytes.dequantize_4bit(packed, absmax, 64, quant_type, [stop - start, 192], dtype)
        assert torch.equal(got, want)


def test_a_4bit_layer_bitsandbytes_repacked_runs_peft_and_says_why(caplog):
    from patchkit import integrations

    layer = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")
    layer.weight.quant_state.packing_format_for_cpu = True  # as bitsandbytes leaves it after an inference call

    class Layer(torch.nn.Module):
        fan_in_fan_out = False

    wrapper = Layer()
    wrapper.base_layer = layer
    integrations._unfused_types.clear()
    with caplog.at_level(logging.INFO, logger="patchkit"):
        assert integrations.lora_projection(wrapper, torch.randn(2, 64)) is None
    assert any("Linear4bit" in r.getMessage() and "repacked" in r.getMessage() for r in caplog.records)


@pytest.mark.cuda
@pytest.mark.parametrize("quant", ["nf4-double", "fp4", "int8"])
def test_qlora_on_a_gpu_matches_a_dequantized_float_model(quant, saved):
    """On a GPU (bf16 compute, the Triton dequantization): patched QLoRA against the same adapters over the
    dequantized weights in plain `nn.Linear` layers, unpatched."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    arch = next(a for a in BUILTIN if a.name == "llama")
    path = saved(arch)
    options = dict(QUANT[quant])
    if "load_in_4bit" in options:
        options["bnb_4bit_compute_dtype"] = torch.bfloat16
    batch = {k: v.cuda() for k, v in tiny_batch(text_vocab(tiny_model(arch).config)).items()}

    def load():
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(**options),
                                                     device_map="cuda", dtype=torch.bfloat16)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        torch.manual_seed(1)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS[:7], lora_dropout=0.0, init_lora_weights=False)
        return get_peft_model(model, config).train()

    dense = load()
    for module in dense.modules():
        base = getattr(module, "base_layer", None)
        weight = quantized.of(base) if base is not None else None
        if weight is not None:
            linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="cuda", dtype=torch.bfloat16)
            linear.weight.data = weight.dequantized(torch.bfloat16)
            linear.weight.requires_grad_(False)
            module.base_layer = linear
    want = train_step(dense, batch)
    with patchkit.patched("llama"):
        got = train_step(load(), batch)
    _compare(got, want, 2e-2)
