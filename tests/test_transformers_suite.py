"""transformers' own `ModelTesterMixin`, on every family, unpatched and patched.

The mixin comes from transformers' source distribution (`python tests/fetch_transformers_tests.py`, which `.ci/run`
does); its ~170 checks (training with and without gradient checkpointing, output capture, attention implementations,
save and load, resized embeddings, weight init, tied weights, ...) run on the classes transformers ships, with a
tiny config from the family's `tiny_config`. The patched class patches the family in `setUp` and unpatches in
`tearDown`; the unpatched class shows the tester itself is sound. Llama runs by default, every family with `--slow`.
"""

from __future__ import annotations

import sys
import unittest
from pathlib import Path

import pytest

import patchkit
from patchkit.parity import text_vocab, tiny_config
from patchkit.plugins import manager
from patchkit.vision import vision_language, with_images

from .families import BUILTIN

SUITE = Path(__file__).resolve().parent.parent / ".transformers-tests"
if not (SUITE / "transformers_tests" / "test_modeling_common.py").exists():
    pytest.skip(f"transformers' common tests not fetched: python {Path(__file__).parent}/fetch_transformers_tests.py",
                allow_module_level=True)  # fmt: skip
sys.path.insert(0, str(SUITE))
from transformers_tests.test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask  # noqa: E402

# transformers' deprecation checks (`past_key_values` -> `cache`) record FutureWarnings, which pyproject ignores
pytestmark = pytest.mark.filterwarnings("default::FutureWarning")


class Tester:
    """What `ModelTesterMixin` reads of `self.model_tester` for a decoder-only model; for a vision-language head
    (`head`), its config around the tiny text config and inputs with one image per row."""

    batch_size, is_training = 2, True

    def __init__(self, arch, head=0):
        self.arch, self.head = arch, head
        text = tiny_config(arch, head=head).get_text_config()
        self.seq_length = 12 if head_is_multimodal(arch, head) else 7  # room for an image's tokens
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            setattr(self, key, getattr(text, key))

    def get_config(self):
        return tiny_config(self.arch, head=self.head)

    def prepare_config_and_inputs_for_common(self):
        config, shape = self.get_config(), [self.batch_size, self.seq_length]
        inputs = {"input_ids": ids_tensor(shape, text_vocab(config)), "attention_mask": random_attention_mask(shape)}
        if head_is_multimodal(self.arch, self.head):
            inputs = with_images(config, {**inputs, "labels": inputs["input_ids"]}, at=2)
            inputs.pop("labels")
            inputs["attention_mask"][:] = 1  # an image's tokens are never padding
        return config, inputs


# what transformers' mixin asks of a vision-language model that its tiny one fails unpatched (transformers' own
# vision-language testers skip these); tests/test_multimodal.py checks gradient checkpointing with images instead
_UNUSED = "the vision tower's unused last parts (LLaVA's post-layernorm, SigLIP's head) get no gradient"
MULTIMODAL_SKIPS = {"test_training_gradient_checkpointing": _UNUSED,
                    "test_training_gradient_checkpointing_use_reentrant_false": _UNUSED,
                    "test_training_gradient_checkpointing_use_reentrant_true": _UNUSED,
                    "test_resize_tokens_embeddings": "shrunk below the image token's id",
                    "test_resize_embeddings_untied": "shrunk below the image token's id",
                    "test_can_capture_specific_layers_hidden_states": "LLaVA's vision features are not captured"}


def head_is_multimodal(arch, head):
    return vision_language(arch.model_class(head=head).config_class)


def suite(arch, patched: bool, head: int = 0) -> type[unittest.TestCase]:
    from transformers import MODEL_MAPPING

    causal = arch.model_class(head=head)
    base = MODEL_MAPPING[causal.config_class]

    class Suite(ModelTesterMixin, unittest.TestCase):
        all_model_classes = (base, causal)

        def setUp(self):
            self.model_tester = Tester(arch, head)
            if patched:
                patchkit.patch(arch.name)

        def tearDown(self):
            patchkit.unpatch()

        def test_generation_tester_mixin_inheritance(self):
            pytest.skip("GenerationTesterMixin is not in transformers' sdist (generation: tests/test_generation.py)")

    if head_is_multimodal(arch, head):
        for test, reason in MULTIMODAL_SKIPS.items():
            setattr(Suite, test, pytest.mark.skip(reason=f"fails unpatched too: {reason}")(lambda self: None))
    name = causal.__name__ if head else arch.prefix
    Suite.__name__ = Suite.__qualname__ = f"Test{name}{'Patched' if patched else 'Unpatched'}"
    return Suite if arch.name == "llama" else pytest.mark.slow(Suite)


# the families, and vision-language models: LLaVA (a language model of another family) and Gemma 3's (its own)
for _arch, _head in [*((a, 0) for a in BUILTIN), (manager().architectures["llava"], 0),
                     (manager().architectures["gemma3_text"], 1)]:
    for _patched in (False, True):
        _cls = suite(_arch, _patched, _head)
        globals()[_cls.__name__] = _cls
