"""Parity harness: a tiny random model of an architecture, run unpatched and patched.

Compares logits (eval), loss and every parameter's gradient (train), the loss of a batch whose labels are
all ignored (NaN, as transformers gives it: NaN in the same places counts as equal), and the logits of
decode steps after unpadded, left-padded and right-padded prompts against one full forward. The error of a tensor is
max|patched - reference| / max|reference|. float32 must agree within 1e-5 (logits) and 1e-4
(loss and gradients, which pass through the fused cross-entropy). In bfloat16 the reference is
the float32 model, and the patched error may be at most twice the unpatched bf16 model's own
(and never less than one bf16 ulp).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from . import patcher
from .architecture import Architecture

TINY = dict(vocab_size=211, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False)
FP32_TOL = {"logits": 1e-5, "decode": 1e-5, "loss": 1e-4, "grad": 1e-4}
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

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)

    def table(self) -> str:
        width = max(len(r.tensor) for r in self.rows)
        lines = [f"{self.architecture} ({self.dtype}, backend={self.backend}): {'OK' if self.ok else 'MISMATCH'}",
                 f"  {'tensor':<{width}}  {'max abs diff':>12}  {'rel diff':>9}  {'tol':>8}"]
        for r in self.rows:
            lines.append(f"  {r.tensor:<{width}}  {r.max_abs:12.3e}  {r.rel:9.2e}  {r.tol:8.1e}"
                         f"{'' if r.ok else '  <-- MISMATCH'}")
        return "\n".join(lines)


def tiny_model(arch: type[Architecture], *, seed: int = 0, attn_implementation: str = "sdpa", **overrides: Any):
    """A small random `*ForCausalLM` of `arch`, built from its config class (no download).

    Families without sdpa support (Gemma 2: attention soft-capping) fall back to eager.
    """
    config = arch.config_type()(**{**TINY, **arch.tiny_config, **overrides})
    model_class = arch.model_class()
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
    positions = torch.cat([prompt_positions, prompt_positions[:, -1:] + torch.arange(1, new + 1)], 1)
    first = model(input_ids=ids[:, :prompt], attention_mask=prompt_mask, position_ids=prompt_positions).logits
    steps = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, prompt:-1]
    return torch.cat([first[:, -1:], steps], 1)


def _inference_decode(model, ids, prompt_mask):
    """The inference path's logits: `generate`'s prefill, then the last tokens one decode step each."""
    from .inference import Decoding

    prompt = prompt_mask.shape[1]
    decoding = Decoding.prefill(model, ids[:, :prompt], prompt_mask, ids.shape[1] - prompt)
    return torch.stack([decoding.logits, *(decoding.step(ids[:, t]) for t in range(prompt, ids.shape[1] - 1))], 1)


def _run(model, batch, decode=_reference_decode) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    out = {"loss": loss.detach().float()}
    with torch.no_grad():  # a batch with nothing to learn: transformers' loss is NaN, and so must patchkit's be
        out["loss all-ignored"] = model(**{**batch, "labels": torch.full_like(batch["labels"], -100)}).loss.float()
    model.eval()
    ids = batch["input_ids"]
    with torch.no_grad():
        out["logits"] = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        for layout, mask in decode_masks(ids.shape[0], ids.shape[1] - DECODE_STEPS).items():
            out[f"decode {layout}"] = decode(model, ids, mask).float()
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


def _patched_run(arch: Architecture, model, batch):
    prior = patcher.state(arch.name)
    with patcher.lock:
        patcher.restore(arch.name)
        try:
            reference = _run(model, batch)
            patcher.apply(arch)
            try:
                result = _run(model, batch, _inference_decode)
            finally:
                patcher.restore(arch.name)
        finally:
            if prior is not None:
                patcher.apply(prior.arch)
    return reference, result


def compare(arch: Architecture, model, batch: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> Result:
    """Run `model` on `batch` unpatched and patched with `arch`, and tabulate the differences."""
    result = Result(arch.name, str(dtype).replace("torch.", ""), arch.backend)
    if dtype == torch.float32:
        reference, patched = _patched_run(arch, model.float(), batch)
        tolerance = {name: FP32_TOL[name.split()[0]] for name in reference}
    else:
        exact, _ = _patched_run(arch, copy.deepcopy(model).float(), batch)
        reference, patched = _patched_run(arch, model.to(dtype), batch)
        ulp = torch.finfo(dtype).eps  # a lucky-close unpatched scalar must not set a bar below one ulp
        tolerance = {name: max(2 * _err(reference[name], exact[name])[1], ulp) for name in exact}
        reference = exact
    for name, ref in reference.items():
        result.rows.append(Row(name, *_err(patched[name], ref), tolerance[name]))
    return result


def verify_one(arch_cls: type[Architecture], *, backend: str = "auto", dtype: torch.dtype = torch.float32,
               seed: int = 0, attn_implementation: str = "sdpa", **ops: bool) -> Result:
    model = tiny_model(arch_cls, seed=seed, attn_implementation=attn_implementation)
    return compare(arch_cls(backend, ops), model, tiny_batch(model.config.vocab_size), dtype)


def verify(target: Any = None, *, backend: str = "auto", dtype: str | torch.dtype = torch.float32,
           **kwargs: Any) -> list[Result]:
    """Run `verify_one` for every architecture of `target` (None: all registered)."""
    from . import _resolve

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return [verify_one(arch, backend=backend, dtype=dtype, **kwargs) for arch in _resolve(target)]
