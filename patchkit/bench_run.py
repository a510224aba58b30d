"""`patchkit bench [train|sft|decode|kernels|context|all] [--arch ...] [--quick] [--out DIR]`.

Runs the benchmarks (each alternates patched and unpatched runs in one process, so the machine's
drift cancels), prints each one's own table, then one table of medians and ratios; `--out DIR`
writes it as `bench.json`, `bench.md` and `bench.png` (speed-up and memory ratio per
architecture and scenario).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch

from patchkit.products import proc_field

SCENARIOS = ("train", "sft", "decode", "kernels", "context")
QUICK_TRAIN = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=688, vocab_size=32000, max_position_embeddings=2048)


def _jobs(args) -> list[tuple[str, str]]:
    scenarios = [s for s in SCENARIOS if s != "context" or not args.quick] if args.scenario == "all" \
        else [args.scenario]
    return [(s, arch) for s in scenarios for arch in (args.arch if s in ("train", "sft", "decode") else ["llama"])]


def _run_one(scenario: str, arch: str, args, progress) -> dict:
    from patchkit import bench, bench_context, bench_decode, bench_kernels, bench_sft

    quick = args.quick
    if scenario == "train":
        dims = QUICK_TRAIN if quick else {**bench.TRAIN, "vocab_size": args.vocab}
        return bench.train(arch, batch=2 if quick else args.batch, seq=256 if quick else args.seq, dims=dims,
                           rounds=2 if quick else args.rounds, steps=1 if quick else args.steps, progress=progress,
                           compile=args.compile or (args.scenario == "all" and not quick))
    if scenario == "sft":
        scenarios = ("lora",) if quick else (args.only,) if args.only else ("lora", "full")
        return bench_sft.run(steps=1 if quick else args.steps, rounds=2 if quick else args.rounds,
                             batch=2 if quick else args.batch, seq=256 if quick else args.seq, scenarios=scenarios,
                             dims={**bench_sft.MODEL, "vocab_size": 32000} if quick else bench_sft.MODEL,
                             arch=arch, progress=progress)
    if scenario == "decode":
        variants = ("unpatched", "for_inference model.generate") if quick else bench_decode.VARIANTS
        return bench_decode.run(sizes=("20M",) if quick else args.sizes, batches=args.batches,
                                new=32 if quick else args.new_tokens, rounds=1 if quick else min(args.rounds, 3),
                                variants=variants, arch=arch, progress=progress)
    if scenario == "kernels":
        return bench_kernels.run(args.device, args.dtype, reps=3 if quick else args.rounds)
    return bench_context.run(cap_gib=args.cap_gib, progress=progress)


def _report(summary: dict) -> str:
    from patchkit import bench, bench_context, bench_decode, bench_kernels, bench_sft

    module = {"train": bench, "sft": bench_sft, "decode": bench_decode, "kernels": bench_kernels,
              "context": bench_context}[summary["scenario"]]
    return module.report(summary)


def rows(summary: dict) -> list[dict]:
    """The headline figures of one benchmark: (scenario, arch, metric, unpatched, patched, ratio, kind)."""
    out = []

    def add(name, arch, metric, unpatched, patched, kind):
        out.append({"scenario": name, "arch": arch, "metric": metric, "unpatched": unpatched, "patched": patched,
                    "ratio": patched / unpatched if unpatched else float("nan"), "kind": kind})

    scenario = summary["scenario"]
    if scenario == "train":
        u, p = summary["unpatched"], summary["patched"]
        add("train", summary["arch"], "tokens/s", u["tokens_per_s"], p["tokens_per_s"], "speed")
        add("train", summary["arch"], "MFU", u["mfu"], p["mfu"], "info")
        add("train", summary["arch"], "peak RSS (GiB)", u["peak_gib"], p["peak_gib"], "memory")
        if "compiled patched" in summary:
            u, p = summary["compiled unpatched"], summary["compiled patched"]
            add("train compiled", summary["arch"], "tokens/s", u["tokens_per_s"], p["tokens_per_s"], "speed")
            add("train compiled", summary["arch"], "peak RSS (GiB)", u["peak_gib"], p["peak_gib"], "memory")
            add("train compiled", summary["arch"], "memory above weights+optimizer (GiB)", u["model_added_gib"],
                p["model_added_gib"], "memory")
    elif scenario == "sft":
        for name in ("lora", "full"):
            if name in summary:
                u, p = summary[name]["unpatched"], summary[name]["patched"]
                add(f"sft {name}", summary["arch"], "tokens/s", u["tokens_per_s"], p["tokens_per_s"], "speed")
                add(f"sft {name}", summary["arch"], "MFU", u["mfu"], p["mfu"], "info")
                add(f"sft {name}", summary["arch"], "peak RSS (GiB)", u["peak_gib"], p["peak_gib"], "memory")
    elif scenario == "decode":
        for r in summary["rows"]:
            add(f"decode {r['size']} b{r['batch']}", r["arch"], "tokens/s", r["tok_s"]["unpatched"],
                r["tok_s"]["for_inference model.generate"], "speed")
    elif scenario == "kernels":
        for r in summary["rows"]:
            if r["impl"] != "unfused" and r["impl"] == ("torch" if summary["device"] == "cpu" else r["impl"]):
                base = next(b for b in summary["rows"] if b["op"] == r["op"] and b["impl"] == "unfused")
                add(f"kernel {r['op']} ({r['impl']})", "-", "ms (fwd+bwd)", base["ms"], r["ms"], "time")
                add(f"kernel {r['op']} ({r['impl']})", "-", "peak MiB added", base["peak_mib"], r["peak_mib"], "memory")
    elif scenario == "context":
        for r in summary["rows"]:
            add(f"context {r['fine_tune']}", "llama", f"longest tokens under {summary['cap_gib']:g} GiB",
                r["unpatched"], r["patched"], "length")
    return out


def _fmt(value: float, metric: str) -> str:
    if metric == "MFU":
        return f"{value:.0%}"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def markdown(table: list[dict]) -> str:
    lines = ["| scenario | arch | metric | unpatched | patched | patched / unpatched |", "|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['scenario']} | {r['arch']} | {r['metric']} | {_fmt(r['unpatched'], r['metric'])} | "
                     f"{_fmt(r['patched'], r['metric'])} | {r['ratio']:.2f}x |")
    return "\n".join(lines)


def plot(table: list[dict], path: Path) -> None:
    """Two bar charts: speed-up (higher is better) and memory ratio (lower is better), per arch and scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = [r for r in table if r["kind"] in ("speed", "length")]
    speed += [{**r, "ratio": 1 / r["ratio"]} for r in table if r["kind"] == "time"]  # a time ratio, inverted
    memory = [r for r in table if r["kind"] == "memory"]
    fig, axes = plt.subplots(1, 2, figsize=(13, max(3.0, 0.38 * max(len(speed), len(memory), 1) + 1.5)))
    for ax, data, title, ref in ((axes[0], speed, "speed-up (patched / unpatched; context: length)", 1.0),
                                 (axes[1], memory, "peak memory (patched / unpatched)", 1.0)):
        labels = [r["scenario"] if r["arch"] == "-" else f"{r['arch']} · {r['scenario']}" for r in data]
        ax.barh(range(len(data)), [r["ratio"] for r in data], color="#3a7ca5" if ax is axes[0] else "#81a63a")
        ax.set_yticks(range(len(data)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(ref, color="black", linewidth=0.8)
        ax.set_title(title, fontsize=10)
        for i, r in enumerate(data):
            ax.text(r["ratio"], i, f" {r['ratio']:.2f}x", va="center", fontsize=8)
    fig.suptitle(f"patchkit bench, {platform.node() or 'this machine'}, torch {torch.__version__}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> dict:
    import transformers

    memory = proc_field("/proc/meminfo", "MemTotal")
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "memory_gib": round(int(memory.split()[0]) / 2**20, 1) if memory else None,
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="patchkit bench", description=__doc__)
    parser.add_argument("scenario", choices=[*SCENARIOS, "all"])
    parser.add_argument("--arch", nargs="+", default=["llama"], help="train, sft, decode: architectures to compare")
    parser.add_argument("--quick", action="store_true", help="small shapes, one round each: under two minutes")
    parser.add_argument("--out", help="write bench.json, bench.md and bench.png into this directory")
    parser.add_argument("--json", help="also write the raw summaries as JSON to this path")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=128256, help="train: vocabulary size")
    parser.add_argument("--rounds", type=int, default=4, help="alternations of unpatched and patched")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    parser.add_argument("--only", choices=["lora", "full"], help="sft: one fine-tuning scenario")
    parser.add_argument("--compile", action="store_true",
                        help="train: torch.compile patched and unpatched too (on in `all`, unless --quick)")
    parser.add_argument("--sizes", nargs="+", default=["20M", "125M"], help="decode: model sizes (20M, 125M)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="decode: batch sizes")
    parser.add_argument("--new-tokens", type=int, default=128, help="decode: tokens generated per row")
    parser.add_argument("--cap-gib", type=float, default=8.0, help="context: the memory cap")
    parser.add_argument("--device", help="kernels: cuda or cpu (default: cuda if there is one)")
    parser.add_argument("--dtype", help="kernels: float32 or bfloat16 (default: bf16 on cuda, fp32 on cpu)")
    args = parser.parse_args(argv)
    from tqdm.auto import tqdm

    jobs = _jobs(args)
    summaries, table = [], []
    with tqdm(jobs, desc="patchkit bench", unit="benchmark", file=sys.stderr) as bar:
        for scenario, arch in bar:
            bar.set_postfix_str(f"{scenario} {arch}")
            summary = _run_one(scenario, arch, args, lambda line: bar.set_postfix_str(line[:70]))
            summaries.append(summary)
            table += rows(summary)
            bar.write(_report(summary) + "\n", file=sys.stdout)
    print(markdown(table))
    record = {"command": "patchkit bench " + " ".join(argv if argv is not None else sys.argv[2:]),
              "machine": machine(), "table": table, "summaries": summaries}
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(record, indent=2))
        (out / "bench.md").write_text(f"{record['command']}\n\n{json.dumps(record['machine'])}\n\n{markdown(table)}\n")
        try:
            plot(table, out / "bench.png")
        except ImportError:
            print("patchkit bench: no plot without matplotlib: pip install 'patchkit[bench]'", file=sys.stderr)
        print(f"\nwrote {', '.join(str(p) for p in sorted(out.glob('bench.*')))}")
    return 0
