"""Fetch transformers' own common model tests for the installed transformers version (`.ci/run` does this).

    python tests/fetch_transformers_tests.py [DEST]

transformers' source distribution on PyPI ships `tests/*.py` (`ModelTesterMixin` among them) but not the per-model
test files nor the two mixin modules `test_modeling_common.py` imports for export and generation; this script unpacks
the common files as the package `transformers_tests` under DEST (default `.transformers-tests`, git-ignored) and
gives those two imports empty mixins, so export and generation tests are not run from here (patchkit's generation
is checked against transformers' `generate` in tests/test_generation.py). Needs the package index, once; the tests
themselves are offline.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

STUBS = {
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
}


def fetch(dest: Path) -> Path:
    package = dest / "transformers_tests"
    if (package / "test_modeling_common.py").exists():
        return package
    version = transformers.__version__
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             "--dest", tmp, f"transformers=={version}"],
            check=True,
        )  # fmt: skip
        (sdist,) = Path(tmp).glob("transformers-*.tar.gz")
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and Path(m.name).parent.name == "tests"]
            if not any(Path(m.name).name == "test_modeling_common.py" for m in members):
                raise SystemExit(f"transformers {version}'s source distribution has no tests/test_modeling_common.py")
            package.mkdir(parents=True, exist_ok=True)
            for m in members:
                (package / Path(m.name).name).write_bytes(tar.extractfile(m).read())
    for path, text in {"__init__.py": "", **STUBS}.items():
        (package / path).parent.mkdir(parents=True, exist_ok=True)
        (package / path).parent.joinpath("__init__.py").touch()
        (package / path).write_text(text)
    return package


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    print(fetch(Path(sys.argv[1]) if len(sys.argv) > 1 else root / ".transformers-tests"))
