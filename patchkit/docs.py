"""The parts of README.md and docs/ that the registry states: the built-in families, their number and kinds.

    python -m patchkit.docs          # rewrite every generated region from the registry
    python -m patchkit.docs --check  # exit 1, naming each region that differs

A region is `<!-- families:KIND -->...<!-- /families -->`, KIND one of `REGIONS`. Written inline, its text stays
on one line (a table cell, a sentence); with the markers on lines of their own, it is wrapped at `WIDTH`.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from .architecture import Architecture
from .plugins import BUILTINS, manager

REGION = re.compile(r"(<!-- families:([a-z-]+) -->)(.*?)(<!-- /families -->)", re.S)
WIDTH = 110
KINDS = ("text", "mixture-of-experts", "vision-language")


def builtin() -> list[type[Architecture]]:
    """The built-in families, in registration order (plugins' families left out)."""
    return [a for a in manager().architectures.values() if a.__module__.startswith(BUILTINS[0])]


def kind(arch: type[Architecture]) -> str:
    """`vision-language` for a wrapper with no causal-LM head of its own, `mixture-of-experts` for a family with
    sparse blocks, `text` otherwise."""
    if not any(head.endswith("ForCausalLM") for head in arch.heads):
        return "vision-language"
    return "mixture-of-experts" if "experts" in arch.ops() else "text"


def _names(archs: list[type[Architecture]]) -> str:
    return ", ".join(f"`{a.name}`" for a in archs)


def _kinds() -> str:
    groups = [[a for a in builtin() if kind(a) == k] for k in KINDS]
    parts = [f"{len(g)} {k} ({_names(g)})" for k, g in zip(KINDS, groups) if g]
    return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]


REGIONS: dict[str, Callable[[], str]] = {
    "count": lambda: str(len(builtin())),
    "kinds": _kinds,
    "moe": lambda: _names([a for a in builtin() if kind(a) == "mixture-of-experts"]),
    "vision": lambda: _names([a for a in builtin() if a.tiny_multimodal]),  # Gemma 3's text family sees images too
}


def render(text: str) -> str:
    """`text` with every region's content generated afresh."""

    def fill(match: re.Match) -> str:
        start, name, content, end = match.groups()
        if name not in REGIONS:
            raise ValueError(f"unknown region families:{name} (known: {', '.join(REGIONS)})")
        body = REGIONS[name]()
        if content.startswith("\n"):
            body = "\n" + textwrap.fill(body, WIDTH, break_on_hyphens=False) + "\n"
        return start + body + end

    return REGION.sub(fill, text)


def pages(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def stale(root: Path) -> list[str]:
    """`page: families:KIND` for every region whose text differs from what the registry gives."""
    out = []
    for page in pages(root):
        text = page.read_text()
        fresh = {m.start(): m.group(3) for m in REGION.finditer(render(text))}
        for match, content in zip(REGION.finditer(text), fresh.values()):
            if match.group(3) != content:
                out.append(f"{page.relative_to(root)}: families:{match.group(2)}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m patchkit.docs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the repository (default: here)")
    parser.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 if a region differs")
    args = parser.parse_args(argv)
    differ = stale(args.root)
    if args.check:
        for region in differ:
            print(f"{region} differs from the registry: run `python -m patchkit.docs`", file=sys.stderr)
        return 1 if differ else 0
    for page in pages(args.root):
        text = page.read_text()
        if render(text) != text:
            page.write_text(render(text))
            print(f"rewrote {page.relative_to(args.root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
