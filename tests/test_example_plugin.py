"""examples/plugin-helium is a separate package: install it, and patchkit finds, patches and verifies Helium."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "plugin-helium"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(EXAMPLE)], check=True, capture_output=True)
    return {**os.environ, "PYTHONPATH": str(target)}


def _patchkit(env, *args):
    return subprocess.run([sys.executable, "-m", "patchkit", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_plugin_is_listed_with_its_distribution(installed):
    proc = _patchkit(installed, "plugins")
    assert proc.returncode == 0, proc.stderr
    assert "helium  patchkit-helium 0.1.0  hooks: patchkit_architectures" in proc.stdout
    listing = _patchkit(installed, "list").stdout
    assert "helium (from llama): model types helium" in listing and "changes norm_cast='gemma'" in listing


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_plugin_passes_verify(installed, dtype):
    proc = _patchkit(installed, "verify", "helium", "--dtype", dtype)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"helium ({dtype}, backend=auto): OK" in proc.stdout


def test_plugin_with_a_wrong_difference_fails_verify(installed):
    """A plugin that states a difference Helium does not have ((1 + w) norms) fails verify: the check has teeth."""
    code = ("import patchkit_helium, sys\n"
            "from patchkit.cli import main\n"
            "patchkit_helium.Helium.norm_offset = 1.0\n"
            "sys.exit(main(['verify', 'helium']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=installed, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
