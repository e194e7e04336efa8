"""Split a solution into steps, and put steps back together.

A step is a blank-line paragraph (as in the InT paper), except that display math (`$$...$$`,
`\\[...\\]`, `\\begin{..}...\\end{..}`) and code fences are never cut, and tiny fragments (a lone
"Solution:" or "**Step 2**") are merged into the next step.

Each step keeps the whitespace that follows it, so `join_steps(split_steps(text)) == text` and
`join_steps(split_steps(text)[:t])` is exactly the first `t` steps of the original text — the prefix
the verify stage continues from.
"""

from __future__ import annotations

import re

MIN_STEP_CHARS = 12
# Recorded with every proposal: a change to how text is split into steps must show in the settings.
STEPS_VERSION = "blank-lines-v1"

# Regions a paragraph break must not cut. An unclosed one runs to the end of the text.
_PROTECTED = re.compile(
    r"```.*?(?:```|\Z)"
    r"|~~~.*?(?:~~~|\Z)"
    r"|(?<!\\)\$\$.*?(?:(?<!\\)\$\$|\Z)"
    r"|\\\[.*?(?:\\\]|\Z)"
    r"|\\begin\{([^}]*)\}.*?(?:\\end\{\1\}|\Z)",
    re.DOTALL,
)
_BLANK_LINE = re.compile(r"[ \t]*\n(?:[ \t]*\n)+\s*")


def _break_points(text: str) -> list[int]:
    """Offsets just after each paragraph break that lies outside a protected region."""
    protected = [m.span() for m in _PROTECTED.finditer(text)]
    points = []
    region = 0
    for match in _BLANK_LINE.finditer(text):
        while region < len(protected) and protected[region][1] <= match.start():
            region += 1
        if region < len(protected) and protected[region][0] < match.end():
            continue  # the break lies inside (or overlaps) a protected region
        if 0 < match.start() and match.end() < len(text):
            points.append(match.end())
    return points


def split_steps(text: str, min_chars: int = MIN_STEP_CHARS) -> list[str]:
    """The steps of `text`, each with its trailing whitespace; an empty text has no steps."""
    if not text.strip():
        return [text] if text else []
    bounds = [0, *_break_points(text), len(text)]
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    steps: list[str] = []
    carry = ""
    for piece in pieces:  # a tiny piece joins the next one; a tiny last piece joins the one before
        carry += piece
        if len(piece.strip()) >= min_chars:
            steps.append(carry)
            carry = ""
    if carry:
        if steps:
            steps[-1] += carry
        else:
            steps.append(carry)
    return steps


def join_steps(steps: list[str]) -> str:
    """The text of these steps, exactly as it stood in the original."""
    return "".join(steps)


def number_steps(steps: list[str], label: str = "Substep") -> str:
    """Steps as the proposer sees them: `Substep 1: ...`, one per paragraph, counted from 1."""
    return "\n\n".join(f"{label} {i}: {step.strip()}" for i, step in enumerate(steps, start=1))


def step_ends(steps: list[str]) -> list[int]:
    """Where each step ends in the text it was split from (character offsets)."""
    ends, total = [], 0
    for step in steps:
        total += len(step)
        ends.append(total)
    return ends


def steps_at(text: str, ends: list[int]) -> list[str]:
    """The steps of `text` as recorded by `step_ends` (the same steps, whatever the splitter does now)."""
    return [text[start:end] for start, end in zip([0, *ends], ends)]
