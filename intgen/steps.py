"""Split a solution into steps, and put steps back together.

A step is a blank-line paragraph (as in the InT paper), except that a blank line inside a *closed* display
region is not a break, and tiny fragments (a lone "Solution:" or "**Step 2**") merge into the next step.
Each step keeps the whitespace that follows it, so `join_steps(split_steps(text)) == text` and
`join_steps(split_steps(text)[:t])` is exactly the first `t` steps of the original text — the prefix the
verify stage continues from.

Which regions are closed. A delimiter that is never closed protects nothing: the text around it splits on
blank lines as if it were not there, so one stray delimiter cannot swallow the rest of an attempt.

- Code fences: a fence line (```` ``` ```` or `~~~` at a line start) up to the next bare fence line of the
  same kind; fences elsewhere in a line are not fences.
- `\\[ ... \\]`: each `\\]` closes the latest `\\[` not yet closed; earlier open ones were stray.
  (`\\\\[2pt]`, a line break with spacing, is not an opener.)
- `\\begin{X} ... \\end{X}`: matched by name on a stack, so they nest; `\\end{X}` closes the innermost open
  `\\begin{X}` (any opened after it were never closed); an `\\end{X}` with no open `X` is stray.
- `$$ ... $$`: the same token opens and closes, so pairing runs left to right and each candidate pair (this
  `$$` and the next) must pass a test, else the first is dropped as stray and the second opens:
  - it holds some math (more than spaces and punctuation);
  - within one paragraph, that is enough (such a pair protects no break; inline `$$x$$` is common);
  - across a blank line, the opener must start its line, the closer end it (a trailing `.`, `,`, `;` or `:`
    allowed), and what lies between must be math: no prose (a word of three or more letters, or a common
    short English word, outside `\\text{}` and command names; a Markdown heading, list item or bold text),
    no `\\[` or `\\]`, no top-level display environment, no code fence.
  Why: a stray `$$` shifts the pairing of every later one, so the closer of a real block would pair with
  the opener of the next. What lies between two blocks is prose or nothing, so that pair fails and the
  pairing realigns at the next real block, while a real block (math, perhaps with a blank line) holds.

Linear in the length of the text (a few regex scans; each `$$` pair is tested once).
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections import Counter

MIN_STEP_CHARS = 12
# Recorded with every proposal: a change to how text is split into steps must show in the settings.
STEPS_VERSION = "blank-lines-v2"

_BLANK_LINE = re.compile(r"[ \t]*\n(?:[ \t]*\n)+\s*")
_HAS_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$", re.MULTILINE)
_DOLLARS = re.compile(r"(?<!\\)\$\$")
_BRACKET = re.compile(r"(?<!\\)\\([\[\]])")
_ENVIRONMENT = re.compile(r"(?<!\\)\\(begin|end)\{([^{}\n]*)\}")
_SOME_MATH = re.compile(r"[^\s.,;:!?]")
_LINE_END = re.compile(r"[ \t]*[.,;:]?[ \t]*(?:\n|$|(?=\\[\[\]]|\$\$))")  # or a stray delimiter glued on
_GLUED_DELIMITERS = re.compile(r"(?:\\[\[\]]|\$\$)[ \t]*$")  # a stray one just before a block's opener
# What a multi-paragraph `$$` block cannot hold: sentences, Markdown, other display delimiters.
_TEXT_GROUP = re.compile(r"\\(?:text\w*|math\w*|operatorname|mbox|begin|end)\s*\{[^{}]*\}")
_COMMAND = re.compile(r"\\[A-Za-z]+")
_PROSE = re.compile(
    r"[A-Za-z]{3,}|\b(?:an|as|at|be|by|if|in|is|it|of|on|or|so|to|we)\b"
    r"|^[ \t]*(?:#{1,6}[ \t]|[-*+][ \t]+[A-Za-z]|\d+\.[ \t]+[A-Za-z])|\*\*",
    re.MULTILINE,
)
_NOT_IN_DOLLARS = re.compile(
    r"(?<!\\)\\[\[\]]|\\begin\{(?:align|equation|gather|multline|eqnarray|flalign)\*?\}|^ {0,3}(?:```|~~~)",
    re.MULTILINE,
)


def _fence_spans(text: str) -> list[tuple[int, int]]:
    """Closed code fences: an opening fence line up to the next bare fence line of the same kind."""
    spans, opener = [], None
    for m in _FENCE.finditer(text):
        if opener is None:
            opener = m
        elif m[1][0] == opener[1][0] and len(m[1]) >= len(opener[1]) and not m[2].strip():
            spans.append((opener.start(), m.end()))
            opener = None
    return spans


def _bracket_spans(tokens: list[re.Match]) -> list[tuple[int, int]]:
    spans, opener = [], None
    for m in tokens:
        if m[1] == "[":
            opener = m.start()  # the latest opener wins: an earlier unclosed one was stray
        elif opener is not None:
            spans.append((opener, m.end()))
            opener = None
    return spans


def _environment_spans(tokens: list[re.Match]) -> list[tuple[int, int]]:
    spans, stack, open_names = [], [], Counter()  # stack: (name, start) of the open environments
    for m in tokens:
        if m[1] == "begin":
            stack.append((m[2], m.start()))
            open_names[m[2]] += 1
        elif open_names[m[2]]:  # a stray \end is skipped without scanning the stack (linear on runs of strays)
            depth = next(k for k in range(len(stack) - 1, -1, -1) if stack[k][0] == m[2])  # what it scans, it pops
            spans.append((stack[depth][1], m.end()))
            for name, _ in stack[depth:]:
                open_names[name] -= 1
            del stack[depth:]
    return spans


def _is_math_block(text: str, start: int, end: int) -> bool:
    """Whether the `$$` at `start` and the one ending at `end` can enclose a display block."""
    inner = text[start + 2:end - 2]
    if not _SOME_MATH.search(inner):  # between two blocks there may be nothing, or the first one's full stop
        return False
    if not _HAS_BLANK_LINE.search(inner):
        return True
    before = text[text.rfind("\n", 0, start) + 1:start]
    if _GLUED_DELIMITERS.sub("", before).strip() or not _LINE_END.match(text, end):
        return False
    words = _COMMAND.sub(" ", _TEXT_GROUP.sub(" ", inner))
    return not _PROSE.search(words) and not _NOT_IN_DOLLARS.search(inner)


def _dollar_spans(text: str, starts: list[int]) -> list[tuple[int, int]]:
    spans, i = [], 0
    while i + 1 < len(starts):
        if _is_math_block(text, starts[i], starts[i + 1] + 2):
            spans.append((starts[i], starts[i + 1] + 2))
            i += 2
        else:
            i += 1  # the opener was stray; the next `$$` opens instead
    return spans


def _protected_spans(text: str) -> list[tuple[int, int]]:
    """The closed regions a paragraph break must not cut, sorted and merged."""
    fences = _fence_spans(text)
    fence_starts = [a for a, _ in fences]

    def outside_fences(m: re.Match) -> bool:
        k = bisect_right(fence_starts, m.start()) - 1
        return k < 0 or fences[k][1] <= m.start()

    def tokens(pattern: re.Pattern) -> list[re.Match]:
        return [m for m in pattern.finditer(text) if outside_fences(m)]

    spans = sorted([*fences, *_bracket_spans(tokens(_BRACKET)), *_environment_spans(tokens(_ENVIRONMENT)),
                    *_dollar_spans(text, [m.start() for m in tokens(_DOLLARS)])])
    merged: list[tuple[int, int]] = []
    for a, b in spans:
        if merged and a < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


def _break_points(text: str) -> list[int]:
    """Offsets just after each paragraph break that lies outside a protected region."""
    protected = _protected_spans(text)
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
