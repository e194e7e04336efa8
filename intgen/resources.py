"""Files that ship with intgen: prompts and dataset-card templates.

In a wheel they sit inside the package (`intgen/prompts`); in a source checkout (an editable install)
they sit at the top of the repository. A user's own file always wins: pass its path instead of a name.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_MARKER = re.compile(r"\{\{(\w+)\}\}")


def resource_path(folder: str, name: str) -> Path:
    """`name` inside the shipped `folder`, or `name` itself if it is a path to an existing file."""
    own = Path(name)
    if own.is_file():
        return own
    for base in (_PACKAGE / folder, _PACKAGE.parent / folder):
        candidate = base / name
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no {folder[:-1]} file {name!r} (looked in {_PACKAGE / folder} and {_PACKAGE.parent / folder})")


def read_prompt(name: str) -> str:
    return resource_path("prompts", name).read_text(encoding="utf-8")


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fill(template: str, **values: str) -> str:
    """Replace `{{name}}` markers in one pass: LaTeX braces stay as they are, and a marker inside a
    value (problem text is untrusted) is never expanded."""
    return _MARKER.sub(lambda m: values[m.group(1)] if m.group(1) in values else m.group(0), template)
