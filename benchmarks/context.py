"""The longest sequence one training step (batch 1, full fine-tune and LoRA) fits in under a memory cap,
patched vs unpatched, each probe in a child process (same as `patchkit bench context`).

    python benchmarks/context.py [--cap-gib 8] [--out DIR]
"""

import sys

from patchkit.bench import main

if __name__ == "__main__":
    sys.exit(main(["context", *sys.argv[1:]]))
