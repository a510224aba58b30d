"""examples/sft_lora.py runs as a user would run it: a subprocess, the built-in tiny model and data, CPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "sft_lora.py"


def _run(tmp_path, *args):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--batch-size", "4", "--output-dir", str(tmp_path / "out"),
                           *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_trains_and_prints_the_final_loss(tmp_path):
    out = _run(tmp_path, "--max-steps", "3")
    assert re.search(r"^final loss: \d+\.\d+", out, re.M), out
    assert re.search(r"^sample: '.+' -> ", out, re.M), out
    assert (tmp_path / "out" / "adapter_config.json").exists()


def test_compare_prints_the_speed_up(tmp_path):
    out = _run(tmp_path, "--compare", "--max-steps", "2")
    assert re.search(r"^speed-up: \d+\.\d+x$", out, re.M), out
    assert re.search(r"^steps/s\s+\d+\.\d+\s+\d+\.\d+$", out, re.M), out
    unpatched, patched = map(float, re.search(r"^loss\s+(\S+)\s+(\S+)$", out, re.M).groups())
    assert patched == pytest.approx(unpatched, rel=1e-3)  # the same steps: the patch changes no numbers
