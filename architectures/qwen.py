"""Qwen 2 and Qwen 3.

- Qwen2: biases on q/k/v, which stay in the `nn.Linear` projections; sliding-window layers
  only with `use_sliding_window`, in attention, untouched. Nothing of Llama's ops changes.
- Qwen3: `q_norm` / `k_norm` over `head_dim` before the transpose are `Qwen3RMSNorm`
  modules (Llama-style), so they run through the patched norm.
"""

from .llama import Llama


class Qwen2(Llama):
    name = "qwen2"


class Qwen3(Qwen2):
    name = "qwen3"
