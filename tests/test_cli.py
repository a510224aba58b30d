"""The CLI: verify (and that it catches a broken kernel), list, plugins."""

import importlib
import subprocess
import sys

import pytest

from patchkit.cli import main

mlp = importlib.import_module("patchkit.kernels.mlp")
rms_norm = importlib.import_module("patchkit.kernels.rms_norm")  # the package exports the op under this name


def test_verify_passes_and_prints_a_table(capsys):
    assert main(["verify", "llama"]) == 0
    out = capsys.readouterr().out
    assert "grad lm_head.weight" in out and "logits" in out and "all architectures match" in out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_verify_with_no_argument_checks_every_architecture(capsys, dtype):
    assert main(["verify", "--dtype", dtype]) == 0
    out = capsys.readouterr().out
    for name in ("llama", "mistral", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3"):
        assert f"{name} ({dtype}, backend=auto): OK" in out


@pytest.mark.parametrize("breakage", ["backward", "forward"])
def test_verify_fails_on_a_broken_kernel(monkeypatch, capsys, breakage):
    if breakage == "backward":  # drop the recomputed activation term of the MLP's gate gradient
        original = mlp._Gated.backward

        def broken(ctx, dy):
            dgate, dup, *rest = original(ctx, dy)
            return (dgate * 1.01, dup, *rest)

        monkeypatch.setattr(mlp._Gated, "backward", staticmethod(broken))
    else:
        original = rms_norm._RMSNorm.forward
        monkeypatch.setattr(rms_norm._RMSNorm, "forward",
                            staticmethod(lambda ctx, x, w, eps, *a: original(ctx, x, w, eps * 100, *a)))
    assert main(["verify", "llama"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_list_and_plugins(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "llama: model types llama" in out and "ops rms_norm, rope, mlp, cross_entropy" in out
    assert "torch: devices any" in out
    backends = out[out.index("backends:"):].splitlines()[1:]
    torch_line = next(line for line in backends if line.startswith("  torch:"))
    assert "lora_linear, lora_mlp" in torch_line and "runs torch's" not in torch_line
    for name in ("triton", "liger"):  # the LoRA ops are torch's composition under every backend: listed as such
        line = next(line for line in backends if line.startswith(f"  {name}:"))
        ops, _, borrowed = line.partition("; runs torch's ")
        assert "lora" not in ops and borrowed.endswith("lora_linear, lora_mlp"), line
    assert main(["plugins"]) == 0
    assert "patchkit.architectures  patchkit" in capsys.readouterr().out


def test_errors_are_one_line():
    proc = subprocess.run([sys.executable, "-m", "patchkit", "verify", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("patchkit: error: no patchkit architecture for 'nope'")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_bad_input_is_one_line_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    """patchkit's own errors for bad input (`UsageError`, a `TypeError`; `PatchError`; `BackendError`) print one
    line; any other exception, a `TypeError` from a bug included, propagates with its traceback."""
    import patchkit

    monkeypatch.setattr(patchkit, "verify", lambda *a, **kw: patchkit.patch(42))
    assert main(["verify", "llama"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("patchkit: error: patchkit takes an architecture name") and err.count("\n") == 1
    assert issubclass(patchkit.UsageError, TypeError)

    def bug(*args, **kwargs):
        return len(None)  # TypeError: object of type 'NoneType' has no len()

    monkeypatch.setattr(patchkit, "verify", bug)
    with pytest.raises(TypeError, match="has no len"):
        main(["verify", "llama"])
    assert capsys.readouterr().err == ""


def test_version_names_the_distribution(capsys):
    import patchkit

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"patchkit {patchkit.__version__} (patchkit-llm)\n"
    assert patchkit.__version__ != "0+unknown"  # installed under the distribution name it reports


def test_every_option_of_every_command_has_help():
    import argparse

    from patchkit.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"verify", "list", "plugins", "bench"}
    for name, sub in [("patchkit", parser), *commands.items()]:
        for action in sub._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    bench = {a.dest: a for a in commands["bench"]._actions}
    assert {"batch", "seq", "rounds", "quick", "out", "arch"} <= bench.keys() and bench["scenario"].default == "all"


def test_bench_without_a_scenario_runs_all(monkeypatch):
    from patchkit.bench import run

    seen = []
    monkeypatch.setattr(run, "run", lambda args, argv: seen.append((args.scenario, args.quick, argv)) or 0)
    assert main(["bench", "--quick"]) == 0
    assert seen == [("all", True, ["--quick"])]
