"""`patchkit bench`: the quick run end to end, its JSON, Markdown and plot, each ratio the median of its rounds with
their spread, the machine and its load recorded, warnings; the context bisection."""

import json
import time

import pytest

from patchkit.bench import context, machine, run, stats
from patchkit.cli import main


def test_bench_quick_writes_json_markdown_and_a_plot(tmp_path, capsys):
    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 0  # no scenario: all of them
    record = json.loads((tmp_path / "bench.json").read_text())
    assert record["command"] == f"patchkit bench --quick --out {tmp_path}" and record["quick"] is True
    assert {"date", "cpu", "cores", "threads", "torch", "transformers", "trl", "peft"} <= record["machine"].keys()
    assert record["machine"]["trl"] and record["machine"]["peft"]
    assert {"seconds", "loadavg_start", "loadavg_end", "other_processes"} <= record["load"].keys()
    assert isinstance(record["warnings"], list)
    scenarios = {row["scenario"].split()[0] for row in record["table"]}
    assert scenarios == {"train", "sft", "decode", "kernel"}  # context is left out of --quick
    for row in record["table"]:
        assert row["unpatched"] > 0 and row["patched"] > 0
        assert row["n"] >= 3 and row["lo"] <= row["ratio"] <= row["hi"]  # at least 3 rounds, median inside them
    kinds = {row["kind"] for row in record["table"]}
    assert {"speed", "memory", "time"} <= kinds
    assert [s["scenario"] for s in record["summaries"]] == ["train", "sft", "decode", "kernels"]
    markdown = (tmp_path / "bench.md").read_text()
    assert "| patched / unpatched | spread over rounds |" in markdown and "(quick)" in markdown.splitlines()[0]
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "| train | llama | tokens/s |" in out and "for_inference model.generate" in out
    assert "other processes used" in out


def test_a_ratio_is_the_median_of_the_rounds_own_ratios():
    # round 2 ran while the machine was slow for both: a ratio of medians would say 1.5x, the rounds say 2x
    r = stats.ratio([10.0, 2.0, 10.0], [20.0, 4.0, 15.0])
    assert (r["ratio"], r["lo"], r["hi"], r["n"]) == (2.0, 1.5, 2.0, 3)
    assert stats.cell([10.0, 2.0, 10.0], [20.0, 4.0, 15.0]) == "2.00x (1.50-2.00)"


def test_headline_rows_carry_the_spread_and_the_plot_draws_it(tmp_path):
    samples = {"tokens_per_s": [100.0, 90.0, 110.0], "mfu": [0.1] * 3, "peak_gib": [2.0] * 3,
               "model_added_gib": [1.0, 1.0, 1.0]}
    faster = {k: [v * 1.5 for v in vs] for k, vs in samples.items()}
    faster["tokens_per_s"][1] = 90.0 * 1.2
    summary = {"scenario": "train", "arch": "llama", **{v: stats.medians(s) for v, s in
                                                           (("unpatched", samples), ("patched", faster))}}
    speed = next(r for r in run.rows(summary) if r["metric"] == "tokens/s")
    assert speed["ratio"] == pytest.approx(1.5) and speed["lo"] == pytest.approx(1.2) and speed["n"] == 3
    record = {"command": "patchkit bench train", "quick": False, "table": run.rows(summary),
              "machine": {"date": "2026-12-05T01:02:03+00:00", "cpu": "a CPU", "threads": 2, "torch": "2.13"}}
    assert run.title(record) == "patchkit bench train (full), 2026-12-05 01:02 UTC, a CPU, 2 threads, torch 2.13"
    run.plot(record, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").stat().st_size > 10_000


def test_warnings_name_a_busy_machine_and_a_wide_spread(monkeypatch):
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 2)
    quiet = {"loadavg_start": 0.0, "other_processes": 0.01}
    steady = [{"scenario": "train", "arch": "llama", "metric": "tokens/s", "ratio": 1.5, "lo": 1.45, "hi": 1.55,
               "kind": "speed"}]
    assert machine.warnings(quiet, steady) == []
    busy = machine.warnings({"loadavg_start": 0.0, "other_processes": 0.4}, steady)
    assert len(busy) == 1 and "busy" in busy[0] and "40%" in busy[0]
    after_another_run = {"loadavg_start": 1.8, "other_processes": 0.02}  # the load average lags: measured, idle
    assert machine.warnings(after_another_run, steady) == []
    assert "load average 1.8" in machine.warnings({"loadavg_start": 1.8, "other_processes": None}, steady)[0]
    wide = machine.warnings(quiet, [{**steady[0], "lo": 1.0, "hi": 2.0}])
    assert len(wide) == 1 and "1.00x-2.00x" in wide[0] and "--rounds" in wide[0]


def test_the_load_monitor_counts_other_processes_not_this_one(monkeypatch):
    """Over 10 s on 2 cores the machine was busy 13 CPU-seconds, 8 of them this process's: others used 25 %."""
    clock = iter([100.0, 110.0])
    busy, own = iter([1000.0, 1013.0]), iter([50.0, 58.0])
    monkeypatch.setattr(machine.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(machine, "busy_seconds", lambda: next(busy))
    monkeypatch.setattr(machine, "own_cpu_seconds", lambda: next(own))
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 2)
    found = machine.Load().finish()
    assert found["seconds"] == 10.0 and found["other_processes"] == pytest.approx(0.25)
    assert "25%" in machine.warnings(found, [])[0]


def test_cpu_time_is_read_from_proc():
    """Busy until this process has used 0.15 CPU-seconds, however long a loaded machine takes to give them: the
    machine's busy time counts them too (the clock is only a guard against a hang)."""
    busy, own = machine.busy_seconds(), machine.own_cpu_seconds()
    give_up = time.monotonic() + 120
    while machine.own_cpu_seconds() - own < 0.15:
        assert time.monotonic() < give_up, "120 s of wall clock gave this process under 0.15 CPU-seconds"
    assert machine.busy_seconds() - busy >= 0.1  # /proc/stat samples by clock tick: a tick or two of slack


def test_context_bisection_finds_the_boundary(monkeypatch):
    calls = []

    def fake(variant, scenario, seq, cap, dims):
        calls.append(seq)
        return {"fits": seq <= 3000, "peak": seq, "seconds": 0.0}

    monkeypatch.setattr(context, "fits", fake)
    found = context.longest("patched", "full", cap=1, start=512)
    assert calls[:4] == [512, 1024, 2048, 4096]
    assert found["failed_at"] > 3000 >= found["longest"] >= 3000 * 0.95
    assert found["longest"] % 64 == 0
    bounded = context.longest("patched", "full", cap=1, start=512, limit=2048)  # still fits at the limit
    assert (bounded["longest"], bounded["failed_at"]) == (2048, None)
    assert [p["seq"] for p in bounded["probes"]] == [512, 1024, 2048]


def test_context_probe_runs_in_a_child_and_is_stopped_at_the_cap():
    dims = dict(context.MODEL, hidden_size=64, num_hidden_layers=1, intermediate_size=128)
    ok = context.fits("patched", "full", 64, cap=8 << 30, dims=dims)
    assert ok["fits"] and 0 < ok["peak"] < 8 << 30 and ok["seconds"] > 0
    stopped = context.fits("unpatched", "full", 64, cap=ok["peak"] // 4, dims=dims)
    assert not stopped["fits"] and stopped["seconds"] is None


def test_bench_train_compile_reports_four_variants(monkeypatch, capsys):
    """`--compile` plumbing (aot_eager here: inductor's code generation is the slow part, not what is tested)."""
    import functools

    import torch

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    monkeypatch.setattr(run, "TRAIN", {**run.TRAIN, "hidden_size": 64, "intermediate_size": 128,
                                         "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                         "vocab_size": 512})
    assert main(["bench", "train", "--compile", "--vocab", "512", "--batch", "1", "--seq", "32", "--rounds", "1",
                 "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "compiled patched / compiled unpatched" in out and "first step (compiling)" in out
    assert "| train compiled | llama | tokens/s |" in out


def test_bench_rl_times_grpo_with_its_generation_and_dpo(monkeypatch, capsys, tmp_path):
    from patchkit.bench import sft

    monkeypatch.setattr(sft, "MODEL", {**sft.MODEL, "hidden_size": 64, "intermediate_size": 128,
                                       "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1})
    assert main(["bench", "rl", "--quick", "--rounds", "1", "--json", str(tmp_path / "rl.json")]) == 0
    out = capsys.readouterr().out
    assert "| grpo: generation s/step |" in out and "| dpo: steps/s |" in out
    record = json.loads((tmp_path / "rl.json").read_text())
    summary = record["summaries"][0]
    for variant in ("unpatched", "patched"):
        grpo = summary["grpo"][variant]
        assert 0 < grpo["generate_s"] < grpo["s_per_step"] and grpo["train_s"] > 0
    assert {(r["scenario"], r["metric"]) for r in record["table"]} == {
        ("grpo", "steps/s"), ("grpo", "peak RSS (GiB)"), ("grpo", "memory a step adds (GiB)"),
        ("grpo generation", "s/step"), ("dpo", "steps/s"), ("dpo", "peak RSS (GiB)"),
        ("dpo", "memory a step adds (GiB)")}
