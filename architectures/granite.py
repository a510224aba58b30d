"""Granite: Llama with four multipliers, each stated where the decode step or the fused loss meets it.

- `embedding_multiplier` on the input embeddings (`embed`), `residual_multiplier` on each block's output
  before it joins the residual stream (`residual`); the fused training path runs transformers' own decoder
  layers, which apply both.
- `attention_multiplier` is the attention modules' `scaling`, which the decode step reads.
- `logits_scaling` divides the logits: `logit_scale` is its inverse, so the fused loss, TRL's fused head and
  the decode step all divide.
"""

from typing import ClassVar

from .llama import Llama


class Granite(Llama):
    name = "granite"
    # every multiplier away from 1, so a missing one shows in the verifier
    tiny_config: ClassVar[dict] = {"embedding_multiplier": 6.0, "residual_multiplier": 0.35,
                                   "attention_multiplier": 0.1, "logits_scaling": 4.0}

    def embed(self, backbone, tokens):
        return backbone.embed_tokens(tokens) * backbone.embedding_multiplier

    def residual(self, layer, h, out):
        return h + out * layer.residual_multiplier

    def logit_scale(self, config):
        return 1.0 / config.logits_scaling
