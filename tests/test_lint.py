"""The code stays as ruff's configuration in pyproject.toml says (line length, pyflakes, import order)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_ruff_is_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_commands_take_their_settings_from_the_fields_and_functions_stay_short() -> None:
    """Settings are declared once (intgen/config.py): the commands' own signatures stay small, and no function
    outside the CLI grows past 60 lines."""
    import ast

    cli = ast.parse((REPO / "intgen" / "cli.py").read_text(encoding="utf-8"))
    commands = [node for node in cli.body if isinstance(node, ast.FunctionDef)
                and any("command" in ast.unparse(d) or "callback" in ast.unparse(d) for d in node.decorator_list)]
    written = sum(len(c.args.args) + len(c.args.kwonlyargs) + (c.args.kwarg is not None) for c in commands)
    assert len(commands) >= 14 and written <= 90, written
    long = []
    for path in (REPO / "intgen").rglob("*.py"):
        if path.name != "cli.py":
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert not long, long


def test_every_setting_has_help_and_one_section() -> None:
    import dataclasses

    from intgen.config import FIELDS, SECTIONS

    owners = [f.name for section in SECTIONS.values() for f in dataclasses.fields(section)]
    assert sorted(owners) == sorted(FIELDS)  # each field in exactly one section, and RunConfig holds them all
    assert all(spec.metadata["help"] for spec in FIELDS.values())
