"""Benchmarks: patched against unpatched, side by side in one process (`patchkit bench`).

One module per scenario (`train`, `sft`, `rl`, `decode`, `kernels`, `context`), each with its entry point and a
`report`; `models` builds the benchmarks' models, `machine` records the machine and how busy it was, `stats`
turns paired rounds into ratios with their spread, `options` is the command line's, `run` runs them.
"""
