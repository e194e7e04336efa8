"""Files that ship with intgen: prompts and dataset-card templates.

In a wheel they sit inside the package (`intgen/prompts`); in a source checkout (an editable install)
they sit at the top of the repository. A shipped file is named by its bare file name (`solve.md`) and is
looked up there only: a file of the same name in the working directory never replaces it. Your own file
is used when you give its path (`./solve.md`, `my/solve.md`, or a bare name no shipped file has).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from intgen.errors import MissingFile, UserError

_PACKAGE = Path(__file__).resolve().parent
_MARKER = re.compile(r"\{\{(\w+)\}\}")


def shipped_path(folder: str, name: str) -> Path | None:
    """The shipped file `name` in `folder`, or None."""
    if Path(name).name != name:  # a path, not a bare name
        return None
    for base in (_PACKAGE / folder, _PACKAGE.parent / folder):
        if (base / name).is_file():
            return base / name
    return None


def resource_path(folder: str, name: str) -> Path:
    """A shipped file by its bare name, else the user's own file at the path `name`."""
    found = shipped_path(folder, name) or (Path(name) if Path(name).is_file() else None)
    if found is None:
        raise MissingFile(f"no {folder[:-1]} file {name!r}: not a file, and not one of the shipped "
                                f"{folder} ({_PACKAGE / folder})")
    return found


def read_prompt(name: str) -> str:
    return resource_path("prompts", name).read_text(encoding="utf-8")


@dataclass(frozen=True)
class Prompt:
    """A prompt template: where it came from (a shipped file's name, or the user's path) and its text."""

    name: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def label(self) -> str:
        """How cards and summaries name it: the file name and the start of its hash."""
        return f"`{Path(self.name).name}` (sha256 {self.sha256[:12]})"


def load_prompt(name: str) -> Prompt:
    """A shipped prompt by file name (`solve.md`), or the user's own file by path."""
    path = resource_path("prompts", name)
    try:
        return Prompt(name, path.read_bytes().decode("utf-8"))  # as written: the hash is the file's
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: a prompt file must be UTF-8 text ({exc.reason} at byte {exc.start})") from None


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fill(template: str, **values: str) -> str:
    """Replace `{{name}}` markers in one pass: LaTeX braces stay as they are, and a marker inside a
    value (problem text is untrusted) is never expanded."""
    return _MARKER.sub(lambda m: values[m.group(1)] if m.group(1) in values else m.group(0), template)
