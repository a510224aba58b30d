"""transformers' own `ModelTesterMixin`, on every family, unpatched and patched.

The mixin comes from transformers' source distribution (`python tests/fetch_transformers_tests.py`, which `.ci/run`
does); its ~170 checks (training with and without gradient checkpointing, output capture, attention implementations,
save and load, resized embeddings, weight init, tied weights, ...) run on the classes transformers ships, with a
tiny config from the family's `tiny_config`. The patched class patches the family in `setUp` and unpatches in
`tearDown`; the unpatched class shows the tester itself is sound. Llama runs by default, every family with `--slow`.
"""

from __future__ import annotations

import copy
import sys
import unittest
from pathlib import Path

import pytest

import patchkit
from patchkit.parity import TINY

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
    """What `ModelTesterMixin` reads of `self.model_tester` for a decoder-only model."""

    batch_size, seq_length, is_training = 2, 7, True

    def __init__(self, arch):
        self.arch, self.values = arch, {**TINY, **arch.tiny_config}
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            setattr(self, key, self.values[key])

    def get_config(self):
        return self.arch.config_type()(**copy.deepcopy(self.values))

    def prepare_config_and_inputs_for_common(self):
        shape = [self.batch_size, self.seq_length]
        return self.get_config(), {"input_ids": ids_tensor(shape, self.vocab_size),
                                   "attention_mask": random_attention_mask(shape)}  # fmt: skip


def suite(arch, patched: bool) -> type[unittest.TestCase]:
    from transformers import MODEL_MAPPING

    causal, base = arch.model_class(), MODEL_MAPPING[arch.config_type()]

    class Suite(ModelTesterMixin, unittest.TestCase):
        all_model_classes = (base, causal)

        def setUp(self):
            self.model_tester = Tester(arch)
            if patched:
                patchkit.patch(arch.name)

        def tearDown(self):
            patchkit.unpatch()

        def test_generation_tester_mixin_inheritance(self):
            pytest.skip("GenerationTesterMixin is not in transformers' sdist (generation: tests/test_generation.py)")

    Suite.__name__ = Suite.__qualname__ = f"Test{arch.prefix}{'Patched' if patched else 'Unpatched'}"
    return Suite if arch.name == "llama" else pytest.mark.slow(Suite)


for _arch in BUILTIN:
    for _patched in (False, True):
        _cls = suite(_arch, _patched)
        globals()[_cls.__name__] = _cls
