"""`patchkit bench`: the quick run end to end, its JSON, Markdown and plot; the context bisection."""

import json

import pytest

from patchkit import bench_context
from patchkit.cli import main


def test_bench_all_quick_writes_json_markdown_and_a_plot(tmp_path, capsys):
    assert main(["bench", "all", "--quick", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "bench.json").read_text())
    assert record["command"].startswith("patchkit bench all --quick")
    assert {"date", "torch", "transformers", "threads"} <= record["machine"].keys()
    scenarios = {row["scenario"].split()[0] for row in record["table"]}
    assert scenarios == {"train", "sft", "decode", "kernel"}  # context is left out of --quick
    for row in record["table"]:
        assert row["unpatched"] > 0 and row["patched"] > 0
        assert row["ratio"] == pytest.approx(row["patched"] / row["unpatched"])
    kinds = {row["kind"] for row in record["table"]}
    assert {"speed", "memory", "time"} <= kinds
    assert [s["scenario"] for s in record["summaries"]] == ["train", "sft", "decode", "kernels"]
    markdown = (tmp_path / "bench.md").read_text()
    assert "| scenario | arch | metric | unpatched | patched | patched / unpatched |" in markdown
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "| train | llama | tokens/s |" in out and "for_inference model.generate" in out


def test_context_bisection_finds_the_boundary(monkeypatch):
    calls = []

    def fake(variant, scenario, seq, cap, dims):
        calls.append(seq)
        return {"fits": seq <= 3000, "peak": seq, "seconds": 0.0}

    monkeypatch.setattr(bench_context, "fits", fake)
    found = bench_context.longest("patched", "full", cap=1, start=512)
    assert calls[:4] == [512, 1024, 2048, 4096]
    assert found["failed_at"] > 3000 >= found["longest"] >= 3000 * 0.95
    assert found["longest"] % 64 == 0
    bounded = bench_context.longest("patched", "full", cap=1, start=512, limit=2048)  # still fits at the limit
    assert (bounded["longest"], bounded["failed_at"]) == (2048, None)
    assert [p["seq"] for p in bounded["probes"]] == [512, 1024, 2048]


def test_context_probe_runs_in_a_child_and_is_stopped_at_the_cap():
    dims = dict(bench_context.MODEL, hidden_size=64, num_hidden_layers=1, intermediate_size=128)
    ok = bench_context.fits("patched", "full", 64, cap=8 << 30, dims=dims)
    assert ok["fits"] and 0 < ok["peak"] < 8 << 30 and ok["seconds"] > 0
    stopped = bench_context.fits("unpatched", "full", 64, cap=ok["peak"] // 4, dims=dims)
    assert not stopped["fits"] and stopped["seconds"] is None


def test_bench_train_compile_reports_four_variants(monkeypatch, capsys):
    """`--compile` plumbing (aot_eager here: inductor's code generation is the slow part, not what is tested)."""
    import functools

    import torch

    from patchkit import bench

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    monkeypatch.setattr(bench, "TRAIN", {**bench.TRAIN, "hidden_size": 64, "intermediate_size": 128,
                                         "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                         "vocab_size": 512})
    assert main(["bench", "train", "--compile", "--vocab", "512", "--batch", "1", "--seq", "32", "--rounds", "1",
                 "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "compiled patched / compiled unpatched" in out and "first step (compiling)" in out
    assert "| train compiled | llama | tokens/s |" in out
