"""House rules that keep the code small: no family repeats another's code, no module grows past ~400 lines."""

import ast
import io
import re
import tokenize
from itertools import combinations
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _shapes(path):
    """Each non-blank code line with names, strings and numbers replaced by their kind."""
    lines = {}
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            continue
        kind = {tokenize.NAME: "N", tokenize.STRING: "S", tokenize.NUMBER: "0"}.get(tok.type, tok.string)
        if tok.type == tokenize.NAME and tok.string in ("class", "def", "return", "if", "for", "import", "from"):
            kind = tok.string
        lines.setdefault(tok.start[0], []).append(kind)
    return [" ".join(v) for _, v in sorted(lines.items())]


def _windows(path, size=6):
    shapes = _shapes(path)
    return {tuple(shapes[i:i + size]) for i in range(len(shapes) - size + 1)}


def test_no_two_architecture_modules_share_six_lines_of_the_same_shape():
    files = sorted((ROOT / "architectures").glob("*.py")) + [ROOT / "examples" / "plugin-helium" / "patchkit_helium.py"]
    for a, b in combinations(files, 2):
        shared = _windows(a) & _windows(b)
        assert not shared, f"{a.name} and {b.name} share a block: {next(iter(shared))}"


def test_the_check_itself_finds_a_copied_block(tmp_path):
    source = (ROOT / "architectures" / "qwen.py").read_text()
    copy = tmp_path / "copy.py"
    copy.write_text(re.sub(r"Qwen", "Mine", source))
    assert _windows(ROOT / "architectures" / "qwen.py") & _windows(copy)


def test_no_module_over_400_lines():
    for folder in ("patchkit", "architectures", "kernels"):
        for path in (ROOT / folder).rglob("*.py"):
            assert len(path.read_text().splitlines()) <= 400, path


def _imports(path: Path, package: str) -> set[str]:
    """The modules of `package` that `path` imports anywhere in it (function-level imports too)."""
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = here.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            found |= {module, *(f"{module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.startswith(package + ".") and (ROOT / (m.replace(".", "/") + ".py")).exists()}


def test_the_benchmarks_import_no_module_of_theirs_in_a_circle():
    """patchkit/bench: every import, lazy ones too, goes one way (options, stats, machine, models, the scenarios,
    run, the package), so no module needs a function-level import to dodge a cycle."""
    bench = ROOT / "patchkit" / "bench"
    graph = {f"patchkit.bench.{p.stem}": _imports(p, "patchkit.bench") for p in bench.glob("*.py")}
    assert len(graph) >= 9 and graph["patchkit.bench.run"] >= {"patchkit.bench.train", "patchkit.bench.sft"}
    done: set[str] = set()

    def visit(module, path):
        assert module not in path, " -> ".join([*path, module])
        if module not in done:
            for nxt in graph.get(module, ()):
                visit(nxt, [*path, module])
            done.add(module)

    for module in graph:
        visit(module, [])
