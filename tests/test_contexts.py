"""Everyday contexts: every family's patched forward, loss and `generate` (transformers' loop and `for_inference`'s)
where users call them, against the same calls unpatched.

Contexts: `no_grad`, `inference_mode`, `enable_grad` in eval mode, CPU autocast to bf16, a `torch.compile`d
forward, gradient checkpointing (reentrant and not), `model.half()` / `model.bfloat16()` after patching,
transformers' text-generation `pipeline`, and a model patched in one thread and called in another. float32
contexts match within the correctness standard's bounds; low-precision ones within twice the unpatched model's own
distance from float32. Greedy tokens are transformers' up to a near-tie of the reference's scores.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import pytest
import torch

import patchkit
from patchkit.parity import FP32_TOL, text_vocab, tiny_batch, tiny_model

from .families import BUILTIN

FAMILIES = pytest.mark.parametrize("arch", BUILTIN, ids=lambda a: a.name)
PROMPT, NEW = 8, 4  # prompt length of the generation calls (the batch's last row is left-padded), new tokens
LOOPS = ("transformers", "for_inference")  # generate's loops: transformers' own, and patchkit's decode loop
LOW = {"autocast": torch.bfloat16, "half": torch.float16, "bfloat16": torch.bfloat16}


def _calls(model, batch, *, outer=contextlib.nullcontext, backward=False, train=False, loops=LOOPS, light=False):
    """Every call a user makes, inside `outer()`: logits (no mask; mask; mask and positions), the loss (in training
    mode where `train`; its gradients where `backward`), greedy `generate` through transformers' loop and through
    `for_inference`'s, and seeded sampling with the global generator's state after it. `light` (a compiled forward,
    each new signature a compilation): logits with mask and positions, and greedy `generate` only."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = {}
    with outer():
        model.train(train)
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        out["loss"] = loss.detach()
        if backward:
            loss.backward()
            inner = getattr(model, "_orig_mod", model)  # a compiled wrapper's parameters, by the model's names
            out.update({f"grad {n}": p.grad for n, p in inner.named_parameters() if p.grad is not None})
        model.eval()
        if not light:
            out["logits"] = model(ids).logits
            out["logits masked"] = model(ids, attention_mask=mask).logits
        out["logits positions"] = model(ids, attention_mask=mask, position_ids=positions).logits
        prompt = {"input_ids": ids[:, :PROMPT], "attention_mask": mask[:, :PROMPT], "max_new_tokens": NEW,
                  "return_dict_in_generate": True, "output_scores": True, "pad_token_id": 0}
        for loop in loops:
            if loop == "for_inference":
                patchkit.for_inference(model)
            greedy = model.generate(**prompt, do_sample=False)
            out[f"tokens {loop}"] = (greedy.sequences, torch.stack(greedy.scores, 1))
            if light:
                continue
            torch.manual_seed(123)
            sampled = model.generate(**prompt, do_sample=True, top_k=0)
            out[f"sampled {loop}"] = (sampled.sequences, torch.get_rng_state())
        patchkit.for_training(model).eval()
    return out


def _same_tokens(got, want, margin: float, name: str):
    """Greedy sequences equal, or equal up to a step where the reference's two best scores were within `margin`."""
    (tokens, _), (expected, scores) = got, want
    differ = (tokens != expected).any(0).nonzero()
    if differ.numel():
        step = differ[0].item() - (expected.shape[1] - scores.shape[1])  # the prompt's columns come first
        top = scores[:, step].float().topk(2, dim=-1).values
        assert (top[:, 0] - top[:, 1]).min() <= margin, f"{name}: tokens differ from step {step} without a near-tie"


def _compare(got: dict, want: dict, tolerance: dict[str, float]):
    assert got.keys() <= want.keys() and any(name.startswith("tokens") for name in got)
    for name, ref in want.items():
        if name not in got:
            continue
        if name.startswith("tokens"):
            scale = ref[1].float().abs().max().item()
            _same_tokens(got[name], ref, 2 * tolerance["logits"] * scale, name)
        elif name.startswith("sampled"):
            if tolerance["logits"] <= FP32_TOL["logits"]:  # float32: transformers' samples, the same draws after
                assert torch.equal(got[name][0], ref[0]), name
                assert torch.equal(got[name][1], ref[1]), f"{name}: the global generator moved otherwise"
        else:
            err = (got[name].float() - ref.float()).abs().max().item()
            bound = tolerance[name.split()[0]] * ref.float().abs().max().clamp(min=1e-12).item()
            assert err <= bound, f"{name}: {err:.3g} > {bound:.3g}"


def _model(arch):
    return tiny_model(arch)


def _batch(model):
    return tiny_batch(text_vocab(model.config), batch=3, seq=PROMPT + 6)


def _in_thread(fn):
    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as err:  # re-raised in the calling thread
            box["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def _compiled(model):
    """`torch.compile(model)` as users write it (dynamo's tracing; inductor: tests/test_compile.py): the wrapper's
    forward is compiled, its `generate` is the model's own, and `for_inference` reaches the model inside."""
    torch._dynamo.reset()
    return torch.compile(model, backend="eager", dynamic=True)


def _checkpointed(model, reentrant: bool):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    return model


TRAIN = {"backward": True, "train": True}
# context -> (what it does to a model the caller made, and patched in the patched run; how `_calls` runs in it)
CONTEXTS = {
    "no_grad": (None, {"outer": torch.no_grad}),
    "inference_mode": (None, {"outer": torch.inference_mode}),
    "enable_grad_eval": (None, {"outer": torch.enable_grad, "backward": True}),
    "autocast": (None, {"outer": lambda: torch.autocast("cpu", dtype=torch.bfloat16), **TRAIN}),
    "compiled": (_compiled, {**TRAIN, "light": True}),  # the reference: transformers' eager numbers
    "checkpointing": (lambda m: _checkpointed(m, False), TRAIN),
    "checkpointing_reentrant": (lambda m: _checkpointed(m, True), TRAIN),
    "half": (lambda m: m.half(), TRAIN),  # after patching
    "bfloat16": (lambda m: m.bfloat16(), TRAIN),
    "thread": (None, {**TRAIN, "thread": True}),  # patched in this thread, called in another
}


@functools.lru_cache(maxsize=None)
def _reference(name: str) -> dict:
    """Unpatched float32 numbers of a family (every call, in training mode with gradients; the tiny models have no
    dropout, so evaluation mode's loss is the same), shared by the contexts that leave them unchanged."""
    from patchkit.plugins import manager

    model = _model(manager().architectures[name])
    return _calls(model, _batch(model), backward=True, train=True, loops=LOOPS[:1])


def _run(context, model, batch, **kw):
    prepare, options = CONTEXTS[context]
    options = {**options, **kw}
    if prepare is not None:
        model = prepare(model)
    if options.pop("thread", False):
        return _in_thread(lambda: _calls(model, batch, **options))
    return _calls(model, batch, **options)


@FAMILIES
@pytest.mark.parametrize("context", list(CONTEXTS))
def test_a_patched_model_matches_unpatched_in_every_context(arch, context):
    exact = _reference(arch.name)  # before anything is patched
    model = _model(arch)
    batch = _batch(model)
    # transformers' loop only: what both of the patched model's loops must give
    want = dict(_run(context, model, batch, loops=LOOPS[:1]) if context in LOW else exact)
    want.update({key.replace(*LOOPS): value for key, value in want.items() if LOOPS[0] in key})
    model = _model(arch)
    patchkit.patch(model)  # before the context is entered: half() and bfloat16() come after patching
    got = _run(context, model, batch)
    if context in LOW:  # the spread of the low precision: twice the unpatched model's distance from float32
        tolerance = {}
        for name, ref in exact.items():
            if isinstance(ref, torch.Tensor):
                key = name.split()[0]
                err = (want[name].float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-12)
                tolerance[key] = max(tolerance.get(key, 0.0), 2 * err.item(), torch.finfo(LOW[context]).eps)
        want = {**want, **{name: exact[name] for name in want if not name.startswith(("tokens", "sampled"))}}
    else:
        tolerance = FP32_TOL
    _compare(got, want, tolerance)


@FAMILIES
def test_text_generation_pipeline_gives_transformers_text(arch):
    from transformers import pipeline

    from patchkit import toy

    texts = []
    for variant in ("unpatched", "patched", "for_inference"):
        model = _model(arch)
        tokenizer = toy.word_tokenizer(text_vocab(model.config))
        if variant != "unpatched":
            patchkit.patch(model)
        if variant == "for_inference":
            patchkit.for_inference(model)
        generator = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
        prompts = ["w4 w9 w12 w30 w7", "w5 w6"]
        texts.append([r[0]["generated_text"] for r in generator(prompts, max_new_tokens=NEW, do_sample=False,
                                                                  batch_size=2)])
        patchkit.unpatch()
    assert texts[1] == texts[0] and texts[2] == texts[0]


@pytest.mark.parametrize("case", [("gemma3_text", 1), ("llava", 0), ("mistral3", 0), ("qwen2_5_vl", 0),
                                  ("qwen3_vl", 0)], ids=lambda c: "gemma3" if c[1] else c[0])
@pytest.mark.parametrize("outer", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_vision_language_models_with_images(case, outer):
    from patchkit.plugins import manager
    from patchkit.vision import with_images

    name, head = case
    arch = manager().architectures[name]
    model = tiny_model(arch, head=head).eval()
    inputs = with_images(model.config, tiny_batch(text_vocab(model.config), batch=2, seq=14))
    inputs.pop("labels")
    kwargs = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None,
                  return_dict_in_generate=True, output_scores=True)
    results = []
    for variant in ("unpatched", "patched", "for_inference"):
        with outer(), (patchkit.patched(model) if variant != "unpatched" else contextlib.nullcontext()):
            if variant == "for_inference":
                patchkit.for_inference(model)
            out = model.generate(**inputs, **kwargs)
            results.append((model(**inputs).logits, out.sequences, torch.stack(out.scores, 1)))
            patchkit.for_training(model).eval()
    (logits, tokens, scores), *patched = results
    for got_logits, got_tokens, _ in patched:
        assert (got_logits - logits).abs().max() <= FP32_TOL["logits"] * logits.abs().max()
        _same_tokens((got_tokens, None), (tokens, scores), 2e-5 * scores.abs().max().item(), "tokens")


def test_seeded_sampling_draws_as_transformers_where_the_decode_loop_times_its_products(monkeypatch):
    """Weights large enough to be timed (`products.MEASURED`), timed afresh: the timing draws nothing from the
    global generator, so every sampled token and the generator's state after are transformers'."""
    from patchkit import products
    from patchkit.architectures import Llama

    model = tiny_model(Llama, hidden_size=128, intermediate_size=256, head_dim=32).eval()
    ids = torch.randint(3, text_vocab(model.config), (4, 6), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=32, do_sample=True, top_k=0, pad_token_id=0, eos_token_id=None)
    runs = []
    for variant in ("transformers", "for_inference", "generate"):
        monkeypatch.setattr(products, "_ranked", {})
        torch.manual_seed(123)
        with patchkit.patched(model) if variant != "transformers" else contextlib.nullcontext():
            if variant == "generate":
                tokens = patchkit.generate(model, ids, **kwargs)
            else:
                tokens = (patchkit.for_inference(model) if variant == "for_inference" else model).generate(ids,
                                                                                                          **kwargs)
            patchkit.for_training(model).eval()
        runs.append((tokens, torch.get_rng_state()))
    assert products._ranked  # the decode loop timed its products
    for tokens, state in runs[1:]:
        assert torch.equal(tokens, runs[0][0]) and torch.equal(state, runs[0][1])


def test_for_inference_reaches_the_model_inside_a_compiled_wrapper(steps):
    from patchkit.architectures import Llama

    model = tiny_model(Llama).eval()
    ids = torch.randint(3, text_vocab(model.config), (2, 6), generator=torch.Generator().manual_seed(0))
    want = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    compiled = torch.compile(model, backend="eager")
    patchkit.for_inference(compiled)
    assert type(compiled) is torch._dynamo.eval_frame.OptimizedModule  # the wrapper keeps its class
    assert torch.equal(compiled.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0), want)
    assert len(steps) == NEW - 1  # the prefill, then patchkit's decode steps
    patchkit.for_training(compiled)
    assert type(model).__name__ == "LlamaForCausalLM" and not isinstance(model, patchkit.generation.Lean)
