"""`patchkit bench [train|sft|rl|decode|kernels|context|all]`: patched against unpatched, side by side.

Each benchmark alternates patched and unpatched runs in one process (their order reversed every
other round, so the machine's drift cancels), prints its own table, then one table of headline
figures: the medians, and each ratio as the median of the rounds' own ratios with their min-max
spread. The run records the machine, the versions and how busy the machine was with other
processes, and warns when that or a wide spread makes a figure suspect. `--out DIR` writes
`bench.json`, `bench.md` and `bench.png` (ratios with their spread as error bars).
"""

from __future__ import annotations

import argparse

# the options alone, in a module of their own: the command line builds its parser without importing a benchmark

SCENARIOS = ("train", "sft", "rl", "decode", "kernels", "context")
QUICK_ROUNDS = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", nargs="?", default="all", choices=[*SCENARIOS, "all"],
                        help="what to measure (default: all; `all --quick` leaves out rl and context)")
    parser.add_argument("--arch", nargs="+", default=["llama"], metavar="FAMILY",
                        help="train, sft, rl, decode: the families to measure, one after another (default: llama)")
    parser.add_argument("--quick", action="store_true",
                        help=f"small shapes, {QUICK_ROUNDS} rounds each: about 90 s on 2 cores")
    parser.add_argument("--out", metavar="DIR", help="write bench.json, bench.md and bench.png into DIR")
    parser.add_argument("--json", metavar="PATH", help="also write the whole record as JSON to PATH")
    parser.add_argument("--batch", type=int, default=4, help="train, sft: rows per step (default: 4)")
    parser.add_argument("--seq", type=int, default=512, help="train, sft: tokens per row (default: 512)")
    parser.add_argument("--vocab", type=int, default=128256, help="train: vocabulary size (default: 128256)")
    parser.add_argument("--rounds", type=int,
                        help=f"rounds of unpatched and patched runs; each ratio's median and spread are over them "
                             f"(default: 4, decode 3; {QUICK_ROUNDS} with --quick)")
    parser.add_argument("--steps", type=int, default=2,
                        help="train, sft, rl: timed steps per variant per round (default: 2)")
    parser.add_argument("--only", choices=["lora", "full", "grpo", "dpo"],
                        help="sft: lora or full; rl: grpo or dpo (default: both)")
    parser.add_argument("--qlora", action="store_true",
                        help="sft: QLoRA (LoRA over a 4-bit nf4 base) patched against unpatched QLoRA, beside fp32 "
                             "LoRA, in one run (needs bitsandbytes)")
    parser.add_argument("--compile", action="store_true",
                        help="train: torch.compile patched and unpatched too (on in `all`, unless --quick)")
    parser.add_argument("--sizes", nargs="+", default=["20M", "125M"], choices=["20M", "125M"],
                        help="decode: model sizes (default: 20M 125M)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="decode: batch sizes (default: 1 8)")
    parser.add_argument("--new-tokens", type=int, default=128, help="decode: tokens generated per row (default: 128)")
    parser.add_argument("--cap-gib", type=float, default=8.0, help="context: the memory cap in GiB (default: 8)")
    parser.add_argument("--device", help="kernels: cuda or cpu (default: cuda if there is one)")
    parser.add_argument("--dtype", help="kernels: float32 or bfloat16 (default: bf16 on cuda, fp32 on cpu)")
