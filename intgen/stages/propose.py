"""propose: for each failed attempt, find the first critical error and write one intervention.

Building the prompt and parsing the reply are separate pure functions. The reply is read as JSON (what a
schema-constrained engine returns), as the paper's release block `<intervention>{"content": ..., "location": N}
</intervention>`, or as free text ending in `<error_step>` / `<intervention>` tags; where a model writes several
blocks, the last well-formed one wins. Every rejection has a reason.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Generator
from dataclasses import dataclass
from enum import Enum
from typing import Any

import polars as pl

from intgen.backends.base import ERROR, LENGTH, Completion, Request, Sampling, make_request
from intgen.grading import BARE, boxed_answers, provisional
from intgen.resources import Prompt, fill
from intgen.stages import Answer, Ask, Chained, Compute, Grading, ModelCalls, Part, Stage, grade
from intgen.stages.verify import intervened_text
from intgen.steps import STEPS_VERSION, number_steps, split_steps, step_ends

# rejection reasons
NO_BLOCK = "no_block"
BAD_LOCATION = "bad_location"
EMPTY = "empty"
NO_ERROR_FOUND = "no_error_found"
LEAKS_ANSWER = "leaks_answer"
PROMPT_TOO_LONG = "prompt_too_long"
CALL_FAILED = "call_failed"
NO_STEPS = "no_steps"

TRUNCATED = "truncated"  # the reply stopped at the token limit
ECHO = "echo"  # the intervention repeats a key name, the verification text or one of the attempt's own steps
DEGENERATE = "degenerate"  # a bare number, a single word or identifier, a JSON or markup fragment, no words at all
NO_REFERENCE = "no_reference"  # the problem has no reference solution (see --allow-no-reference)
LEAK_TEST_FAILED = "leak_test_failed"  # the leak test could not decide in time (retried on the next run)



class ProposeFor(str, Enum):
    """Which attempts get proposals: every attempt not graded correct that has text to critique (the release's
    choice: wrong, truncated and unboxed ones), or only those graded wrong."""

    not_correct = "not-correct"
    incorrect = "incorrect"


# Small models echo the format's placeholder instead of writing an intervention.
PLACEHOLDERS = {"the replacement step", "replacement step", "the final intervention step", "the final step",
                "the corrected step", "..."}
KEY_NAMES = {"verification", "intervention", "error_step", "error step", "content", "location", "self_check",
             "self-check", "self check", "draft"}


def proposal_id(attempt_id: str, index: int) -> str:
    return f"{attempt_id}/p{index}"


def proposal_schema(num_steps: int) -> dict[str, Any]:
    """The JSON a constrained engine must return, its keys in the order they are written (engines generate in
    key order): the verification log, a draft and its self-check — all before the answer exists — then the
    error step as an integer within this attempt's own steps, or 0 when there is no critical error (the
    paper's "empty" outcome, e.g. a misgraded attempt), then the final intervention (empty with 0). No
    maxLength: llama.cpp's converter unrolls it into a grammar too large to load; max_tokens bounds the reply."""
    return {
        "type": "object",
        "properties": {
            "verification": {"type": "string",
                             "description": "the verification log, quoting the attempt, and the issues found"},
            "draft": {"type": "string", "description": "a draft of the intervention and the substep it replaces"},
            "self_check": {"type": "string", "description": "the self-check questions answered, and any revision"},
            # an enum as well as the bounds: llama.cpp's grammars ignore integer minimum/maximum
            "error_step": {"type": "integer", "minimum": 0, "maximum": num_steps, "enum": list(range(num_steps + 1)),
                           "description": "the substep with the first critical error; 0 if there is none"},
            "intervention": {"type": "string", "description": "the final intervention step; empty if error_step is 0"},
        },
        "required": ["verification", "draft", "self_check", "error_step", "intervention"],
        "additionalProperties": False,
    }


# What the proposer reads in place of a reference solution, with --allow-no-reference.
NO_REFERENCE_TEXT = "(No reference solution is available. Only the correct final answer is known: {answer}.)"


def reference_messages(problem: str, solution: str, template: str) -> list[dict[str, str]]:
    """Turn 1 of the two-turn prompt: the proposer solves the problem guided by the reference."""
    return [{"role": "user", "content": fill(template, problem=problem, reference_solution=solution)}]


def critique_messages(
    problem: str,
    solution: str,
    steps: list[str],
    critique_template: str,
    turn1: tuple[list[dict[str, str]], str] | None = None,
    answer: str = "",
) -> list[dict[str, str]]:
    """The proposer's prompt. With `turn1` (messages, the proposer's guided solution) it is the paper's
    two-turn prompt; without, the single-turn variant (`critique_template` then holds everything).
    `answer` (the gold answer) is what the self-check asks the intervention not to contain."""
    body = fill(
        critique_template,
        problem=problem,
        reference_solution=solution,
        numbered_attempt=number_steps(steps),
        num_steps=str(len(steps)),
        answer=answer,
    )
    history = [*turn1[0], {"role": "assistant", "content": turn1[1]}] if turn1 else []
    return history + [{"role": "user", "content": body}]


# --- parsing ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Parsed:
    error_step: int | None
    intervention: str | None
    verification: str | None  # the log, then the draft and the self-check where the reply has them
    reject_reason: str | None  # None: accepted (so far; the leak test comes after)
    written: str | None = None  # the intervention as it stands in the reply, before any unescaping


_NUMBER_WORDS = {
    w: i
    for i, group in enumerate(
        [("zero", "zeroth"), ("one", "first"), ("two", "second"), ("three", "third"), ("four", "fourth"),
         ("five", "fifth"), ("six", "sixth"), ("seven", "seventh"), ("eight", "eighth"), ("nine", "ninth"),
         ("ten", "tenth"), ("eleven", "eleventh"), ("twelve", "twelfth"), ("thirteen", "thirteenth"),
         ("fourteen", "fourteenth"), ("fifteen", "fifteenth"), ("sixteen", "sixteenth"),
         ("seventeen", "seventeenth"), ("eighteen", "eighteenth"), ("nineteen", "nineteenth"),
         ("twenty", "twentieth")]
    )
    for w in group
}
_NO_ERROR = re.compile(r"\b(?:none|no\s+(?:critical\s+)?errors?|n/?a|null|nothing)\b", re.I)
_NO_ERROR_NUMBERS = {0, -1}
_LEADING_NO_ERROR = re.compile(
    r"\W*(?:none\b|no\b(?!\.\s*\d)|n/?a\b|null\b|nothing\b|there\s+is\s+no\b"
    r"|all\s+(?:the\s+)?(?:sub)?steps\s+are\s+correct)",
    re.I,
)


def normalize_step(raw: Any) -> int | str | None:
    """An error location as an int; "none" where the model says there is no error; None if unreadable.
    Accepts 5, "5", "Substep 5", "Step #5", "**5**", "5th", "five", "the fifth substep"; a reply that starts
    by saying there is no error ("None", "No error; step 3 is fine") is "none". Our numbering is "Substep N":
    where both appear, "In the student's Step 5 (Substep 7)" is 7 — "Step 5" is the attempt's own heading."""
    if raw is None or isinstance(raw, bool):
        return None
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if isinstance(raw, int):
        return "none" if raw in _NO_ERROR_NUMBERS else raw
    text = str(raw).strip().strip("*_`'\"").strip()
    if not text:
        return None
    if _LEADING_NO_ERROR.match(text):  # "No error; step 3 is fine" is not step 3
        return "none"
    match = (
        re.search(r"sub-?\s*step\s*#?\s*(-?\d+)", text, re.I)
        or re.search(r"step\s*#?\s*(-?\d+)", text, re.I)
        or re.fullmatch(r"\(?#?\s*(-?\d+)\s*[.):]?", text)
        or re.search(r"(?<![\w.])(\d+)(?:st|nd|rd|th)\b", text, re.I)  # "3rd", "the 5th substep"
    )
    if match is None:
        match = re.search(r"(?<![\w.])(-?\d+)(?![\w.])", text)
    if match is not None:
        value = int(match.group(1))
        return "none" if value in _NO_ERROR_NUMBERS else value
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in _NUMBER_WORDS and _NUMBER_WORDS[word] > 0:
            return _NUMBER_WORDS[word]
    return "none" if _NO_ERROR.search(text) else None


# --- reading the objects models write -----------------------------------------------------------
#
# JSON written by a model holds LaTeX with one backslash: `\frac`, `\times`, `\beta`, `\neq`, `\rho` are JSON
# escapes (form feed, tab, backspace, newline, carriage return) and `\sqrt`, `\cdot`, `\underline` are invalid
# ones. The release's block is a Python dict: single or triple quotes, `{{ }}`, `"location": Substep 5`. One small
# reader takes both; model text never reaches eval. In a string, `\\`, `\"`, `\'`, `\/` and `\uXXXX` are escapes;
# `\n`, `\r`, `\t` are too unless they begin a LaTeX command (`\n` + "eq"; a real newline is "\n\nNext we");
# every other backslash (`\frac`, `\beta`, `\sqrt`) is LaTeX and kept as written.

_LATEX_N = frozenset(
    "ne neq nu nabla neg not notin nmid nleq ngeq nless ngtr nexists natural nearrow nwarrow newline nolimits"
    " nonumber notag nsubseteq nsupseteq nsubset nsupset ncong nsim nparallel nrightarrow nleftarrow"
    " nleftrightarrow nLeftarrow nRightarrow nLeftrightarrow nvdash norm".split()
)
_LATEX_T = frozenset(
    "times theta tau tan tanh to top triangle triangleleft triangleright trianglelefteq trianglerighteq triangleq"
    " tilde tfrac tbinom therefore tiny tt tag textstyle".split()
)
_LATEX_R = frozenset(
    "rho right rightarrow rightleftharpoons rightharpoonup rightharpoondown rightsquigarrow rangle rfloor rceil"
    " rbrace rbrack rvert rVert rm rmfamily rtimes root rule raisebox renewcommand ref ring".split()
)
_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|([nrt])([A-Za-z]*)|([\"'/\\]))")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean_text(text: str) -> str:
    """No control character but the newline: CR and CRLF become newlines, tabs spaces, the rest go; an unpaired
    surrogate (from a stray `\\ud83d`) is replaced, so the text can be written as UTF-8."""
    if not text.isascii():  # (an ASCII text has no surrogate)
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " "))


def _unescape_one(match: re.Match[str]) -> str:
    if match.group(1):
        return chr(int(match.group(1), 16))
    if match.group(4):
        return match.group(4)
    letter, rest = match.group(2), match.group(3)
    word = letter + rest
    latex = word.startswith("text") or word in {"n": _LATEX_N, "r": _LATEX_R, "t": _LATEX_T}[letter]
    return match.group(0) if latex else {"n": "\n", "r": "\r", "t": "\t"}[letter] + rest


def unescape(body: str) -> str:
    """A string literal's body as the model meant it (see above), with no control character but the newline."""
    return clean_text(_ESCAPE.sub(_unescape_one, body) if "\\" in body else body)


_VALUE_END = re.compile(r"\s*(?:[,}\]:]|$)")
_SPACE = re.compile(r"\s*")
_BARE_VALUE = re.compile(r"[^,}\]\n]*")
_CLOSING = {quote: re.compile(r"\\.|" + quote, re.S) for quote in ('"', "'")}  # an escape, or the quote
MAX_INNER_QUOTES = 8  # a string may hold a few unescaped quotes; with no bound, each candidate scans the whole reply


def _skip(text: str, i: int) -> int:
    """The position of the first non-space at or after `i`."""
    return _SPACE.match(text, i).end()  # type: ignore[union-attr]


def _read_string(text: str, i: int) -> tuple[str, str, int] | None:
    """The quoted string at `text[i]`: (decoded, as written, end), or None. A quote closes the string only when a
    comma, brace, bracket or colon follows it, so "the student's step" and an unescaped inner quote survive."""
    quote = text[i:i + 1]
    if quote not in _CLOSING:
        return None
    if text.startswith(quote * 3, i):
        start = i + 3
        end = text.find(quote * 3, start)
        return None if end < 0 else (unescape(text[start:end]), text[start:end], end + 3)
    start = i + 1
    inner = 0
    for match in _CLOSING[quote].finditer(text, start):
        if match.group(0) != quote:
            continue
        if _VALUE_END.match(text, match.end()):
            return unescape(text[start:match.start()]), text[start:match.start()], match.end()
        inner += 1
        if inner > MAX_INNER_QUOTES:
            return None
    return None


_INT = re.compile(r"-?\d+")
_FLOAT = re.compile(r"-?\d+\.\d*(?:[eE][-+]?\d+)?")


def _scalar(raw: str) -> Any:
    if raw in ("true", "True", "false", "False"):
        return raw in ("true", "True")
    if raw in ("null", "None"):
        return None
    if _INT.fullmatch(raw):
        return int(raw)
    if _FLOAT.fullmatch(raw):
        return float(raw)
    return raw  # "Substep 5", INSERT_STEP_NUMBER: for normalize_step to judge


def _read_value(text: str, i: int, depth: int) -> tuple[Any, str | None, int] | None:
    """(value, the string as written or None, end) of the value at `text[i]`, or None."""
    i = _skip(text, i)
    if text.startswith(("'", '"'), i):
        return _read_string(text, i)
    if text.startswith("{", i):
        found = _read_object(text, i, depth + 1)
        return None if found is None else (found[0], None, found[2])
    if text.startswith("[", i):
        return _read_array(text, i, depth + 1)
    end = _BARE_VALUE.match(text, i).end()  # type: ignore[union-attr]
    raw = text[i:end].strip()
    return (_scalar(raw), None, end) if raw else None


def _read_array(text: str, i: int, depth: int) -> tuple[list[Any], None, int] | None:
    items: list[Any] = []
    i += 1
    while depth <= 8:
        i = _skip(text, i)
        if text.startswith("]", i):
            return items, None, i + 1
        value = _read_value(text, i, depth)
        if value is None:
            return None
        items.append(value[0])
        i = _skip(text, value[2])
        if text.startswith(",", i):
            i += 1
        elif not text.startswith("]", i):
            return None
    return None


def _read_object(text: str, i: int, depth: int = 0) -> tuple[dict[str, Any], dict[str, str], int] | None:
    """(object, its string values as written, end) of the flat or nested object at `text[i]` == "{", or None."""
    obj: dict[str, Any] = {}
    written: dict[str, str] = {}
    i += 1
    while depth <= 8:  # deeper nesting is no proposal
        i = _skip(text, i)
        if text.startswith("}", i):
            return obj, written, i + 1
        key = _read_string(text, i)
        if key is None:
            return None
        i = _skip(text, key[2])
        if not text.startswith(":", i):
            return None
        value = _read_value(text, i + 1, depth)
        if value is None:
            return None
        obj[key[0]] = value[0]
        if value[1] is not None:
            written[key[0]] = value[1]
        i = _skip(text, value[2])
        if text.startswith(",", i):
            i += 1
        elif not text.startswith("}", i):
            return None
    return None


def read_object(text: str, i: int = 0) -> tuple[dict[str, Any], dict[str, str], int] | None:
    """The object at `text[i]`, also when written `{{ ... }}` (the release's prompt shows doubled braces)."""
    if text.startswith("{{", i):
        found = _read_object(text, i + 1)
        if found is not None:
            end = _skip(text, found[2])
            return found[0], found[1], end + 1 if text.startswith("}", end) else found[2]
    return _read_object(text, i) if text.startswith("{", i) else None


_OBJECT_START = re.compile(r"\{\{?\s*[\"']")
_OUR_KEYS = {"error_step", "intervention"}
_RELEASE_KEYS = {"content", "location"}


def _block(obj: dict[str, Any], written: dict[str, str]) -> dict[str, Any] | None:
    """An object as a block: ours ({verification, draft, self_check, error_step, intervention}) or the release's
    ({content, location}, where an empty content means "no critical error"); None for any other object."""
    if _OUR_KEYS & set(obj):
        return {"error_step": obj.get("error_step"), "intervention": obj.get("intervention"),
                "verification": obj.get("verification"), "draft": obj.get("draft"),
                "self_check": obj.get("self_check"), "written": written.get("intervention")}
    if _RELEASE_KEYS & set(obj):
        return {"error_step": obj.get("location"), "intervention": obj.get("content"), "release": True,
                "written": written.get("content")}
    return None


def _object_blocks(text: str) -> list[tuple[int, dict[str, Any]]]:
    """(end position, block) for each object in the text that is a block; one inside a block is not another."""
    found = []
    position = 0
    while (match := _OBJECT_START.search(text, position)) is not None:
        read = read_object(text, match.start())
        block = _block(read[0], read[1]) if read is not None else None
        if read is not None and block is not None:
            found.append((read[2], block))
            position = read[2]
        else:
            position = match.start() + 1
    return found


_TAG = {name: re.compile(rf"<{name}>(.*?)</{name}>", re.S | re.I) for name in ("error_step", "intervention")}


def _tag_blocks(text: str) -> list[tuple[int, dict[str, Any]]]:
    steps = [(m.start(), m.group(1)) for m in _TAG["error_step"].finditer(text)]
    blocks = []
    for m in _TAG["intervention"].finditer(text):
        body = m.group(1).strip()
        if _OBJECT_START.match(body) and read_object(body) is not None:
            continue  # `<intervention>{"content": ..., "location": N}</intervention>`: read as an object
        before = [value for start, value in steps if start < m.start()]
        after = [value for start, value in steps if start > m.end()]
        step = before[-1] if before else (after[0] if after else None)
        blocks.append((m.end(), {"error_step": step, "intervention": m.group(1), "written": m.group(1)}))
    if not blocks and steps:
        blocks.append((len(text), {"error_step": steps[-1][1], "intervention": None}))
    return blocks


def _text(value: Any) -> str | None:
    """A field as stored text: cleaned and stripped; a number stays readable ("112"), other values are None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    return clean_text(value).strip() if isinstance(value, str) else None


def _plain(text: str) -> str:
    """Text compared for echoes: lower case, markup and punctuation at the ends gone, spaces folded."""
    return re.sub(r"\s+", " ", text).strip(" \t\n*_`'\".:;<>[]{}").lower()


def is_echo(intervention: str, logs: list[str | None], steps: list[str], instructions: str = "") -> bool:
    """Does the intervention only repeat a key name, a log of the reply (the verification, the self-check), one
    of the attempt's steps, or the prompt's own wording (`instructions`)? (A final intervention equal to its
    draft is no echo: the draft passed the check.)"""
    plain = _plain(intervention)
    return plain in KEY_NAMES or any(log and plain == _plain(log) for log in logs) or any(
        plain == _plain(step) for step in steps
    ) or echoes_instructions(intervention, instructions)


_LOWER_WORDS = re.compile(r"[^\W\d_]+")


@functools.lru_cache(maxsize=16)
def _told(instructions: str) -> tuple[str, frozenset[str]]:
    """The prompt's words, spaced (" a b c ") and as a set: read once per prompt, not once per proposal."""
    told = _LOWER_WORDS.findall(instructions.lower())
    return " " + " ".join(told) + " ", frozenset(told)


def echoes_instructions(intervention: str, instructions: str) -> bool:
    """Is the intervention the prompt's own wording: a run of its words with at most one word of its own at
    either end, or a short text (8 words at most, no math) made of its words only? Small models fill the format
    with its descriptions: "the final step, or", "the final step completed", "The final step of the intervention"."""
    words = _LOWER_WORDS.findall(intervention.lower())
    if not words or not instructions:
        return False
    text, told = _told(instructions)
    runs = [words] + ([words[1:], words[:-1]] if len(words) >= 3 else [])
    if any(f" {' '.join(run)} " in text for run in runs):
        return True
    return len(words) <= 8 and not re.search(r"[\d$\\=]", intervention) and set(words) <= told


_WORD = re.compile(r"[^\W\d_]{2,}")  # two letters or more, any script
# JSON begins here, or one of the format's own keys stands in the text
_JSON_KEY = re.compile(r"^\s*[\[{]?\s*[\"']\w+[\"']\s*:"
                       r"|[\"'](?:error_step|intervention|verification|content|location|draft|self_check)[\"']\s*:")


def is_degenerate(intervention: str) -> bool:
    """No step at all: a bare number ("112"), a single word or identifier ("test_replication"), a JSON or markup
    fragment, text without words. A short real step, even mostly math ("I factor $x^2-5x+6=(x-2)(x-3)$ first"),
    is not. LaTeX command names and markup tags do not count as words."""
    bare = re.sub(r"\\[A-Za-z]+|<[^<>]*>", " ", intervention)
    core = bare.strip(" \n*_`'\".,:;!?()[]{}$")
    return bool(
        re.fullmatch(r"[-+]?\d[\d,]*(?:\.\d+)?%?", core)
        or re.fullmatch(r"[^\W\d][\w\-]*", core)
        or _JSON_KEY.search(intervention)
        or not _WORD.search(bare)
    )


def _verification(block: dict[str, Any]) -> str | None:
    """The log stored with a proposal: the verification, then the draft and the self-check where given."""
    parts = [(label, _text(block.get(key))) for label, key in (("", "verification"), ("Draft: ", "draft"),
                                                                ("Self-check: ", "self_check"))]
    text = "\n\n".join(label + value for label, value in parts if value)
    return text or None


def _judge(block: dict[str, Any], num_steps: int, steps: list[str], instructions: str = "") -> Parsed:
    step = normalize_step(block.get("error_step"))
    intervention = _text(block.get("intervention"))
    verification = _verification(block)

    def parsed(error_step: int | None, reason: str | None) -> Parsed:
        return Parsed(error_step, intervention, verification, reason, block.get("written"))

    if step == "none" or (block.get("release") and not intervention):  # the release: empty content, no error
        return parsed(None, NO_ERROR_FOUND)
    if not isinstance(step, int) or not 1 <= step <= num_steps:
        return parsed(None, BAD_LOCATION)
    if not intervention or not re.search(r"\w", intervention) or intervention.strip(" .<>[]").lower() in PLACEHOLDERS:
        return parsed(step, EMPTY)
    if is_echo(intervention, [_text(block.get("verification")), _text(block.get("self_check"))], steps, instructions):
        return parsed(step, ECHO)
    if is_degenerate(intervention):
        return parsed(step, DEGENERATE)
    return parsed(step, None)


def reply_blocks(text: str | None) -> list[dict[str, Any]]:
    """Every block of a reply (objects and tags), in the order they end."""
    if not text:
        return []
    return [block for _, block in sorted(_object_blocks(text) + _tag_blocks(text), key=lambda b: b[0])]


def parse_proposal(text: str | None, num_steps: int, steps: list[str] | None = None, instructions: str = "") -> Parsed:
    """Read the proposer's reply; the last well-formed block wins, else the last block's reason. With the
    attempt's `steps` and the prompt's `instructions`, an intervention that only repeats one of them is an echo."""
    judged = [_judge(block, num_steps, steps or [], instructions) for block in reply_blocks(text)]
    if not judged:
        return Parsed(None, None, None, NO_BLOCK)
    accepted = [p for p in judged if p.reject_reason is None]
    return accepted[-1] if accepted else judged[-1]


# --- the answer-leak test -----------------------------------------------------------------------
#
# An intervention must not state the final answer, in any phrasing. Two tests, either one a leak:
# 1. The gold answer as a standalone token (`states_gold`): "we get $a+b+c = 30$" for 30 — but not "17" for 7,
#    `x^{12}` or `a_{12}` for 12, `1/12` or `12.5` or `12x` or `12 + 5` for 12. Only for a gold of two characters
#    or more not counting LaTeX command names, not made of words alone ("No", "odd"), and not standing in the
#    problem statement: "7", "x", "\pi" or a number the problem itself uses would be everywhere.
# 2. A stated value (`leak_candidates`) equivalent to the gold by math-verify (0.5 for \frac12): a box; "the
#    answer/remainder/probability is V", "<noun> equals / comes to / turns out to be / should be V"; the value a
#    relation (`=`, `\equiv`, `\approx`) ends in when its left side is pure arithmetic, a single unknown or
#    function value (`h(3) = 20`, `k = 5`), or an expression the problem asks about (`a+b+c` in "Find a+b+c").
#    A relation that chooses a value ("Set x = 1", "where x^2 = 4") or an equation in unknowns the problem does
#    not ask about ("2x + 3 = 7") states nothing; intermediate facts with other values ("a+b=7" for 12) are fine.

_MATH_DELIMITERS = re.compile(r"\$+|\\[()\[\]]")
_SPACING = re.compile(r"\\[,;:! ]|\\q?quad(?![A-Za-z])|\\displaystyle|\\left(?![A-Za-z])|\\right(?![A-Za-z])|~")
_VALUE = r"([^\n;]{1,80}?)(?=\s*(?:[.;!?](?:\s|$)|,\s|\n|$|=|\\equiv|\\approx))"
_MATHLIKE = r"(?=\s*[-+]?\s*[\d\\(\[{|.])"  # a stated value starts like math, not like "is to use symmetry"
_STATED = [
    re.compile(r"\banswers?\b[^.\n]{0,30}?\b(?:is|be|equals?|was)\b\s*:?\s*" + _VALUE, re.I),
    re.compile(r"\banswers?\s*(?::|=)\s*" + _VALUE, re.I),
    re.compile(r"\b(?:minimum|maximum|smallest|largest|least|greatest|minimal|maximal)\b[^.=\n]{0,50}?"
               r"\b(?:is|equals|be)\b\s*" + _VALUE, re.I),
    re.compile(r"\b(?:so|thus|therefore|hence|altogether|in\s+total)\b,?\s+(?:there\s+(?:are|is|were)|"
               r"we\s+(?:get|have|obtain|find)|the\s+(?:total|result|number)\s+is)\s+" + _VALUE, re.I),
    re.compile(r"\b(?:is(?:\s+equal\s+to)?|equals|comes\s+(?:out\s+)?to|turns\s+out\s+to\s+be|works\s+out\s+to|"
               r"should\s+be|must\s+be|would\s+be|will\s+be|becomes|totals|gives|yields|gets?|obtain|find)\s+"
               + _MATHLIKE + _VALUE, re.I),
    re.compile(r"\(\s*[A-Za-z](?:\s*,\s*[A-Za-z])+\s*\)\s*=\s*(\([^()]{1,80}\))"),
]
_RELATION = re.compile(r"(?<![<>!:=\\])=(?![=>])|\\equiv(?![A-Za-z])|\\approx(?![A-Za-z])")
# The math just before a relation: LaTeX commands, single letters, capitals naming points (AB), digits, operators.
_MATH_TAIL = re.compile(r"(?:\\[A-Za-z]+|\\[{}|]|(?<![A-Za-z])(?:[A-Za-z]|[A-Z]{2,3})(?![A-Za-z])"
                        r"|[\d\s+\-*/^_(){}\[\].,!|'])*$")
_FUNCTIONS = r"(?:\\(?:sin|cos|tan|log|ln|exp|gcd|lcm|max|min|det|angle)\s*)?"
_SYMBOL = re.compile(_FUNCTIONS + r"(?:\\?[A-Za-z]+|\|[^|]+\|)(?:_\{?[\w,+\-]+\}?|')*(?:\s*\([^()]*\))?")
# Words after which a relation states a result whatever its left side: "the sum comes to $-b/a = 7$".
_STATING = re.compile(r"\b(?:equals|comes\s+(?:out\s+)?to|turns\s+out\s+to\s+be|works\s+out\s+to|amounts\s+to|totals|"
                      r"gives|yields)\s*$", re.I)
_CHOICE = re.compile(r"\b(?:set|setting|let|letting|put|take|taking|try|trying|substitute|substituting|plug|plugging|"
                     r"assume|assuming|suppose|consider|if|when|whenever|where|with|for|choose|choosing|pick|"
                     r"testing)\b(?:\s+[A-Za-z]+){0,2}\s*$", re.I)
_OPERATOR = re.compile(r"[+\-*/^!]|\)\s*\(|\\(?:times|cdot|div|frac|dfrac|tfrac|sqrt|binom)")


def _squash(text: str) -> str:
    """Math with its delimiters and spacing gone: what the token tests compare."""
    return re.sub(r"\\[dt]frac", r"\\frac", _SPACING.sub(" ", _MATH_DELIMITERS.sub(" ", text)))


def _relation_values(text: str, problem: str) -> list[str]:
    """The values relations end in, where the left side is a result (see above), in `text` (delimiters gone)."""
    asked = re.sub(r"\s+", "", _squash(problem))
    found = []
    for match in _RELATION.finditer(text):
        clause = text[max(0, match.start() - 160): match.start()]
        # this clause (a factorial's "!" ends none), after any earlier relation
        clause = re.split(r"[.;:?]\s|(?<![\d)}])!\s|\n|=|\\equiv|\\approx", clause)[-1]
        math = _MATH_TAIL.search(clause).group(0)  # type: ignore[union-attr]
        tail, lead = math.strip().lstrip(",. ").strip(), clause[: len(clause) - len(math)]
        if _CHOICE.search(lead) or not tail and not re.search(r"[A-Za-z]{2,}\s*$", lead):
            continue  # "Set x = 1", "where x^2 = 4" choose a value; nothing before the relation states nothing
        arithmetic = not re.search(r"[A-Za-z]", re.sub(r"\\[A-Za-z]+", "", tail)) and re.search(r"\d", tail) \
            and _OPERATOR.search(tail)
        symbol = _SYMBOL.fullmatch(tail)
        squashed = re.sub(r"\s+", "", tail)
        asks = re.search(r"[A-Za-z]", squashed) and len(squashed) > 1 and squashed in asked
        if tail and not (arithmetic or symbol or asks or _STATING.search(lead)):
            continue  # an equation in unknowns the problem does not ask about: `2x + 3 = 7`
        value = re.match(_VALUE, text[match.end():].lstrip())
        if value:
            found.append(value.group(1))
    return found


def leak_candidates(intervention: str, problem: str = "") -> list[str]:
    """The values an intervention states (see above), each to compare with the gold answer by math equivalence.
    For each, its first piece is tried too ("42 ways" -> "42", "4 \\pmod{7}" -> "4")."""
    text = _squash(intervention)
    found = boxed_answers(intervention)
    for pattern in _STATED:
        found += [m.group(1) for m in pattern.finditer(text)]
    found += _relation_values(text, problem)
    candidates = []
    for value in found:
        value = value.strip().rstrip(".,;:")
        first = value.split()[0].rstrip(".,;:") if value else ""
        candidates += [value, first if re.search(r"\d|^\\|^\(", first) else ""]
    return list(dict.fromkeys(c for c in candidates if c))


def _gold_token(gold: str) -> str | None:
    """The gold answer as the token `states_gold` looks for, or None where that test does not apply."""
    token = re.sub(r"\s+", "", _squash(gold)).strip(".")
    if len(re.sub(r"\\[A-Za-z]+", "", token)) < 2 or re.fullmatch(r"[^\W\d_]+", token):
        return None
    return token


_OPERAND_AFTER = re.compile(r"\s*(?:[+\-*/_×·]|\^(?!\{?\\circ)|\\(?:times|cdot|div|pm|mp)(?![A-Za-z])"
                            r"|[A-Za-z](?![A-Za-z\s]))")
_OPERAND_BEFORE = re.compile(r"(?:[+*/^_×·]|\\(?:times|cdot|div|pm|mp)|[\^_]\{)\s*$")


def _standalone(text: str, start: int, end: int, token: str) -> bool:
    """Is text[start:end] (the token) a value in its own right, not part of a number, a power, an index, a
    fraction or a product?"""
    before, after = text[max(0, start - 40): start], text[end: end + 40]  # the neighbourhood decides
    p, n = before[-1:], after[:1]
    if token[0].isalnum() and p and (p.isalnum() or p in ".,/{\\-"):
        return False  # 17 for 7, 1.5, 3,000, 1/12, \frac{12}, -12, \alpha12
    if token[0] == "\\" and p.isalnum():
        return False  # 3\sqrt{2} is not \sqrt{2}
    if token[0] in "+-" and re.search(r"[\w)\]}|]\s*$", before) \
            and not re.search(r"(?<![\\A-Za-z])[A-Za-z]{2,}\s*$", before):
        return False  # x - 3 is a subtraction, not -3 ("is -3" is)
    if token[-1].isalnum() and n and (n.isalnum() or re.match(r"[.,]\d", after)):
        return False  # 12x, 12.5, 12,000
    if token[-1].isdigit() and re.match(r"\\(?!text|mbox|mathrm|circ|%|[,;:!])[A-Za-z]", after):
        return False  # 12\sqrt{3}, 2\pi
    return not (_OPERAND_BEFORE.search(before) or _OPERAND_AFTER.match(after) or re.search(r"-\s+$", before))


def states_gold(intervention: str, gold: str, problem: str = "") -> bool:
    """Does the gold answer stand in the intervention as a token of its own (test 1 above)?"""
    token = _gold_token(gold)
    if token is None:
        return False
    pattern = re.compile(r"\s*".join(map(re.escape, token)))

    def stands(text: str) -> bool:
        text = _squash(text)
        return any(_standalone(text, m.start(), m.end(), token) for m in pattern.finditer(text))

    return stands(intervention) and not stands(problem)


def written_intervention(row: dict[str, Any]) -> str | None:
    """The accepted intervention of a proposal row as it stands in the reply (`raw`), before unescaping."""
    for block in reversed(reply_blocks(row.get("raw"))):
        if _text(block.get("intervention")) == row["intervention"]:
            return block.get("written")
    return None


def check_leaks(rows: list[dict[str, Any]], problems: dict[str, dict[str, Any]]) -> Generator[Ask, Answer, None]:
    """Accept each parsed proposal unless its intervention — as stored, and as written in the reply, where a
    decoder may have eaten a `\\boxed` — states the gold answer (see above)."""
    items, owners, leaks = [], [], set()
    for n, row in enumerate(rows):
        problem = problems[row["problem_id"]]
        gold, statement = str(problem["answer"]), problem.get("problem") or ""
        texts = list(dict.fromkeys(t for t in (row["intervention"], written_intervention(row)) if t))
        if any(states_gold(text, gold, statement) for text in texts):
            leaks.add(n)
            continue
        for candidate in dict.fromkeys(c for text in texts for c in leak_candidates(text, statement)):
            items.append((gold, candidate, BARE))
            owners.append(n)
    verdicts = (yield Grading(items)) if items else []
    leaks |= {owners[k] for k, verdict in enumerate(verdicts) if verdict.correct is True}
    undecided = {owners[k]: provisional(v) for k, v in enumerate(verdicts) if provisional(v)}
    for n, row in enumerate(rows):
        if n in leaks:
            row |= {"reject_reason": LEAKS_ANSWER, "intervened_text": None}
        elif n in undecided:  # the leak test timed out: not accepted now, tried again on the next run
            row |= {"reject_reason": LEAK_TEST_FAILED, "intervened_text": None, "error": undecided[n]}
        else:
            row["accepted"] = True


# --- the stage ----------------------------------------------------------------------------------

PROPOSAL_SCHEMA = {
    "problem_id": pl.String, "attempt_id": pl.String, "proposal_id": pl.String, "proposal_index": pl.Int32,
    "num_steps": pl.Int32, "step_ends": pl.List(pl.Int64), "error_step": pl.Int32, "intervention": pl.String,
    "verification": pl.String, "intervened_text": pl.String, "accepted": pl.Boolean, "reject_reason": pl.String,
    "raw": pl.String, "finish_reason": pl.String, "error": pl.String, "prompt_tokens": pl.Int64,
    "completion_tokens": pl.Int64,
}


@dataclass(frozen=True)
class ProposeSettings:
    proposals: int
    sampling: Sampling
    critique_prompt: Prompt  # turn 2 of the two-turn prompt, or the whole single-turn prompt
    reference_prompt: Prompt | None = None  # turn 1 (solve guided by the reference); None: single-turn
    structured: bool = True  # constrain the reply by a JSON schema where the backend can
    propose_for: str = ProposeFor.not_correct.value
    allow_no_reference: bool = False  # propose without a reference solution (the prompt says only the answer is known)

    def __post_init__(self) -> None:
        ProposeFor(self.propose_for)  # one of them, or a ValueError naming the value

    @property
    def style(self) -> str:
        return "two-turn" if self.reference_prompt is not None else "single-turn"

    def prompts(self) -> list[Prompt]:
        return [p for p in (self.reference_prompt, self.critique_prompt) if p is not None]


def fingerprint(s: ProposeSettings) -> dict[str, Any]:
    return {
        "proposals": s.proposals, "sampling": s.sampling.to_dict(), "style": s.style, "structured": s.structured,
        "propose_for": s.propose_for, "allow_no_reference": s.allow_no_reference,
        "prompts_sha256": [p.sha256 for p in s.prompts()], "steps": STEPS_VERSION,
    }


def wants_proposals(attempt: dict[str, Any], propose_for: str) -> bool:
    """`incorrect`: graded wrong. `not-correct`: not graded correct — wrong, truncated, unboxed, ungradable —
    except where there is no text to critique (a failed call, a prompt too long for the context)."""
    if attempt["correct"] is True:
        return False
    if propose_for == ProposeFor.incorrect:
        return attempt["correct"] is False
    return attempt.get("text") is not None and attempt.get("error") is None \
        and attempt.get("grade_reason") not in (grade.SAMPLE_ERROR, grade.PROMPT_TOO_LONG)


def failed_attempts(part: Part, propose_for: str) -> list[dict[str, Any]]:
    """The attempts to propose for, of the selected problems (see `wants_proposals`)."""
    selected = {row["problem_id"] for row in part.tables["pass_rates"] if row["selected"]}
    return [a for a in part.tables["graded"] if a["problem_id"] in selected and wants_proposals(a, propose_for)]


def reference_text(problem: dict[str, Any], allow_no_reference: bool) -> str | None:
    """The reference solution the proposer reads; None when there is none and none may be done without."""
    if problem.get("solution") and problem["solution"].strip():
        return problem["solution"]
    return NO_REFERENCE_TEXT.format(answer=problem["answer"]) if allow_no_reference else None


def proposal_row(attempt: dict[str, Any], steps: list[str], index: int) -> dict[str, Any]:
    """A proposal row before its reply is read: not accepted, no reason yet. `step_ends` records where
    each numbered step ends in the attempt, so later stages use exactly these steps."""
    return {"problem_id": attempt["problem_id"], "attempt_id": attempt["attempt_id"],
            "proposal_id": proposal_id(attempt["attempt_id"], index), "proposal_index": index,
            "num_steps": len(steps), "step_ends": step_ends(steps), "error_step": None, "intervention": None,
            "verification": None, "intervened_text": None, "accepted": False, "reject_reason": None, "raw": None,
            "finish_reason": None, "error": None, "prompt_tokens": 0, "completion_tokens": 0}


def failed_call_reason(error: str | None) -> str:
    """A prompt the engine's context cannot hold is a property of the data, not a failure to retry."""
    text = (error or "").lower()
    return PROMPT_TOO_LONG if "context" in text or "too long" in text else CALL_FAILED


def read_reply(row: dict[str, Any], out: Completion, steps: list[str], instructions: str = "") -> dict[str, Any]:
    """The row once the proposer's reply `out` is parsed (accepted so far; the leak test comes after).
    A reply cut at the token limit is `truncated`, whatever it holds: never a parse failure."""
    row = row | {"raw": out.text, "finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens,
                 "completion_tokens": out.completion_tokens}
    if out.finish_reason == ERROR:
        reason = failed_call_reason(out.error)
        return row | {"reject_reason": reason, "error": out.error if reason == CALL_FAILED else None}
    parsed = parse_proposal(out.text, len(steps), steps, instructions)
    row |= {"error_step": parsed.error_step, "intervention": parsed.intervention,
            "verification": parsed.verification, "reject_reason": parsed.reject_reason}
    if out.finish_reason == LENGTH:
        row["reject_reason"] = TRUNCATED
    elif parsed.reject_reason is None:
        row["intervened_text"] = intervened_text(steps, parsed.error_step, parsed.intervention)
    return row


def critique_request(steps: list[str], problem: dict[str, Any], turn1: Any, s: ProposeSettings) -> Request:
    history = (turn1[0], turn1[1].text) if turn1 is not None else None
    messages = critique_messages(problem["problem"], reference_text(problem, True) or "", steps,
                                 s.critique_prompt.text, history, answer=problem["answer"])
    schema = proposal_schema(len(steps)) if s.structured else None
    return make_request(messages, s.sampling, n=s.proposals, json_schema=schema)


def unproposable(steps: list[str], problem: dict[str, Any], turn1: Any, s: ProposeSettings) -> dict[str, Any] | None:
    """Why an attempt gets no proposer call (as row fields), or None when it does."""
    if reference_text(problem, s.allow_no_reference) is None:
        return {"reject_reason": NO_REFERENCE}
    if not steps:
        return {"reject_reason": NO_STEPS}
    if turn1 is not None and turn1[1].error is not None:  # the first turn failed: retried on the next run
        return {"reject_reason": CALL_FAILED, "error": turn1[1].error}
    return None


def instructions(s: ProposeSettings) -> str:
    """The proposer's own wording (its prompt files and the schema's field descriptions): an intervention made of
    it is an echo."""
    fields = proposal_schema(1)["properties"].values()
    return "\n".join([p.text for p in s.prompts()] + [f["description"] for f in fields])


def compute(part: Part, s: ProposeSettings) -> Compute:
    """One critique call per failed attempt (P proposals each). With the two-turn prompt, each problem's first turn
    (reading the reference) goes first, and its attempts' critiques go out as soon as it is answered."""
    problems = part.problems()
    failed = failed_attempts(part, s.propose_for)
    steps_of = {a["attempt_id"]: split_steps(a["text"]) for a in failed}
    turn1: dict[str, tuple[list[dict[str, str]], Completion]] = {}
    critiques: dict[str, list[Completion]] = {}

    def asked_for(attempts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The attempts that get a critique call, given the first turns known."""
        return [a for a in attempts if unproposable(steps_of[a["attempt_id"]], problems[a["problem_id"]],
                                                    turn1.get(a["problem_id"]), s) is None]

    def critique(attempt: dict[str, Any], first: tuple[list[dict[str, str]], Completion] | None) -> Request:
        return critique_request(steps_of[attempt["attempt_id"]], problems[attempt["problem_id"]], first, s)

    if s.reference_prompt is None:
        todo = asked_for(failed)
        outs = (yield ModelCalls([critique(a, None) for a in todo])) if todo else []
        critiques = {a["attempt_id"]: out for a, out in zip(todo, outs)}
    else:
        ids = sorted({a["problem_id"] for a in failed
                      if reference_text(problems[a["problem_id"]], s.allow_no_reference)})
        firsts = [reference_messages(problems[i]["problem"], reference_text(problems[i], True) or "",
                                     s.reference_prompt.text) for i in ids]
        attempts_of = {i: [a for a in failed if a["problem_id"] == i] for i in ids}

        def then(k: int, outs: list[Completion]) -> list[Request]:  # pure: the same first turn, the same asks
            first = (firsts[k], outs[0])
            return [critique(a, first) for a in attempts_of[ids[k]]
                    if unproposable(steps_of[a["attempt_id"]], problems[ids[k]], first, s) is None]

        answers = (yield Chained([make_request(m, s.sampling) for m in firsts], then)) if ids else []
        for k, (outs, seconds) in enumerate(answers):
            turn1[ids[k]] = (firsts[k], outs[0])
            critiques |= {a["attempt_id"]: out for a, out in zip(asked_for(attempts_of[ids[k]]), seconds)}
    rows: list[dict[str, Any]] = []
    told = instructions(s)
    for attempt in failed:
        steps, problem = steps_of[attempt["attempt_id"]], problems[attempt["problem_id"]]
        blank = [proposal_row(attempt, steps, j) for j in range(s.proposals)]
        why_not = unproposable(steps, problem, turn1.get(attempt["problem_id"]), s)
        if why_not is not None:
            rows += [row | why_not for row in blank]
            continue
        rows += [read_reply(row, out, steps, told) for row, out in zip(blank, critiques[attempt["attempt_id"]])]
    parsed = [row for row in rows if row["reject_reason"] is None]
    yield from check_leaks(parsed, problems)
    return {"proposals": rows}


def summarize(tables: dict[str, pl.LazyFrame], s: ProposeSettings) -> dict[str, Any]:
    table = tables["proposals"]
    rejected = table.filter(~pl.col("accepted")).group_by("reject_reason").len().collect()
    no_reference = tables["problems"].filter(
        pl.col("solution").is_null() | (pl.col("solution").str.strip_chars() == "")
    ).select(pl.len()).collect().item()
    return {
        "attempts": table.select(pl.col("attempt_id").n_unique()).collect().item(),
        "accepted": table.select(pl.col("accepted").sum()).collect().item(),
        "rejected_by_reason": dict(zip(rejected["reject_reason"].to_list(), rejected["len"].to_list())),
        "problems_without_reference": no_reference,
        "prompt_files": [p.name for p in s.prompts()],
    }


def work(part: Part, s: ProposeSettings) -> int:
    """Samples asked for: P per failed attempt, and one first turn per problem (two-turn)."""
    problems = part.problems()
    failed = [a for a in failed_attempts(part, s.propose_for)
              if reference_text(problems[a["problem_id"]], s.allow_no_reference) is not None]
    first_turns = len({a["problem_id"] for a in failed}) if s.reference_prompt is not None else 0
    return len(failed) * s.proposals + first_turns


STAGE = Stage(
    name="propose", reads=("graded", "problems", "pass_rates"), writes={"proposals": PROPOSAL_SCHEMA},
    fingerprint=fingerprint, compute=compute, summarize=summarize, work=work, sends=("schema",),
)
