"""OLMo 2 for patchkit: Llama's ops, with the norm's weight multiplied in float32.

`Olmo2RMSNorm` returns `(weight * normed).to(input_dtype)`, where Llama casts before the
multiply; that is patchkit's "gemma" cast with no offset. Its q/k norms (over all heads) are
`Olmo2RMSNorm` modules too, so they go through the same fused norm. For the decode step, the two
places its decoder layer differs from Llama's: norms after attention and MLP (none before), and
q/k norms over the whole projection, before the split into heads.
"""

import patchkit
from patchkit.architectures import Llama
from patchkit.inference import project


class Olmo2(Llama):
    name = "olmo2"  # module transformers.models.olmo2.modeling_olmo2, classes Olmo2*: from the name
    tiny_config = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    norm_cast = "gemma"  # main diff with Llama: multiply in float32, cast at the end

    def decode_layer(self, layer, h, rope, state, i):  # diff: outputs normed, inputs not
        h = h + self.norm(layer.post_attention_layernorm, self.decode_attention(layer.self_attn, h, rope, state, i))
        return h + self.norm(layer.post_feedforward_layernorm, self.feed_forward(layer.mlp, h))

    def decode_qk(self, attn, x):  # diff: q/k norms over all heads, before the split
        shape = (x.shape[0], -1, attn.head_dim)
        return (self.norm(attn.q_norm, project(attn.q_proj, x)).view(shape),
                self.norm(attn.k_norm, project(attn.k_proj, x)).view(shape))


@patchkit.hookimpl
def patchkit_architectures():
    return [Olmo2]
