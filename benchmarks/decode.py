"""Token-by-token generation, float32, Llama-shaped 20 M and 125 M models, batch 1 and 8, 128 new tokens:
patchkit.generate and patched model.generate vs unpatched (dynamic and static cache), with the memory-bandwidth
limit measured in the same run (same as `patchkit bench decode`).

    python benchmarks/decode.py [--rounds 3] [--sizes 20M 125M] [--batches 1 8] [--new-tokens 128] [--json out.json]
"""

import sys

from patchkit.bench import main

if __name__ == "__main__":
    sys.exit(main(["decode", *sys.argv[1:]]))
