"""Ratios of side-by-side measurements: the i-th unpatched and the i-th patched sample ran in the same round."""

from __future__ import annotations

import statistics


def ratio(unpatched: list[float], patched: list[float]) -> dict:
    """patched / unpatched round by round: {"ratio": median, "lo": min, "hi": max, "n": rounds}."""
    pairs = [p / u for u, p in zip(unpatched, patched) if u]
    if not pairs:
        return {"ratio": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    return {"ratio": statistics.median(pairs), "lo": min(pairs), "hi": max(pairs), "n": len(pairs)}


def medians(samples: dict[str, list[float]]) -> dict:
    """Each sampled figure's median, and the samples themselves (`samples`), for `ratio` later."""
    return {**{k: statistics.median(v) for k, v in samples.items()}, "samples": samples}


def cell(unpatched: list[float], patched: list[float]) -> str:
    """A table cell: the median ratio and its spread over rounds, e.g. `1.52x (1.40-1.61)`."""
    r = ratio(unpatched, patched)
    return f"{r['ratio']:.2f}x ({r['lo']:.2f}-{r['hi']:.2f})"


def summarised(out: dict) -> dict:
    """The variants' medians (`out["unpatched"]`, `out["patched"]`), with the steps/s speed-up and peak-memory ratio."""
    u, p = out["unpatched"]["samples"], out["patched"]["samples"]
    return {**out, "speedup": ratio(u["steps_per_s"], p["steps_per_s"])["ratio"],
            "memory_ratio": ratio(u["peak_gib"], p["peak_gib"])["ratio"]}
