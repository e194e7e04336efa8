"""Answer extraction and grading: is a model's final answer equivalent to the gold answer?

Public API (pure functions, safe with any text):

- `extract_answer(response)`: the content of the last complete `\\boxed{...}` / `\\fbox{...}`.
- `is_equivalent(gold, answer)`: two bare answers; True / False, or None when it cannot be decided.
- `grade(gold, response)`: a `Verdict` for one response, with a hard time limit.
- `grade_many(golds, responses, workers=, timeout=)`: the same for many, in worker processes.

Equivalence is math-verify's (sympy-based, via latex2sympy's ANTLR parser). Model text is never
handed to `eval`, `sympify` or a shell: math-verify's only `parse_expr` call sees text that its own
regex restricts to digits and arithmetic operators. Answers made of words ("odd $n$", "All powers
of 2"), which math-verify would read as products of one-letter symbols, are compared as normalised
text instead.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from intgen.workers import TIMEOUT, WORKER_DIED, Failure, shared_pool

DEFAULT_TIMEOUT_S = 5.0
# Longer "answers" are not answers (real ones are a few hundred characters; whole solutions a few
# thousand) and would only feed the parser a denial of service.
MAX_ANSWER_CHARS = 16_384

# Reasons a verdict carries. Graded: the method that decided. Ungradable: why not.
DECIDED_BY_MATH = "math"
DECIDED_BY_TEXT = "text"
NO_ANSWER = "no_answer"
EMPTY_GOLD = "no_gold"
PARSE_ERROR = "parse_error"
TOO_LONG = "too_long"


def grader_version() -> str:
    """What decides equivalence, for manifests and dataset cards."""
    from importlib.metadata import version

    from intgen import __version__

    return f"intgen {__version__} / math-verify {version('math-verify')}"


@dataclass(frozen=True)
class Verdict:
    """`correct` is None when the response could not be graded; `reason` says why (or how it was decided)."""

    correct: bool | None
    predicted: str | None
    reason: str


# --- extraction -------------------------------------------------------------------------------

# One pass over the text: double backslashes and escaped braces are skipped, `\boxed{` / `\fbox{`
# open a box, other braces only nest. `\boxed 5` (no braces) is a box too.
_BOX_TOKENS = re.compile(
    r"\\\\|\\[{}]|\\(?:boxed|fbox)\s*(?:(\{)|\s([^\s{}$\\][^\s{}$]*))|[{}]"
)


def boxed_answers(response: str | None) -> list[str]:
    """The contents of every complete outermost `\\boxed{...}` / `\\fbox{...}`, in order.

    Brace-matched in one pass, linear in the length of the text; a box that holds exactly one box
    is unwrapped; an unclosed box (a truncated response) does not count.
    """
    if not response:
        return []
    stack: list[tuple[int, int] | None] = []  # (token start, content start) of an open box, None for a brace
    closed: dict[int, tuple[int, int]] = {}  # token start -> content span, for every box closed so far
    open_boxes = 0
    outermost: list[tuple[int, int]] = []
    for match in _BOX_TOKENS.finditer(response):
        token = match.group(0)
        if match.group(1):  # `\boxed{`
            stack.append((match.start(), match.end()))
            open_boxes += 1
        elif match.group(2) is not None:  # `\boxed 5`
            if not open_boxes:
                outermost.append(match.span(2))
        elif token == "{":
            stack.append(None)
        elif token == "}" and stack:
            box = stack.pop()
            if box is not None:
                open_boxes -= 1
                closed[box[0]] = (box[1], match.start())
                if not open_boxes:
                    outermost.append((box[1], match.start()))
    return [_unwrap(response, start, end, closed) for start, end in outermost]


def _unwrap(text: str, start: int, end: int, closed: dict[int, tuple[int, int]]) -> str:
    while True:  # `\boxed{\boxed{5}}`: unwrap a box that holds exactly one box
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        inner = closed.get(start)
        if inner is None or inner[1] != end - 1:
            return text[start:end]
        start, end = inner


def extract_answer(response: str | None) -> str | None:
    """The content of the last complete `\\boxed{...}` or `\\fbox{...}` (see `boxed_answers`); None if none.

    "Last" is the box that closes last, so in `\\boxed{\\boxed{5}}` the outer one wins.
    """
    boxes = boxed_answers(response)
    return boxes[-1] if boxes else None


# --- normalised text --------------------------------------------------------------------------

_TEXT_COMMANDS = re.compile(
    r"\\(?:text|textbf|textit|textrm|textsf|texttt|mathrm|mathbf|mathit|mathsf|mbox|operatorname)\s*\{([^{}]*)\}"
)
_SPACING = re.compile(r"\\[,;:! ]|\\q?quad|~|\\displaystyle|\\left|\\right")
_MATH_DELIMITERS = re.compile(r"\\[()\[\]]|(?<!\\)\$")
# Words that may appear in a pure math answer; anything else of three letters or more is prose.
_MATH_WORDS = frozenset(
    "sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh log ln lg exp max min gcd lcm mod"
    " deg det lim sup inf sqrt frac dfrac tfrac cdot times div pmod pi infty infinity le ge leq geq neq"
    " cup cap emptyset varnothing mathbb binom choose text begin end pmatrix bmatrix matrix cases dots"
    " ldots cdots circ angle triangle sim approx over floor ceil lfloor rfloor lceil rceil vert mid"
    " and".split()
)


def _strip_text_commands(text: str) -> str:
    previous = None
    while previous != text:
        previous, text = text, _TEXT_COMMANDS.sub(r"\1", text)
    return text


def normalize_text(answer: str) -> str:
    """A canonical form for comparing answers as text: no markup, spacing, case or final full stop."""
    text = unicodedata.normalize("NFKC", answer)
    text = _strip_text_commands(text)
    text = _SPACING.sub(" ", text)
    text = _MATH_DELIMITERS.sub(" ", text)
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    text = re.sub(r"\s+", "", text).casefold()
    return text.rstrip(".\\")


def is_prose(answer: str) -> bool:
    """True when the answer has words outside `\\text{...}` that are not math vocabulary."""
    bare = re.sub(r"\\[A-Za-z]+", " ", _TEXT_COMMANDS.sub(" ", answer))
    return any(w.casefold() not in _MATH_WORDS for w in re.findall(r"[A-Za-z]{3,}", bare))


# --- math-verify ------------------------------------------------------------------------------

# math-verify logs every parse failure and a warning when its (SIGALRM) timeouts are off; we time
# out ourselves, by process, so both are noise.
logging.getLogger("math_verify").setLevel(logging.CRITICAL)


_MARKED_MATH = re.compile(r"(?<!\\)\$|\\[(\[]|\\boxed|\\fbox")


# Digits, one comma, digits other than a group of three: either reading may be meant.
_DECIMAL_COMMA = re.compile(r"^-?\d+,(?!\d{3}$)\d+$")


def _parse_bare(answer: str) -> list:
    """math-verify's parse of an answer."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    # Text that marks its own math (`$..$`, `\\(..\\)`, a box) is left to math-verify's extraction;
    # plain text is boxed so that the whole string is the target.
    target = answer if _MARKED_MATH.search(answer) else "\\boxed{" + answer + "}"
    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    parsed = parse(target, extraction_config=config, parsing_timeout=None)  # type: ignore[arg-type]
    if _DECIMAL_COMMA.match(answer):  # "1,22": a pair, or 1.22 written the European way
        parsed = parsed + parse(answer, extraction_config=[ExprExtractionConfig()], parsing_timeout=None)  # type: ignore[arg-type]
    return parsed


def compare(gold: object, answer: object) -> tuple[bool | None, str]:
    """Compare two bare answers in this process (no time limit): (equivalent or None, reason)."""
    if gold is None or not str(gold).strip():
        return None, EMPTY_GOLD
    if answer is None or not str(answer).strip():
        return None, NO_ANSWER
    gold, answer = str(gold).strip(), str(answer).strip()
    if len(answer) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return None, TOO_LONG
    if normalize_text(gold) == normalize_text(answer):
        return True, DECIDED_BY_TEXT
    # Words read by math-verify become products of one-letter symbols ("no solutions" equals
    # "solutions no"), so a gold answer in plain words is decided as text.
    if is_prose(gold) and not _MARKED_MATH.search(gold):
        return False, DECIDED_BY_TEXT
    from math_verify import verify

    parsed_gold, parsed_answer = _parse_bare(gold), _parse_bare(answer)
    if not parsed_gold or not parsed_answer:
        return None, PARSE_ERROR
    return bool(verify(parsed_gold, parsed_answer, timeout_seconds=None)), DECIDED_BY_MATH  # type: ignore[arg-type]


BARE, BOXED, LENIENT = "bare", "boxed", "lenient"


def find_answer(text: str | None, mode: str) -> str | None:
    """The answer a text gives: itself (`bare`), its last box (`boxed`), or — `lenient`, for models
    that do not box — its last box, else the answer math-verify finds stated in the text."""
    if mode == BARE or text is None:
        return text
    boxed = extract_answer(text)
    if boxed is not None or mode == BOXED or len(text) > 4 * MAX_ANSWER_CHARS:
        return boxed
    from math_verify import parse

    found = parse(text, parsing_timeout=None)  # type: ignore[arg-type]  # the pool enforces time limits
    return found[-1] if len(found) == 2 and isinstance(found[-1], str) else None


def _grade_now(item: tuple[object, str | None, str]) -> Verdict:
    """Worker body. `item` is (gold, text, how to find the answer in the text)."""
    gold, text, mode = item
    predicted = find_answer(text, mode)
    if predicted is None:
        return Verdict(None, None, NO_ANSWER)
    try:
        correct, reason = compare(gold, predicted)
    except Exception:  # a parser bug on odd input (deep recursion, ANTLR errors) is not our crash
        correct, reason = None, PARSE_ERROR
    return Verdict(correct, predicted, reason)


def _grade_json(item: list) -> list:
    """The worker's entry point: JSON in, JSON out."""
    verdict = _grade_now((item[0], item[1], item[2]))

    return [verdict.correct, verdict.predicted, verdict.reason]


def warm_up() -> None:
    """Run by each grading worker before it takes items: the imports and parser start-up (about a second,
    more on a busy machine) must not count against the first item's time limit."""
    _grade_now(("x+1", "so it is \\boxed{1+x}", BOXED))
    _grade_now(("\\frac{1}{2}", "0.5", BARE))


def provisional(verdict: Verdict) -> str | None:
    """An error text for a verdict that must not be final (the grader timed out or its worker died), else None."""
    if verdict.reason in (TIMEOUT, WORKER_DIED):
        return f"grade_{verdict.reason}: no verdict within the grading time limit; it is tried again on the next run"
    return None


# A timed-out item is tried once more, in the same call, with this many times the limit; if it times out
# again its verdict says `timeout` — provisional: the stages record it as a failure to retry on the next run.
RETRY_FACTOR = 3


def _grade_in_workers(
    items: list[tuple[object, str | None, str]], workers: int | None, timeout: float
) -> list[Verdict]:
    pool = shared_pool("intgen.grading:_grade_json", workers)
    results = pool.map(items, timeout)
    again = [i for i, r in enumerate(results) if isinstance(r, Failure) and r.reason == TIMEOUT]
    if again:
        for i, result in zip(again, pool.map([items[i] for i in again], timeout * RETRY_FACTOR)):
            results[i] = result
    verdicts = []
    for (_, text, mode), result in zip(items, results):
        if isinstance(result, Failure):
            reason = result.reason if result.reason in (TIMEOUT, WORKER_DIED) else PARSE_ERROR
            verdicts.append(Verdict(None, text if mode == BARE else extract_answer(text), reason))
        else:
            verdicts.append(Verdict(*result))
    return verdicts


# --- the public, time-limited API ---------------------------------------------------------------


def grade_items(
    items: Sequence[tuple[object, str | None, str]], workers: int | None = None, timeout: float = DEFAULT_TIMEOUT_S
) -> list[Verdict]:
    """Grade (gold, text, mode) items in worker processes; mode is `BARE` (the text is the answer),
    `BOXED` (its last box) or `LENIENT` (its last box, else the answer it states)."""
    unknown = {mode for _, _, mode in items} - {BARE, BOXED, LENIENT}
    if unknown:
        raise ValueError(f"unknown grading mode(s): {', '.join(sorted(unknown))}")
    return _grade_in_workers([(g, t, m) for g, t, m in items], workers, timeout) if items else []


def grade_many(
    golds: Sequence[object],
    responses: Sequence[str | None],
    workers: int | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    lenient: bool = False,
) -> list[Verdict]:
    """Grade each response against its gold answer in worker processes, `timeout` seconds per item at most.

    The answer is the last `\\boxed{}`; with `lenient`, a response without one is read for a stated
    answer instead (for small models that do not box). Results are in input order. A stuck item is
    killed with its worker and comes back with reason `timeout`; nothing the text does can hang,
    crash or outlive the call.
    """
    if len(golds) != len(responses):
        raise ValueError(f"{len(golds)} gold answers but {len(responses)} responses")
    mode = LENIENT if lenient else BOXED
    return _grade_in_workers([(g, r, mode) for g, r in zip(golds, responses)], workers, timeout)


def grade(gold: object, response: str | None, timeout: float = DEFAULT_TIMEOUT_S, lenient: bool = False) -> Verdict:
    """Grade one response against the gold answer (in a worker process, with a hard time limit)."""
    return _grade_in_workers([(gold, response, LENIENT if lenient else BOXED)], 1, timeout)[0]


def are_equivalent(
    pairs: Sequence[tuple[object, object]], workers: int | None = None, timeout: float = DEFAULT_TIMEOUT_S
) -> list[bool | None]:
    """`is_equivalent` for many (gold, answer) pairs, in worker processes."""
    items = [(gold, None if answer is None else str(answer), BARE) for gold, answer in pairs]
    return [v.correct for v in _grade_in_workers(items, workers, timeout)]


def is_equivalent(gold: object, answer: object, timeout: float = DEFAULT_TIMEOUT_S) -> bool | None:
    """Are two bare answers equivalent? None when either cannot be parsed or the check timed out."""
    text = None if answer is None else str(answer)
    return _grade_in_workers([(gold, text, BARE)], 1, timeout)[0].correct
