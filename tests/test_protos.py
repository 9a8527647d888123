"""The wire contract: protos lint clean and the committed generated code matches them."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "protos"))

import generate  # noqa: E402 - protos/generate.py is a script, not a package


def test_buf_lint_is_clean() -> None:
    buf = shutil.which("buf", path=str(Path(sys.executable).parent))
    assert buf, "buf (PyPI buf-bin) is not installed in the venv"
    result = subprocess.run([buf, "lint"], cwd=REPO / "protos", capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_code_is_current(tmp_path: Path) -> None:
    out = tmp_path / "api"
    generate.generate(out)
    committed = REPO / "shared" / "api"
    fresh = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
    current = {p.relative_to(committed) for p in committed.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert fresh == current, f"generated files differ: run `make protos` ({sorted(fresh ^ current)})"
    stale = [str(rel) for rel in sorted(fresh) if not filecmp.cmp(out / rel, committed / rel, shallow=False)]
    assert not stale, f"stale generated code, run `make protos`: {stale}"
