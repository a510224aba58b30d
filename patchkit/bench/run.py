"""`patchkit bench`: runs the scenarios, tabulates and plots their figures, records the machine."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import context, decode, kernels, rl, sft, train
from .machine import Load, describe, warnings
from .models import TRAIN
from . import options
from .options import QUICK_ROUNDS, SCENARIOS
from .stats import ratio

MODULES = {"train": train, "sft": sft, "rl": rl, "decode": decode, "kernels": kernels, "context": context}
QUICK_TRAIN = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=688, vocab_size=32000, max_position_embeddings=2048)


def _jobs(args) -> list[tuple[str, str]]:
    scenarios = [s for s in SCENARIOS if s not in ("rl", "context") or not args.quick] if args.scenario == "all" \
        else [args.scenario]
    return [(s, arch) for s in scenarios
            for arch in (args.arch if s in ("train", "sft", "rl", "decode") else ["llama"])]


def _run_one(scenario: str, arch: str, args, progress) -> dict:
    quick = args.quick
    rounds = args.rounds or (QUICK_ROUNDS if quick else 3 if scenario == "decode" else 4)
    if scenario == "train":
        dims = QUICK_TRAIN if quick else {**TRAIN, "vocab_size": args.vocab}
        return train.train(arch, batch=2 if quick else args.batch, seq=256 if quick else args.seq, dims=dims,
                           rounds=rounds, steps=1 if quick else args.steps, progress=progress,
                           compile=args.compile or (args.scenario == "all" and not quick))
    if scenario == "sft":
        only = args.only if args.only in ("lora", "full") else None
        scenarios = ("qlora", "lora") if args.qlora else ("lora",) if quick else (only,) if only else ("lora", "full")
        return sft.run(steps=1 if quick else args.steps, rounds=rounds, batch=2 if quick else args.batch,
                       seq=256 if quick else args.seq, scenarios=scenarios,
                       dims={**sft.MODEL, "vocab_size": 32000} if quick else sft.MODEL, arch=arch, progress=progress)
    if scenario == "rl":
        only = args.only if args.only in rl.SCENARIOS else None
        return rl.run(steps=1 if quick else args.steps, rounds=rounds, scenarios=(only,) if only else rl.SCENARIOS,
                      dims={**sft.MODEL, "vocab_size": 32000} if quick else sft.MODEL, arch=arch, quick=quick,
                      progress=progress)
    if scenario == "decode":
        variants = ("unpatched", "for_inference model.generate") if quick else decode.VARIANTS
        return decode.run(sizes=("20M",) if quick else args.sizes, batches=args.batches,
                          new=32 if quick else args.new_tokens, rounds=rounds, variants=variants, arch=arch,
                          progress=progress)
    if scenario == "kernels":
        return kernels.run(args.device, args.dtype, reps=rounds)
    return context.run(cap_gib=args.cap_gib, progress=progress)


def rows(summary: dict) -> list[dict]:
    """The headline figures of one benchmark: scenario, arch, metric, the unpatched and patched medians, the
    ratio (median over rounds of patched / unpatched) with its spread (lo, hi), and its kind."""
    out = []

    def add(name, arch, metric, u, p, key, kind):
        """`u`, `p`: the variants' figures, with their `samples` (or plain numbers measured once)."""
        su, sp = (u["samples"][key], p["samples"][key]) if isinstance(u, dict) else ([u], [p])
        out.append({"scenario": name, "arch": arch, "metric": metric, "unpatched": u[key] if isinstance(u, dict)
                    else u, "patched": p[key] if isinstance(p, dict) else p, **ratio(su, sp), "kind": kind})

    scenario = summary["scenario"]
    if scenario == "train":
        pairs = [("train", summary["unpatched"], summary["patched"])]
        if "compiled patched" in summary:
            pairs.append(("train compiled", summary["compiled unpatched"], summary["compiled patched"]))
        for name, u, p in pairs:
            add(name, summary["arch"], "tokens/s", u, p, "tokens_per_s", "speed")
            add(name, summary["arch"], "MFU", u, p, "mfu", "info")
            add(name, summary["arch"], "peak RSS (GiB)", u, p, "peak_gib", "memory")
            add(name, summary["arch"], "memory above weights+optimizer (GiB)", u, p, "model_added_gib", "memory")
    elif scenario == "sft":
        for name in sft.SCENARIOS:
            if name in summary:
                u, p = summary[name]["unpatched"], summary[name]["patched"]
                add(f"sft {name}", summary["arch"], "tokens/s", u, p, "tokens_per_s", "speed")
                add(f"sft {name}", summary["arch"], "MFU", u, p, "mfu", "info")
                add(f"sft {name}", summary["arch"], "peak RSS (GiB)", u, p, "peak_gib", "memory")
    elif scenario == "rl":
        for name in rl.SCENARIOS:
            if name in summary:
                u, p = summary[name]["unpatched"], summary[name]["patched"]
                add(name, summary["arch"], "steps/s", u, p, "steps_per_s", "speed")
                add(name, summary["arch"], "peak RSS (GiB)", u, p, "peak_gib", "memory")
                add(name, summary["arch"], "memory a step adds (GiB)", u, p, "added_gib", "memory")
                if "generate_s" in u:
                    add(f"{name} generation", summary["arch"], "s/step", u, p, "generate_s", "time")
    elif scenario == "decode":
        for r in summary["rows"]:
            u = {"tok_s": r["tok_s"]["unpatched"], "samples": {"tok_s": r["samples"]["unpatched"]}}
            p = {"tok_s": r["tok_s"]["for_inference model.generate"],
                 "samples": {"tok_s": r["samples"]["for_inference model.generate"]}}
            add(f"decode {r['size']} b{r['batch']}", r["arch"], "tokens/s", u, p, "tok_s", "speed")
    elif scenario == "kernels":
        for r in summary["rows"]:
            if r["impl"] != "unfused" and r["impl"] == ("torch" if summary["device"] == "cpu" else r["impl"]):
                base = next(b for b in summary["rows"] if b["op"] == r["op"] and b["impl"] == "unfused")
                add(f"kernel {r['op']} ({r['impl']})", "-", "ms (fwd+bwd)", base, r, "ms", "time")
                add(f"kernel {r['op']} ({r['impl']})", "-", "peak MiB added", base, r, "peak_mib", "memory")
    elif scenario == "context":
        for r in summary["rows"]:
            add(f"context {r['fine_tune']}", "llama", f"longest tokens under {summary['cap_gib']:g} GiB",
                r["unpatched"], r["patched"], None, "length")
    return out


def _fmt(value: float, metric: str) -> str:
    if metric == "MFU":
        return f"{value:.0%}"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def markdown(table: list[dict]) -> str:
    lines = ["| scenario | arch | metric | unpatched | patched | patched / unpatched | spread over rounds |",
             "|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['scenario']} | {r['arch']} | {r['metric']} | {_fmt(r['unpatched'], r['metric'])} | "
                     f"{_fmt(r['patched'], r['metric'])} | {r['ratio']:.2f}x | {r['lo']:.2f}-{r['hi']:.2f} "
                     f"({r['n']}) |")
    return "\n".join(lines)


def title(record: dict) -> str:
    m = record["machine"]
    return (f"{record['command']} ({'quick' if record['quick'] else 'full'}), {m['date'][:16].replace('T', ' ')} "
            f"UTC, {m['cpu']}, {m['threads']} threads, torch {m['torch']}")


def plot(record: dict, path: Path) -> None:
    """Two bar charts: speed-up (higher is better) and memory ratio (lower is better), per arch and scenario,
    each bar the median ratio over rounds with the rounds' min-max as its error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = record["table"]
    speed = [r for r in table if r["kind"] in ("speed", "length")]
    speed += [{**r, "ratio": 1 / r["ratio"], "lo": 1 / r["hi"], "hi": 1 / r["lo"]}  # a time ratio, inverted
              for r in table if r["kind"] == "time"]
    memory = [r for r in table if r["kind"] == "memory"]
    titles = ["speed-up, patched / unpatched" + (" (context: length)" if any(r["kind"] == "length" for r in speed)
                                                 else ""), "memory, patched / unpatched"]
    fig, axes = plt.subplots(1, 2, figsize=(14, max(3.0, 0.38 * max(len(speed), len(memory), 1) + 1.8)))
    for ax, data, name, color in zip(axes, (speed, memory), titles, ("#3a7ca5", "#81a63a")):
        labels = [" · ".join(x for x in (r["arch"], r["scenario"], r["metric"] if r["kind"] == "memory" else "")
                             if x and x != "-") for r in data]
        values = [r["ratio"] for r in data]
        errors = [[v - r["lo"] for v, r in zip(values, data)], [r["hi"] - v for v, r in zip(values, data)]]
        ax.barh(range(len(data)), values, xerr=errors, color=color, ecolor="black", capsize=3)
        ax.set_yticks(range(len(data)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(name, fontsize=9)
        for i, r in enumerate(data):
            ax.text(r["hi"], i, f" {r['ratio']:.2f}x", va="center", fontsize=8)
    fig.suptitle(f"{title(record)}\nbars: the median of the rounds' ratios; whiskers: their min-max", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="patchkit bench", description=options.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_arguments(parser)
    return run(parser.parse_args(argv), argv if argv is not None else sys.argv[1:])


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from tqdm.auto import tqdm

    jobs = _jobs(args)
    summaries, table = [], []
    load = Load()
    with tqdm(jobs, desc="patchkit bench", unit="benchmark", file=sys.stderr) as bar:
        for scenario, arch in bar:
            bar.set_postfix_str(f"{scenario} {arch}")
            summary = _run_one(scenario, arch, args, lambda line: bar.set_postfix_str(line[:70]))
            summaries.append(summary)
            table += rows(summary)
            bar.write(MODULES[summary["scenario"]].report(summary) + "\n", file=sys.stdout)
    record = {"command": " ".join(["patchkit bench", *argv]), "quick": args.quick, "machine": describe(),
              "load": load.finish(), "table": table, "summaries": summaries}
    record["warnings"] = warnings(record["load"], table)
    load_line = (f"{record['load']['seconds']:.0f} s; load average {record['load']['loadavg_start']:.1f} -> "
                 f"{record['load']['loadavg_end']:.1f}; other processes used "
                 + (f"{record['load']['other_processes']:.0%}" if record["load"]["other_processes"] is not None
                    else "an unknown share") + " of the cores")
    print(f"{title(record)}\n{load_line}\n\n{markdown(table)}")
    for line in record["warnings"]:
        print(f"warning: {line}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(record, indent=2))
        notes = "".join(f"\nwarning: {line}" for line in record["warnings"])
        (out / "bench.md").write_text(f"{title(record)}\n\n{load_line}{notes}\n\n{markdown(table)}\n")
        try:
            plot(record, out / "bench.png")
        except ImportError:
            print("patchkit bench: no plot without matplotlib: pip install 'patchkit-llm[bench]'", file=sys.stderr)
        print(f"\nwrote {', '.join(str(p) for p in sorted(out.glob('bench.*')))}")
    return 0
