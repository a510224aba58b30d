"""House rules that keep the code small: no family repeats another's code, no module grows past ~400 lines."""

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
        for path in (ROOT / folder).glob("*.py"):
            assert len(path.read_text().splitlines()) <= 400, path
