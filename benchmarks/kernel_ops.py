"""Per-kernel forward+backward time and peak memory (same as `patchkit bench kernels`).

On a GPU: unfused PyTorch ops vs patchkit's torch and triton providers vs liger-kernel.
On CPU: unfused PyTorch ops vs the torch provider.

    python benchmarks/kernel_ops.py [--device cuda] [--dtype bfloat16] [--rounds 5] [--json out.json]
"""

import sys

from patchkit.bench import main

if __name__ == "__main__":
    sys.exit(main(["kernels", *sys.argv[1:]]))
