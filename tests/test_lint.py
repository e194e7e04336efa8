"""The code stays as ruff's configuration in pyproject.toml says (line length, pyflakes, import order)."""

from __future__ import annotations

import shutil
import subprocess
import sys

from conftest import REPO


def test_ruff_is_clean() -> None:
    ruff = shutil.which("ruff") or [sys.executable, "-m", "ruff"]
    command = [ruff, "check", "."] if isinstance(ruff, str) else [*ruff, "check", "."]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
