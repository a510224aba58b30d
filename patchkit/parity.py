"""Parity harness: a tiny random model of an architecture, run unpatched and patched.

Compares logits (eval), loss and every parameter's gradient (train), the loss of a batch whose labels are
all ignored (NaN, as transformers gives it: NaN in the same places counts as equal), the logits of
decode steps after unpadded, left-padded and right-padded prompts against one full forward, and TRL's
`fused_lm_head=True` call (per-token log-probs and entropy) against the unpatched logits. Each replaced
module forward (norms, MLPs, RoPE) is also compared with its original on the inputs the model gives it
(`module ...` rows: in bfloat16 one rounding apart already shows, so an RMSNorm cast that is not the
family's fails there), and the kernels that served each op are reported: an op whose replacement ran the
original without a reason the architecture declares (`fallbacks`), or never ran, fails. The error of a tensor is
max|patched - reference| / max|reference|. float32 must agree within 1e-5 (logits) and 1e-4
(loss and gradients, which pass through the fused cross-entropy). In bfloat16 the reference is
the float32 model, and the patched error may be at most twice the unpatched bf16 model's own
(and never less than one bf16 ulp).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from . import patcher
from .vision import vision_language
from .architecture import Architecture

TINY = dict(vocab_size=211, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False)
FP32_TOL = {"logits": 1e-5, "decode": 1e-5, "loss": 1e-4, "grad": 1e-4, "trl": 1e-4, "module": 1e-5}
# the kernels that serve each built-in op (the report counts their calls); ops not listed are not checked
OP_KERNELS = {"rms_norm": ("rms_norm",), "rope": ("apply_rope",), "mlp": ("swiglu", "geglu", "lora_mlp"),
              "experts": ("swiglu", "geglu"), "cross_entropy": ("fused_linear_cross_entropy", "linear_log_probs")}
MODULE_OPS = ("rms_norm", "rope", "mlp")  # ops whose replaced forwards get a `module` row
DECODE_STEPS = 6  # the batch's last tokens, fed one at a time to the inference path
DECODE_LAYOUTS = ("unpadded", "left-padded", "right-padded")


@dataclass
class Row:
    tensor: str
    max_abs: float
    rel: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.rel <= self.tol  # NaN fails


@dataclass
class Result:
    architecture: str
    dtype: str
    backend: str
    rows: list[Row] = field(default_factory=list)
    kernels: dict[str, str] = field(default_factory=dict)  # op -> what served it
    problems: list[str] = field(default_factory=list)  # ops that fell back without a declared reason, or never ran

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows) and not self.problems

    def table(self) -> str:
        width = max(len(r.tensor) for r in self.rows)
        lines = [f"{self.architecture} ({self.dtype}, backend={self.backend}): {'OK' if self.ok else 'MISMATCH'}",
                 f"  {'tensor':<{width}}  {'max abs diff':>12}  {'rel diff':>9}  {'tol':>8}"]
        for r in self.rows:
            lines.append(f"  {r.tensor:<{width}}  {r.max_abs:12.3e}  {r.rel:9.2e}  {r.tol:8.1e}"
                         f"{'' if r.ok else '  <-- MISMATCH'}")
        if self.kernels:
            lines.append("  kernels:")
            lines.extend(f"    {op:<{width - 2}}  {served}" for op, served in self.kernels.items())
        lines.extend(f"  PROBLEM: {p}" for p in self.problems)
        return "\n".join(lines)


def tiny_config(arch: type[Architecture], *, head: int = 0, **overrides: Any):
    """The config of `tiny_model`: `TINY`, then `arch.tiny_config`, then `overrides`; a vision-language head's
    (`*ForConditionalGeneration`) puts them in its `text_config`, inside `arch.tiny_multimodal`."""
    values = copy.deepcopy({**TINY, **arch.tiny_config, **overrides})  # configs edit the dicts they are given
    rope = values.get("rope_parameters") or {}
    if "short_factor" in rope:  # LongRoPE: one factor per rotary frequency, so as many as the head size asks
        width = int(values["head_dim"] * values.get("partial_rotary_factor", 1.0)) // 2
        for key in ("short_factor", "long_factor"):
            rope[key] = [rope[key][i % len(rope[key])] for i in range(width)]
    model_class = arch.model_class(head=head)
    if vision_language(model_class.config_class):
        values = {**copy.deepcopy(arch.tiny_multimodal), "text_config": values,
                  "tie_word_embeddings": values["tie_word_embeddings"]}
        return model_class.config_class(**values)
    return arch.config_type()(**values)


def tiny_model(arch: type[Architecture], *, seed: int = 0, attn_implementation: str = "sdpa", head: int = 0,
               **overrides: Any):
    """A small random model of `arch`, built from its config class (no download): its `heads[head]`
    (`*ForCausalLM`; a vision-language `*ForConditionalGeneration`), of `tiny_config`.

    Families without sdpa support (Gemma 2: attention soft-capping) fall back to eager.
    """
    config = tiny_config(arch, head=head, **overrides)
    model_class = arch.model_class(head=head)
    if attn_implementation == "sdpa" and not getattr(model_class, "_supports_sdpa", True):
        attn_implementation = "eager"
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():  # norm weights start as all ones (or zeros); make the weight multiply count
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p), alpha=0.1)
    return model


def tiny_batch(vocab_size: int, *, batch: int = 3, seq: int = 19, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random ids with left padding on one row and ignored labels at the pads and a few other places."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, :4] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 5:8] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def decode_masks(batch: int, prompt: int) -> dict[str, torch.Tensor]:
    """Prompt attention masks of the three padding layouts a decode step must serve: none; left padding of two
    lengths; right padding of two lengths (the `tril` masks of transformers' generation tests, or a tokenizer
    padding on the right), one row keeping only its first 3 tokens."""
    masks = {layout: torch.ones(batch, prompt, dtype=torch.long) for layout in DECODE_LAYOUTS}
    masks["left-padded"][1, :3] = 0
    masks["left-padded"][-1, :6] = 0
    masks["right-padded"][1, -2:] = 0
    masks["right-padded"][-1, 3:] = 0
    return masks


def _reference_decode(model, ids, prompt_mask):
    """The logits the decode steps must give: one forward over the prompt and the teacher-forced tokens, at the
    positions `generate` gives them (the prompt's from its mask, then the last column's plus one per token). The
    first row is the prompt's own forward, as `generate`'s prefill runs it: a pad whose every key is masked (a
    right-padded row whose window holds only pads) attends evenly to all columns in eager attention, later ones
    included, so its logits depend on what follows it."""
    from .inference import generation_positions

    prompt, new = prompt_mask.shape[1], ids.shape[1] - prompt_mask.shape[1]
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(ids.shape[0], new)], 1)
    prompt_positions = generation_positions(model, prompt_mask)
    positions = torch.cat([prompt_positions, prompt_positions[..., -1:] + torch.arange(1, new + 1)], -1)
    first = model(input_ids=ids[:, :prompt], attention_mask=prompt_mask, position_ids=prompt_positions).logits
    steps = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, prompt:-1]
    return torch.cat([first[:, -1:], steps], 1)


def _inference_decode(model, ids, prompt_mask):
    """The inference path's logits: `generate`'s prefill, then the last tokens one decode step each."""
    from .inference import Decoding

    prompt = prompt_mask.shape[1]
    decoding = Decoding.prefill(model, ids[:, :prompt], prompt_mask, ids.shape[1] - prompt)
    return torch.stack([decoding.logits, *(decoding.step(ids[:, t]) for t in range(prompt, ids.shape[1] - 1))], 1)


def _reference_head(model, batch):
    """TRL's fused-head outputs from the logits: per-token log-probs of the next label and entropy, 0 at ignored."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    logp = logits.log_softmax(-1)
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    entropy = -(logp.exp() * logp).sum(-1)
    return picked.masked_fill(~mask, 0), entropy.masked_fill(~mask, 0)


def _patched_head(model, batch):
    out = model(**batch, fused_lm_head=True)
    return out.log_probs.float(), out.entropy.float()


def _run(model, batch, decode=_reference_decode, head=_reference_head) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.train()
    # a mixture of experts: its router's auxiliary loss joins the training loss (transformers' generate cannot have
    # it on in the config)
    router = {"output_router_logits": True} if hasattr(model.config.get_text_config(), "output_router_logits") else {}
    loss = model(**batch, **router).loss
    loss.backward()
    out = {"loss": loss.detach().float()}
    with torch.no_grad():  # a batch with nothing to learn: transformers' loss is NaN, and so must patchkit's be
        ignored = {**batch, "labels": torch.full_like(batch["labels"], -100)}
        out["loss all-ignored"] = model(**ignored, **router).loss.float()
    model.eval()
    ids = batch["input_ids"]
    with torch.no_grad():
        out["logits"] = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        for layout, mask in decode_masks(ids.shape[0], ids.shape[1] - DECODE_STEPS).items():
            out[f"decode {layout}"] = decode(model, ids, mask).float()
        if head is not None:
            out["trl log_probs"], out["trl entropy"] = head(model, batch)
    out.update({f"grad {n}": p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
    return out


def _err(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Max abs and relative difference; NaN where the two are not NaN in the same places."""
    nan = ref.isnan()
    if not torch.equal(a.isnan(), nan):
        return float("nan"), float("nan")
    a, ref = a[~nan], ref[~nan]
    if ref.numel() == 0:
        return 0.0, 0.0
    diff = (a - ref).abs().max().item()
    return diff, diff / max(ref.abs().max().item(), 1e-30)


def _trl_head() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def _patched_run(arch: Architecture, model, batch, served=None):
    from . import kernels as K

    head = _patched_head if _trl_head() and arch.enabled.get("cross_entropy") else None  # TRL calls the patched head
    prior = patcher.state(arch.name)
    with patcher.lock:
        patcher.restore(arch.name)
        try:
            reference = _run(model, batch, head=head and _reference_head)
            patcher.apply(arch)
            try:
                with K.serving() as record:
                    result = _run(model, batch, _inference_decode, head)
                if served is not None:
                    served.append(record)
            finally:
                patcher.restore(arch.name)
        finally:
            if prior is not None:
                patcher.apply(prior.arch)
    return reference, result


def _spy(owner, attr, key, calls):
    """Replace `owner.attr` by a function that records its first call per input rank under `key`; returns the
    undo."""
    original = getattr(owner, attr)
    own = vars(owner).get(attr, patcher._MISSING) if isinstance(owner, type) else original

    def spy(*args, **kwargs):
        ranks = tuple(a.dim() for a in args if isinstance(a, torch.Tensor))
        if (key, ranks) not in calls:  # the first sequence is enough to show a rounding, and cheap to interpret
            first = tuple(a[:1] if isinstance(a, torch.Tensor) and a.dim() >= 3 else a for a in args)
            calls[key, ranks] = (original, first, kwargs)
        return original(*args, **kwargs)

    setattr(owner, attr, spy)
    return lambda: delattr(owner, attr) if own is patcher._MISSING else setattr(owner, attr, own)


def module_rows(arch: Architecture, model, batch, dtype: torch.dtype) -> list[Row]:
    """Each replaced forward (norms, MLPs, RoPE) of an unpatched `model` against its original, on the inputs one
    forward gives it (one call per input rank: a q/k norm's 4-D input is its own row). fp32 within 1e-5; lower
    precision within a quarter of its epsilon, where one rounding apart (an RMSNorm casting where the family's does
    not) is already off by half of it."""
    module = arch.load_module()
    calls: dict = {}
    undo = []
    factories = {}
    try:
        for op, path, factory in arch.targets():
            if op in MODULE_OPS:
                undo.append(_spy(*patcher._resolve(module, path, arch, op), path, calls))
                factories[path] = functools.partial(patcher.make, module, path, factory)
        with torch.no_grad():
            model.eval()(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for restore in reversed(undo):
            restore()
    tol = FP32_TOL["module"] if dtype == torch.float32 else torch.finfo(dtype).eps / 4
    rows = []
    with torch.no_grad():
        for (path, ranks), (original, args, kwargs) in sorted(calls.items(), key=lambda c: c[0]):
            ref, out = original(*args, **kwargs), factories[path](original)(*args, **kwargs)
            ref, out = (torch.cat([t.float().flatten() for t in (x if isinstance(x, tuple) else (x,))])
                        for x in (ref, out))
            rows.append(Row(f"module {path} ({ranks[0]}-D{'' if dtype == torch.float32 else ', ' + str(dtype)[6:]})",
                            *_err(out, ref), tol))
    return rows


def kernel_report(arch: Architecture, served) -> tuple[dict[str, str], list[str]]:
    """What served each enabled op in a patched run (`kernels.Served`), and the ops that fell back without a
    declared reason (`arch.fallbacks`) or never ran a kernel."""
    report, problems = {}, []
    for op in arch.ops():
        if not arch.enabled.get(op):
            continue
        kernels = {k: served.kernels[k] for k in OP_KERNELS.get(op, ()) if served.kernels[k]}
        falls = {reason: n for (o, reason), n in served.fallbacks.items() if o == op}
        parts = [f"{k} x{n}" for k, n in kernels.items()] + [f"fallback x{n}: {r}" for r, n in falls.items()]
        report[op] = ", ".join(parts) or ("-" if op in OP_KERNELS else "(not counted)")
        if falls and op not in arch.fallbacks:
            problems.append(f"{op} ran the original ({'; '.join(falls)}) and {type(arch).__name__}.fallbacks "
                            "declares no reason")
        elif op in OP_KERNELS and not kernels and op not in arch.fallbacks:
            problems.append(f"{op} is patched but no kernel of it ran ({', '.join(OP_KERNELS[op])})")
    return report, problems


def compare(arch: Architecture, model, batch: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> Result:
    """Run `model` on `batch` unpatched and patched with `arch`, and tabulate the differences."""
    result = Result(arch.name, str(dtype).replace("torch.", ""), arch.backend)
    served: list = []
    if dtype == torch.float32:
        reference, patched = _patched_run(arch, model.float(), batch, served)
        tolerance = {name: FP32_TOL[name.split()[0]] for name in reference}
    else:
        exact, _ = _patched_run(arch, copy.deepcopy(model).float(), batch)
        reference, patched = _patched_run(arch, model.to(dtype), batch, served)
        ulp = torch.finfo(dtype).eps  # a lucky-close unpatched scalar must not set a bar below one ulp
        tolerance = {name: max(2 * _err(reference[name], exact[name])[1], ulp) for name in exact}
        reference = exact
    for name, ref in reference.items():
        result.rows.append(Row(name, *_err(patched[name], ref), tolerance[name]))
    with patcher.lock:
        prior = patcher.state(arch.name)
        patcher.restore(arch.name)
        try:
            result.rows.extend(module_rows(arch, model, batch, dtype))
            if dtype == torch.float32:  # where one rounding shows: a cast that is not the family's fails here
                result.rows.extend(module_rows(arch, copy.deepcopy(model).to(torch.bfloat16), batch, torch.bfloat16))
        finally:
            if prior is not None:
                patcher.apply(prior.arch)
    result.kernels, result.problems = kernel_report(arch, served[0])
    return result


def verify_one(arch_cls: type[Architecture], *, backend: str = "auto", dtype: torch.dtype = torch.float32,
               seed: int = 0, attn_implementation: str = "sdpa", **ops: bool) -> Result:
    model = tiny_model(arch_cls, seed=seed, attn_implementation=attn_implementation)
    return compare(arch_cls(backend, ops), model, tiny_batch(text_vocab(model.config)), dtype)


def text_vocab(config) -> int:
    """The ids a tiny batch draws from: the text vocabulary, below a vision-language model's image tokens."""
    if not vision_language(config):
        return config.vocab_size
    special = [v for k, v in config.to_dict().items() if k.endswith(("token_id", "token_index")) and
               isinstance(v, int) and k not in ("pad_token_id", "bos_token_id", "eos_token_id")]
    return min([config.get_text_config().vocab_size, *special])


def verify(target: Any = None, *, backend: str = "auto", dtype: str | torch.dtype = torch.float32,
           **kwargs: Any) -> list[Result]:
    """Run `verify_one` for every architecture of `target` (None: all registered)."""
    from . import _resolve

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return [verify_one(arch, backend=backend, dtype=dtype, **kwargs) for arch in _resolve(target)]
