"""The built-in families, in registration order: what every per-family test runs over."""

from patchkit.plugins import BUILTINS, manager

# vision-language wrappers are checked in tests/test_multimodal.py (their images, their text-only batches); LLaVA's
# and Mistral 3's language models are other families', Gemma 3's wrapper shares gemma3_text
MULTIMODAL = ["llava", "mistral3", "qwen2_5_vl", "qwen3_vl"]
BUILTIN = [a for a in manager().architectures.values() if a.__module__.startswith(BUILTINS[0])
           and a.name not in MULTIMODAL]
NAMES = [a.name for a in BUILTIN]
# one family per distinct code path, for tests too slow to run on every family by default (compilation):
# Llama, the base; Gemma 2: soft-caps, eager, post-block norms; Phi-3: fused projections, partial rotary;
# Granite: multipliers; OLMo 2: float32 rotary tables, post-norms; Cohere 2: a LayerNorm, interleaved RoPE,
# parallel blocks. `--slow` runs those tests on every family.
SPREAD = ["llama", "gemma2", "phi3", "granite", "olmo2", "cohere2"]


# Mixture-of-experts families whose dense parts are other families' (Mistral, OLMo 2, Granite): the default run
# checks them in tests/test_moe.py and tests/test_contexts.py, `--slow` in every per-family test as well (conftest)
SLOW_FAMILIES = {"mixtral", "olmoe", "granitemoe"}


def experts_class(model):
    """The class of a mixture-of-experts model's experts modules (transformers' `<Family>Experts`), or None."""
    return next((type(m) for m in model.modules() if type(m).__name__.endswith("Experts")), None)


def train_step(model, batch, **kwargs):
    """One forward and backward of `model` on `batch`: (its output, the gradients it left, by parameter name)."""
    model.zero_grad(set_to_none=True)
    out = model(**batch, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def spread(names):
    """pytest params: SPREAD's families by default, the others marked slow."""
    import pytest

    return [name if name in SPREAD else pytest.param(name, marks=pytest.mark.slow) for name in names]
