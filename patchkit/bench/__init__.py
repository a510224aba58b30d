"""Benchmarks: patched against unpatched, side by side in one process (`patchkit bench`).

One module per scenario (`train`, `sft`, `decode`, `kernels`, `context`), each with its entry point and a
`report`; `models` builds the benchmarks' models, `machine` records the machine and how busy it was, `stats`
turns paired rounds into ratios with their spread, `options` is the command line's, `run` runs them.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """`patchkit bench ARGS`, from Python (the benchmarks/ scripts)."""
    from .run import main as run_main  # the benchmarks import torch, transformers and TRL: only when run

    return run_main(argv)
