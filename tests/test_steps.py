from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from intgen.steps import join_steps, number_steps, split_steps


def test_blank_lines_split_steps() -> None:
    text = "First we add the numbers.\n\nThen we divide by two.\n\n\nSo the answer is $\\boxed{4}$."
    assert [s.strip() for s in split_steps(text)] == [
        "First we add the numbers.",
        "Then we divide by two.",
        "So the answer is $\\boxed{4}$.",
    ]


def test_display_math_and_code_are_never_cut() -> None:
    text = (
        "We compute the sum carefully.\n\n$$\na + b\n\n= c\n$$\n\nNext the matrix part.\n\n"
        "\\[\nx = 1\n\n y = 2\n\\]\n\n```python\nprint(1)\n\nprint(2)\n```\n\n"
        "\\begin{align*}\na &= 1 \\\\\n\nb &= 2\n\\end{align*}\n\nDone with all of it."
    )
    steps = [s.strip() for s in split_steps(text)]
    assert "$$\na + b\n\n= c\n$$" in steps
    assert "\\[\nx = 1\n\n y = 2\n\\]" in steps
    assert "```python\nprint(1)\n\nprint(2)\n```" in steps
    assert "\\begin{align*}\na &= 1 \\\\\n\nb &= 2\n\\end{align*}" in steps


def test_unclosed_display_math_runs_to_the_end() -> None:
    text = "A long enough opening step.\n\n$$ x = 1\n\ny = 2"
    assert [s.strip() for s in split_steps(text)] == ["A long enough opening step.", "$$ x = 1\n\ny = 2"]


def test_tiny_fragments_merge_into_the_next_step() -> None:
    text = "Solution:\n\n**Step 1**\n\nWe factor the polynomial first.\n\nDone.\n\n"
    steps = split_steps(text)
    assert steps == [text]
    text = "Solution:\n\nWe factor the polynomial first.\n\nThen we read off the roots.\n\nDone."
    assert [s.strip() for s in split_steps(text)] == [
        "Solution:\n\nWe factor the polynomial first.",
        "Then we read off the roots.\n\nDone.",
    ]


def test_empty_and_whitespace() -> None:
    assert split_steps("") == []
    assert split_steps("  \n\n ") == ["  \n\n "]
    assert split_steps("one short") == ["one short"]


def test_number_steps_counts_from_one() -> None:
    steps = split_steps("The first step is here.\n\nThe second step is here.")
    assert number_steps(steps) == "Substep 1: The first step is here.\n\nSubstep 2: The second step is here."


def test_processbench_steps_round_trip(shared_data: Path) -> None:
    # Real solutions: ProcessBench's GSM8K steps joined the way models write them.
    rows = json.loads((shared_data / "processbench/gsm8k.json").read_text())
    for row in rows:
        text = "\n\n".join(row["steps"])
        steps = split_steps(text)
        assert join_steps(steps) == text
        assert 1 <= len(steps) <= len(row["steps"])


paragraph = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=60)
separator = st.sampled_from(["\n\n", "\n \n", "\n\n\n", " \n\t\n  ", "\n"])
fence = st.sampled_from(["$$", "\\[", "\\]", "```", "\\begin{align}", "\\end{align}", "{", "}"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(paragraph, separator, st.one_of(st.just(""), fence)), max_size=12), st.integers(0, 20))
def test_round_trip_and_prefixes(parts: list[tuple[str, str, str]], cut: int) -> None:
    text = "".join(p + f + s for p, s, f in parts)
    steps = split_steps(text)
    assert join_steps(steps) == text
    assert text.startswith(join_steps(steps[:cut]))
    assert all(step for step in steps)
    assert all(step.strip() for step in steps[:-1]) or len(steps) <= 1
