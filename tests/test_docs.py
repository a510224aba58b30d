"""Every ```python block of README.md and docs/*.md runs as pasted: each on its own, offline, on a CPU.

Where a real run would load a model or a tokenizer from the hub, the block builds a tiny one (`patchkit.toy`) and
shows the real call in a comment. A block runs in a fresh namespace, in a scratch directory (trainers write there).
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks():
    for page in PAGES:
        text = page.read_text()
        for match in re.finditer(r"^```python\n(.*?)^```$", text, re.S | re.M):
            line = text[:match.start()].count("\n") + 2
            yield pytest.param(match.group(1), id=f"{page.relative_to(ROOT)}:{line}")


BLOCKS = list(_blocks())


def test_the_docs_have_python_blocks_to_run():
    assert len(BLOCKS) >= 10


@pytest.mark.parametrize("code", BLOCKS)
def test_block_runs_as_pasted(code, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, request.node.callspec.id, "exec"), {"__name__": "__main__"})


def test_every_install_line_fetches_this_project():
    """The package index's `patchkit` is another project: ours is `patchkit-llm` (or a local path, `-e .`)."""
    lines = [line for page in [*PAGES, ROOT / "SECURITY.md", *ROOT.glob("examples/*/README.md")]
             for line in page.read_text().splitlines() if "pip install" in line]
    assert len(lines) >= 4
    for line in lines:
        for name in re.findall(r"""(?<![\w./-])["']?(patchkit[\w-]*)""", line.split("pip install", 1)[1]):
            assert name.startswith(("patchkit-llm", "patchkit-helium")), line
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "patchkit-llm"
    assert all(dep.startswith("patchkit-llm[") for extra in project["optional-dependencies"].values()
               for dep in extra if dep.startswith("patchkit"))
