"""Shipped prompts and card templates resolve inside the package by name; a user's file only by its path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from intgen.resources import load_prompt, resource_path, shipped_path

SHIPPED_PROMPTS = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "prompts").glob("*.md")
                         if p.name != "README.md")


@pytest.fixture()
def in_folder(tmp_path: Path):
    before = os.getcwd()
    os.chdir(tmp_path)
    yield tmp_path
    os.chdir(before)


@pytest.mark.parametrize("folder, name", [("prompts", name) for name in SHIPPED_PROMPTS] + [("data_cards", "card.md")])
def test_a_file_of_a_shipped_name_in_the_working_directory_is_not_used(in_folder: Path, folder: str, name: str) -> None:
    (in_folder / name).write_text("a stray file lying where intgen runs {{problem}}\n")
    assert resource_path(folder, name) == shipped_path(folder, name) != in_folder / name
    assert "stray" not in resource_path(folder, name).read_text()
    # given as a path, the user's own file is used
    assert resource_path(folder, f"./{name}").read_text().startswith("a stray file")
    assert resource_path(folder, str(in_folder / name)).read_text().startswith("a stray file")


def test_a_bare_name_no_shipped_file_has_is_the_users_file(in_folder: Path) -> None:
    (in_folder / "mine.md").write_text("My prompt: {{problem}}\n")
    assert load_prompt("mine.md").text == "My prompt: {{problem}}\n"
    with pytest.raises(FileNotFoundError, match="not a file, and not one of the shipped prompts"):
        resource_path("prompts", "missing.md")


def test_the_prompts_readme_lists_every_shipped_prompt() -> None:
    readme = (Path(__file__).resolve().parents[1] / "prompts" / "README.md").read_text()
    assert SHIPPED_PROMPTS and all(f"`{name}`" in readme for name in SHIPPED_PROMPTS)
