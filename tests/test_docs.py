"""Every ```python block of README.md and docs/*.md runs as pasted: each on its own, offline, on a CPU. The family
counts and lists the pages state are the registry's (`python -m patchkit.docs` regenerates them).

Where a real run would load a model or a tokenizer from the hub, the block builds a tiny one (`patchkit.toy`) and
shows the real call in a comment. A block runs in a fresh namespace, in a scratch directory (trainers write there).
"""

import re
from pathlib import Path

import pytest

from patchkit import docs

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


def test_the_family_counts_and_lists_are_the_registrys():
    """Generated regions (`patchkit.docs`) say what the registry says; `python -m patchkit.docs` rewrites them."""
    stale = docs.stale(ROOT)
    assert not stale, f"{', '.join(stale)}: regenerate them with `python -m patchkit.docs`"
    used = {m.group(2) for page in PAGES for m in docs.REGION.finditer(page.read_text())}
    assert used == set(docs.REGIONS)


def test_a_region_that_drifts_is_found(tmp_path):
    (tmp_path / "docs").mkdir()
    readme = (ROOT / "README.md").read_text()
    count = f"<!-- families:count -->{len(docs.builtin())}<!-- /families -->"
    assert count in readme
    (tmp_path / "README.md").write_text(readme.replace(count, "<!-- families:count -->16<!-- /families -->"))
    assert docs.stale(tmp_path) == ["README.md: families:count"]
    docs.main(["--root", str(tmp_path)])
    assert not docs.stale(tmp_path) and (tmp_path / "README.md").read_text() == readme


def test_a_family_more_or_less_makes_every_region_stale(monkeypatch):
    families = docs.builtin()
    monkeypatch.setattr(docs, "builtin", lambda: [f for f in families if f.name not in ("mixtral", "llava")])
    stale = docs.stale(ROOT)
    assert {f"README.md: families:{kind}" for kind in ("count", "kinds")} <= set(stale)
    assert {f"families:{kind}" for kind in docs.REGIONS} == {s.split(": ")[1] for s in stale}


NUMBER = r"\d+|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|\w+teen|twenty[\w-]*|thirty[\w-]*"


def test_no_page_counts_families_outside_a_generated_region():
    for page in PAGES:
        text = docs.REGION.sub("", page.read_text())
        found = re.search(rf"\b({NUMBER})\s+(?:[\w-]+\s+){{0,2}}famil", text, re.I)
        assert not found, f"{page.name}: {found.group(0)!r}; use a families region (patchkit/docs.py)"


def test_the_family_table_of_architecture_md_names_every_built_in_family():
    table = (ROOT / "docs" / "architecture.md").read_text().split("## The families", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)`", table, re.M)
    assert sorted(rows) == sorted(a.name for a in docs.builtin()), "docs/architecture.md's family table"


DECODE_SEAMS = ("decode", "embed", "decode_rope", "rotary_layer", "rotate", "qkv", "qk_norm", "decode_layer",
                "residual", "decode_attention", "decode_window", "decode_logits", "decode_unserved", "norm")


def _own_decode_overrides(arch) -> set[str]:
    """The decode seams `arch` states itself or through a mixin: up to the nearest registered family it extends."""
    registered = {type(a) if not isinstance(a, type) else a for a in docs.builtin()} - {arch}
    own = set()
    for cls in arch.__mro__:
        if cls in registered or cls.__name__ == "Architecture":
            break
        own |= {seam for seam in DECODE_SEAMS if seam in vars(cls)}
    return own


def test_the_decode_table_of_inference_md_states_each_familys_overrides():
    table = (ROOT / "docs" / "inference.md").read_text().split("### What each family restates", 1)[1]
    table = table.split("\n\n", 2)[1]
    listed = {}
    for row in table.splitlines()[2:]:
        first, overrides = row.split("|")[1:3]
        for name in re.findall(r"`(\w+)`", first):
            listed[name] = set(re.findall(r"`(\w+)`", overrides)) & set(DECODE_SEAMS)
    families = {a.name: a for a in docs.builtin()}
    assert set(families) <= set(listed), f"docs/inference.md's decode table misses {set(families) - set(listed)}"
    for name, arch in families.items():
        if name != "llama":
            assert listed[name] == _own_decode_overrides(arch), f"docs/inference.md's decode table: {name}"
