"""Helium (Kyutai) for patchkit: Llama's ops, stated as three differences from the built-in seams.

- `HeliumRMSNorm` returns `(weight.float() * normed).to(input_dtype)`, where Llama casts before the
  multiply: patchkit's "gemma" cast with no offset.
- RoPE rotates interleaved pairs (`rotate_half` over `x[..., 0::2]` and `x[..., 1::2]`): another layout
  than the fused kernels', so `OwnRope` leaves the `rope` op to transformers and rotates decode steps with
  Helium's own `apply_rotary_pos_emb`.
- Everything else (the gated MLP, the LM head's loss, the decode step) is Llama's.
"""

from typing import ClassVar

import patchkit
from patchkit.architectures import Llama
from patchkit.architectures.llama import OwnRope


class Helium(OwnRope, Llama):
    name = "helium"  # module transformers.models.helium.modeling_helium, classes Helium*: from the name
    tiny_config: ClassVar[dict] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    norm_cast = "gemma"  # main diff with Llama: multiply in float32, cast at the end


@patchkit.hookimpl
def patchkit_architectures():
    return [Helium]
