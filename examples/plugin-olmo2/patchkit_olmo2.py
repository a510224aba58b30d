"""OLMo 2 for patchkit: Llama's ops, with the norm's weight multiplied in float32.

`Olmo2RMSNorm` returns `(weight * normed).to(input_dtype)`, where Llama casts before the
multiply; that is patchkit's "gemma" cast with no offset. Its q/k norms (over all heads) are
`Olmo2RMSNorm` modules too, so they go through the same fused norm.
"""

import patchkit
from patchkit.architectures import Llama


class Olmo2(Llama):
    name = "olmo2"  # module transformers.models.olmo2.modeling_olmo2, classes Olmo2*: from the name
    tiny_config = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    norm_cast = "gemma"  # main diff with Llama: multiply in float32, cast at the end


@patchkit.hookimpl
def patchkit_architectures():
    return [Olmo2]
