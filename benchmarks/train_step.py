"""Full fine-tuning step, patched vs unpatched (same as `patchkit bench train`).

    python benchmarks/train_step.py [--rounds 4] [--steps 2] [--json out.json]
"""

import sys

from patchkit.bench import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
