from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from intgen.steps import join_steps, number_steps, split_steps


def stripped(text: str) -> list[str]:
    return [s.strip() for s in split_steps(text)]


def test_blank_lines_split_steps() -> None:
    text = "First we add the numbers.\n\nThen we divide by two.\n\n\nSo the answer is $\\boxed{4}$."
    assert stripped(text) == ["First we add the numbers.", "Then we divide by two.", "So the answer is $\\boxed{4}$."]


def test_display_math_and_code_are_never_cut() -> None:
    text = (
        "We compute the sum carefully.\n\n$$\na + b\n\n= c\n$$\n\nNext the matrix part.\n\n"
        "\\[\nx = 1\n\n y = 2\n\\]\n\n```python\nprint(1)\n\nprint(2)\n```\n\n"
        "\\begin{align*}\na &= 1 \\\\\n\nb &= 2\n\\end{align*}\n\nDone with all of it."
    )
    steps = stripped(text)
    assert "$$\na + b\n\n= c\n$$" in steps
    assert "\\[\nx = 1\n\n y = 2\n\\]" in steps
    assert "```python\nprint(1)\n\nprint(2)\n```" in steps
    assert "\\begin{align*}\na &= 1 \\\\\n\nb &= 2\n\\end{align*}" in steps
    assert len(steps) == 7


PROSE = "We check that the value found in this step is consistent with the problem statement."
UNCLOSED = [  # what paragraph 10 of 60 holds: a delimiter that is never closed
    "Now the display starts: $$ x^2 + 1",
    "$$",
    "\\[ \\frac{a}{b}",
    "\\begin{align} a &= b + c",
    "\\begin{cases} 1 & x > 0",
    "The prices were $$5 and $6 for the two tickets.",  # currency written after a stray `$`
    "\\]",  # a closer with no opener
    "\\end{align}",
    "```python",  # a code fence never closed
]


@pytest.mark.parametrize("stray", UNCLOSED)
def test_an_unclosed_delimiter_protects_nothing(stray: str) -> None:
    paragraphs = [f"{PROSE} ({i})" for i in range(60)]
    paragraphs[10] = stray
    paragraphs[30] = "$$\nx + y\n\n= 7\n$$"  # later real blocks (one blank line inside each) still hold together
    paragraphs[40] = "\\[\nx + y\n\n= 7\n\\]"
    paragraphs[50] = "\\begin{align}\nx &= 1 \\\\\n\ny &= 2\n\\end{align}"
    text = "\n\n".join(paragraphs)
    steps = split_steps(text)
    assert join_steps(steps) == text
    assert 59 <= len(steps) <= 61
    assert "$$\nx + y\n\n= 7\n$$" in stripped(text) and "\\[\nx + y\n\n= 7\n\\]" in stripped(text)


QWEN = (
    "To solve the problem, we need to find the total cost of the tickets.\n\n"
    "### Step 1: Find the price of one ticket\n"
    "The total for 3 tickets is $36, so one ticket costs:\n"
    "\\[\n\\frac{36}{3} = 12\n\\]\n\n"
    "### Step 2: Apply the discount\n"
    "The discount is 25%, so the discounted price is:\n"
    "\\[\n12 \\times (1 - 0.25) = 9\n\\]\n\n"
    "### Step 3: Total\n"
    "Four tickets at $9 each cost $36.\n\n"
    "Thus the answer is \\(\\boxed{36}\\)."
)
DISPLAYS = (
    "We expand the product first.\n\n"
    "$$\n(x+1)(x-1) = x^2 - 1\n$$\n\n"
    "$$\nx^2 - 1 = 15\n\nx^2 = 16\n$$\n\n"  # a display block right after another, with a blank line inside
    "So $x = 4$ or $x = -4$, and only the positive root fits.\n\n"
    "\\begin{align*}\nf(4) &= 16 - 1 \\\\\n&= 15\n\\end{align*}\n\n"
    "Therefore the answer is $\\boxed{4}$."
)
ALIGNED = (
    "Let $a$ and $b$ be the two numbers; we are told their sum and their product.\n\n"
    "$$\n\\begin{aligned}\na + b &= 10 \\\\\n\nab &= 21\n\\end{aligned}\n$$\n\n"
    "They are the roots of $t^2 - 10t + 21 = 0$, that is $t = 3$ and $t = 7$.\n\n"
    "The cost is \\$5 per item and $5 \\times 7 = 35$, so the total is $35.\n\n"
    "Hence the larger number is $\\boxed{7}$."
)
CURRENCY = (
    "Sam pays $12 for lunch and $8 for a drink, so he pays $20 in all.\n\n"
    "He had $$50 at the start, so he has $50 - 20 = 30$ dollars left.\n\n"
    "He then buys a book for $15, which leaves him with $15.\n\n"
    "The answer is $\\boxed{15}$."
)


@pytest.mark.parametrize("text, expected", [
    (QWEN, [
        "To solve the problem, we need to find the total cost of the tickets.",
        "### Step 1: Find the price of one ticket\nThe total for 3 tickets is $36, so one ticket costs:\n"
        "\\[\n\\frac{36}{3} = 12\n\\]",
        "### Step 2: Apply the discount\nThe discount is 25%, so the discounted price is:\n"
        "\\[\n12 \\times (1 - 0.25) = 9\n\\]",
        "### Step 3: Total\nFour tickets at $9 each cost $36.",
        "Thus the answer is \\(\\boxed{36}\\).",
    ]),
    (DISPLAYS, [
        "We expand the product first.", "$$\n(x+1)(x-1) = x^2 - 1\n$$", "$$\nx^2 - 1 = 15\n\nx^2 = 16\n$$",
        "So $x = 4$ or $x = -4$, and only the positive root fits.",
        "\\begin{align*}\nf(4) &= 16 - 1 \\\\\n&= 15\n\\end{align*}",
        "Therefore the answer is $\\boxed{4}$.",
    ]),
    (ALIGNED, [
        "Let $a$ and $b$ be the two numbers; we are told their sum and their product.",
        "$$\n\\begin{aligned}\na + b &= 10 \\\\\n\nab &= 21\n\\end{aligned}\n$$",
        "They are the roots of $t^2 - 10t + 21 = 0$, that is $t = 3$ and $t = 7$.",
        "The cost is \\$5 per item and $5 \\times 7 = 35$, so the total is $35.",
        "Hence the larger number is $\\boxed{7}$.",
    ]),
    (CURRENCY, [  # "$$50" is a stray `$$`: it must not join the paragraphs up to the next `$$`
        "Sam pays $12 for lunch and $8 for a drink, so he pays $20 in all.",
        "He had $$50 at the start, so he has $50 - 20 = 30$ dollars left.",
        "He then buys a book for $15, which leaves him with $15.", "The answer is $\\boxed{15}$.",
    ]),
    ("We find the sum.\n\n$$\nS = 1 + 2\n$$\n\n$$ stray, then prose\n\n$$\nT = 3\n\n= 4\n$$\n\nDone with it all.", [
        "We find the sum.", "$$\nS = 1 + 2\n$$", "$$ stray, then prose", "$$\nT = 3\n\n= 4\n$$", "Done with it all.",
    ]),
    ("So the sum is:\n\n$$\n1 + 2 = 3.\n\n\\text{Hence } 3 > 2\n$$.\n\nWe now check the next claim.", [
        "So the sum is:", "$$\n1 + 2 = 3.\n\n\\text{Hence } 3 > 2\n$$.", "We now check the next claim.",
    ]),
    ("A paragraph with a stray \\[ in it.\n\nAnother paragraph here.\n\n\\[\nx = 1\n\n= 2\n\\]\n\nThe end of it.", [
        "A paragraph with a stray \\[ in it.", "Another paragraph here.", "\\[\nx = 1\n\n= 2\n\\]", "The end of it.",
    ]),
    ("Open \\begin{align} here.\n\nMore text follows.\n\n\\begin{align}\na &= 1\n\n\\end{align}\n\nThe end of it.", [
        "Open \\begin{align} here.", "More text follows.", "\\begin{align}\na &= 1\n\n\\end{align}", "The end of it.",
    ]),
    ("Code with a fence inside a line ``` here.\n\nThen the real code below.\n\n```\nx = 1\n\ny = 2\n```\n\nDone.", [
        "Code with a fence inside a line ``` here.", "Then the real code below.", "```\nx = 1\n\ny = 2\n```\n\nDone.",
    ]),
], ids=["qwen-headings", "consecutive-displays", "aligned-currency", "currency-stray", "stray-between-blocks",
        "trailing-period", "stray-bracket", "stray-begin", "inline-fence"])
def test_real_looking_solutions(text: str, expected: list[str]) -> None:
    assert stripped(text) == expected
    assert join_steps(split_steps(text)) == text


def test_tiny_fragments_merge_into_the_next_step() -> None:
    text = "Solution:\n\n**Step 1**\n\nWe factor the polynomial first.\n\nDone.\n\n"
    steps = split_steps(text)
    assert steps == [text]
    text = "Solution:\n\nWe factor the polynomial first.\n\nThen we read off the roots.\n\nDone."
    assert stripped(text) == ["Solution:\n\nWe factor the polynomial first.", "Then we read off the roots.\n\nDone."]


def test_empty_and_whitespace() -> None:
    assert split_steps("") == []
    assert split_steps("  \n\n ") == ["  \n\n "]
    assert split_steps("one short") == ["one short"]


def test_number_steps_counts_from_one() -> None:
    steps = split_steps("The first step is here.\n\nThe second step is here.")
    assert number_steps(steps) == "Substep 1: The first step is here.\n\nSubstep 2: The second step is here."


def test_processbench_steps_split_back_exactly(evalsets: Path) -> None:
    # Real solutions: ProcessBench's GSM8K steps (173 of 400 with \[...\]) joined the way models write them.
    rows = json.loads((evalsets / "processbench/gsm8k.json").read_text())
    for row in rows:
        text = "\n\n".join(row["steps"])
        steps = split_steps(text)
        assert join_steps(steps) == text
        assert [s.strip() for s in steps] == [s.strip() for s in row["steps"]]


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


# --- one stray delimiter anywhere in a realistic solution moves the step count by at most one -----------------

SENTENCES = [
    "We substitute $x = 3$ into the first equation.", "The total cost is $12, so each of the 3 tickets costs $4.",
    "Since $a + b = 10$ and $ab = 21$, the numbers are roots of a quadratic.", "This gives the value we need.",
    "Now we check the boundary case where $n = 0$.", "The discount saves \\$5, which leaves $\\$15$ to pay.",
    "Each box holds $6$ apples, and there are $7$ boxes.", "By the triangle inequality, $|x + y| \\le |x| + |y|$.",
]
MATH = ["x^2 - 5x + 6 = 0", "\\frac{a + b}{2} \\geq \\sqrt{ab}", "3 \\times 4 = 12", "\\text{Area} = \\pi r^2",
        "(x - 2)(x - 3) = 0", "f(x) = \\begin{cases} x & x > 0 \\\\ -x & x \\le 0 \\end{cases}",
        "S_n = \\frac{n(n+1)}{2}"]
ALIGN_ROWS = ["a &= 2b + 1 \\\\", "&= 7 \\\\", "b &= 3"]

sentence_text = st.lists(st.sampled_from(SENTENCES), min_size=1, max_size=3).map(" ".join)
math_lines = st.lists(st.sampled_from(MATH), min_size=1, max_size=2)
blank_inside = st.booleans()  # some display blocks hold one blank line, as models sometimes write


def _lines(lines: list[str], blank: bool) -> str:
    """The lines of a block, with one blank line after the first when `blank` (more than one could each be cut)."""
    return "\n".join([lines[0], "", *lines[1:]] if blank else lines)


@st.composite
def display(draw) -> str:
    lines, blank = draw(math_lines), draw(blank_inside)
    body = _lines(lines, blank)
    kind = draw(st.sampled_from(["$$", "$$ inline", "\\[", "align", "align*", "aligned"]))
    if kind == "$$":
        return f"$$\n{body}\n$${draw(st.sampled_from(['', '.', ',']))}"
    if kind == "$$ inline":
        return f"$$ {lines[0]} $$"
    if kind == "\\[":
        return f"\\[\n{body}\n\\]"
    rows = _lines(draw(st.lists(st.sampled_from(ALIGN_ROWS), min_size=1, max_size=3)), blank)
    if kind == "aligned":
        return f"$$\n\\begin{{aligned}}\n{rows}\n\\end{{aligned}}\n$$"
    return f"\\begin{{{kind}}}\n{rows}\n\\end{{{kind}}}"


@st.composite
def block(draw) -> str:
    kind = draw(st.sampled_from(["prose", "prose", "heading", "lead-in", "display", "consecutive"]))
    if kind == "prose":
        return draw(sentence_text)
    if kind == "heading":
        return f"### Step {draw(st.integers(1, 9))}: {draw(st.sampled_from(['Set up', 'Solve the equation']))}\n" \
               + draw(sentence_text)
    if kind == "lead-in":  # "We have:" and a display block on the next line, in the same paragraph
        return f"{draw(sentence_text)} We have:\n{draw(display())}"
    if kind == "display":
        return draw(display())
    return draw(st.sampled_from(["\n\n", "\n"])).join(draw(st.lists(display(), min_size=2, max_size=3)))


@st.composite
def solution(draw) -> str:
    blocks = draw(st.lists(block(), min_size=3, max_size=20))
    text = ""
    for b in blocks:
        text += b + draw(st.sampled_from(["\n\n", "\n\n", "\n\n\n"]))
    return text + "So the answer is $\\boxed{7}$."


STRAYS = ["$$", "\\[", "\\]", "\\begin{align}", "\\end{align}", "$$5"]
# Offsets that would cut an existing token are left out: a `$` put into `$$`, `\frac` or `\begin{align*}` does not
# add a stray delimiter, it destroys a real one (or renames it), and then no rule can tell what the text meant.
_TOKEN = re.compile(r"\\(?:begin|end)\{[^{}]*\}|\\[A-Za-z]+|\\.|\$\$")


def insertion_points(text: str) -> list[int]:
    inside = {k for m in _TOKEN.finditer(text) for k in range(m.start() + 1, m.end())}
    return [k for k in range(len(text) + 1) if k not in inside]


# found by this test: a stray \[ glued between a block's closing $$ and the next block's opening $$ unpaired both
GLUED_STRAY = ("Each box holds $6$ apples.\n\n$$\nx^2 - 5x + 6 = 0\n\n\\text{Area} = \\pi r^2\n$$\n$$\nx^2 - 5x + 6 = 0"
               "\n\nx^2 - 5x + 6 = 0\n$$\n\nSo the answer is $\\boxed{7}$.")


@settings(max_examples=1500, deadline=None)
@given(solution(), st.sampled_from(STRAYS), st.integers(min_value=0))
def test_one_stray_delimiter_moves_the_step_count_by_at_most_one(text: str, stray: str, where: int) -> None:
    points = insertion_points(text)
    at = points[where % len(points)]
    changed = text[:at] + stray + text[at:]
    assert join_steps(split_steps(changed)) == changed
    assert abs(len(split_steps(changed)) - len(split_steps(text))) <= 1, (text, at)


@pytest.mark.parametrize("stray", ["\\[", "\\]", "$$"])
def test_a_stray_delimiter_glued_between_two_blocks_leaves_both_whole(stray: str) -> None:
    at = GLUED_STRAY.index("$$\n$$") + 2  # right after the first block's closing $$
    changed = GLUED_STRAY[:at] + stray + GLUED_STRAY[at:]
    assert join_steps(split_steps(changed)) == changed
    assert abs(len(split_steps(changed)) - len(split_steps(GLUED_STRAY))) <= 1
    before = GLUED_STRAY.index("$$\n$$") + 3  # right before the second block's opening $$
    changed = GLUED_STRAY[:before] + stray + GLUED_STRAY[before:]
    assert abs(len(split_steps(changed)) - len(split_steps(GLUED_STRAY))) <= 1


def test_a_30k_character_attempt_splits_in_linear_time() -> None:
    unit = QWEN + "\n\n" + DISPLAYS + "\n\n" + CURRENCY + "\n\n"
    text = unit * (30_000 // len(unit) + 1)
    start = time.perf_counter()
    steps = split_steps(text)
    elapsed = time.perf_counter() - start
    assert len(steps) >= 50 and join_steps(steps) == text
    assert elapsed < 0.25, elapsed  # measured 2-3 ms here; generous for slow CI machines
