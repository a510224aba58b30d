"""TRL SFTTrainer, packed 4 x 512 tokens, LoRA r=16 and full fine-tuning, patched vs unpatched
(same as `patchkit bench sft`).

    python benchmarks/sft.py [--rounds 4] [--steps 2] [--only lora] [--json out.json]
"""

import sys

from patchkit.bench import main

if __name__ == "__main__":
    sys.exit(main(["sft", *sys.argv[1:]]))
