"""Plugin loading: entry points, failures reported and skipped, ordering and conflicts."""

import os
import subprocess
import sys
import textwrap

import pytest

import patchkit
from patchkit import plugins
from patchkit.architectures import Llama

from .families import MULTIMODAL, NAMES


def _dist(root, name, modules, entry_points):
    """A fake installed distribution on `root`: modules plus a dist-info with `patchkit` entry points."""
    info = root / f"{name.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text("[patchkit]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    for module, code in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(code))


def _python(root, code, **env):
    environment = {**os.environ, "PYTHONPATH": str(root), **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=environment, timeout=300)


@pytest.fixture
def site(tmp_path):
    _dist(tmp_path, "pk-broken", {"pk_broken": "raise ImportError('boom: missing dependency')"},
          {"broken": "pk_broken"})
    _dist(tmp_path, "pk-tinyllama", {"pk_tinyllama": """
        import patchkit
        from patchkit.architectures import Llama

        class TinyLlama(Llama):  # another name for the same transformers module
            name = "tinyllama"
            module, prefix = Llama.module, Llama.prefix

        @patchkit.hookimpl
        def patchkit_architectures():
            return [TinyLlama]
    """}, {"tinyllama": "pk_tinyllama"})
    _dist(tmp_path, "pk-clash", {"pk_clash": """
        import patchkit
        from patchkit.architectures import Llama

        class Again(Llama):
            pass

        @patchkit.hookimpl
        def patchkit_architectures():
            return [Again]
    """}, {"clash": "pk_clash"})
    return tmp_path


def test_entry_points_load_and_a_broken_one_is_reported(site):
    proc = _python(site, """
        import patchkit
        from patchkit.plugins import manager
        print(sorted(patchkit.architectures()))
        for e in manager().errors:
            print("ERR", e.plugin, e.distribution, e.error)
        print(manager().info["tinyllama"].distribution, manager().info["tinyllama"].version)
    """)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    builtin = [*NAMES, *MULTIMODAL]
    assert lines[0] == str(sorted([*builtin, "tinyllama"]))
    assert "ERR broken pk-broken ImportError: boom: missing dependency" in lines
    assert any(line.startswith("ERR clash pk-clash ValueError: architecture 'llama' is already registered")
               for line in lines)
    assert "pk-tinyllama 1.2.3" in lines


def test_cli_plugins_shows_distribution_version_hooks_and_failures(site):
    proc = _python(site, "from patchkit.cli import main; main(['plugins'])")
    assert proc.returncode == 0, proc.stderr
    assert "tinyllama  pk-tinyllama 1.2.3  hooks: patchkit_architectures" in proc.stdout
    assert "FAILED broken  pk-broken  ImportError: boom" in proc.stdout


def test_autoload_can_be_disabled_and_strict_mode_raises(site):
    proc = _python(site, "import patchkit; print('tinyllama' in patchkit.architectures())",
                   PATCHKIT_DISABLE_PLUGIN_AUTOLOAD="1")
    assert proc.stdout.strip() == "False", proc.stderr
    proc = _python(site, "import patchkit; patchkit.architectures()", PATCHKIT_STRICT_PLUGINS="1")
    assert proc.returncode != 0 and "boom" in proc.stderr


def test_third_party_architecture_patches_and_verifies(site):
    proc = _python(site, """
        import patchkit
        assert patchkit.patch("tinyllama").architectures == ["tinyllama"]
        [result] = patchkit.verify("tinyllama")
        print(result.ok)
    """)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("True"), proc.stderr[-2000:]


class _Hooks:
    def __init__(self, archs=(), providers=(), error=None):
        self.archs, self.providers, self.error = archs, providers, error

    @patchkit.hookimpl
    def patchkit_architectures(self):
        if self.error:
            raise self.error
        return list(self.archs)

    @patchkit.hookimpl
    def patchkit_kernel_providers(self):
        return list(self.providers)


def test_in_process_plugin_conflicts_and_overrides(register_plugin):
    class Override(Llama):
        overrides = True
        model_types = ("llama", "my-llama")

    register_plugin(_Hooks(archs=[Override]), name="override")
    assert plugins.manager().architectures["llama"] is Override
    assert plugins.manager().model_types["my-llama"] is Override

    register_plugin(_Hooks(error=RuntimeError("hook exploded")), name="exploding")
    register_plugin(_Hooks(archs=["not a class"], providers=[object()]), name="garbage")
    errors = {(e.plugin, e.error.split(":")[0]) for e in plugins.manager().errors}
    assert ("exploding", "RuntimeError") in errors
    assert ("garbage", "TypeError") in errors
    assert len([e for e in plugins.manager().errors if e.plugin == "garbage"]) == 2


def test_duplicate_provider_needs_overrides(register_plugin):
    from patchkit.kernels import Provider, rms_norm_torch

    register_plugin(_Hooks(providers=[Provider("torch", {"rms_norm": rms_norm_torch})]), name="dup")
    assert any(e.plugin == "dup" and "already registered" in e.error for e in plugins.manager().errors)
    assert "swiglu" in plugins.manager().providers["torch"].ops  # the built-in one is kept


def test_hookspecs_are_documented():
    from patchkit import hookspecs

    docs = open(os.path.join(os.path.dirname(__file__), "..", "docs", "plugins.md")).read()
    for name in dir(hookspecs):
        if name.startswith("patchkit_"):
            assert getattr(hookspecs, name).__doc__ and name in docs


def test_allow_list_loads_only_the_named_entry_points(site):
    proc = _python(site, """
        import patchkit
        from patchkit.plugins import manager
        print(sorted(manager().info))
        print(len(manager().errors))
        from patchkit.cli import main
        main(["plugins"])
    """, PATCHKIT_PLUGINS="tinyllama")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "'tinyllama'" in lines[0] and "'broken'" not in lines[0] and "'clash'" not in lines[0]
    assert lines[1] == "0"  # the broken plugin was never imported
    assert "SKIPPED broken (pk-broken): not in PATCHKIT_PLUGINS" in proc.stdout
