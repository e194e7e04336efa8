"""propose: for each failed attempt, find the first critical error and write one intervention.

Building the prompt and parsing the reply are separate pure functions. The reply is read as JSON
(what a schema-constrained engine returns) or as free text ending in `<error_step>` / `<intervention>`
tags; where a model writes several blocks, the last well-formed one wins. Every rejection has a reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import polars as pl

from intgen.backends.base import ERROR, LENGTH, Completion, Request, Sampling, make_request
from intgen.grading import BARE, boxed_answers, provisional
from intgen.resources import Prompt, fill
from intgen.stages import Answer, Ask, Compute, Grading, ModelCalls, Part, Stage
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
NO_REFERENCE = "no_reference"  # the problem has no reference solution (see --allow-no-reference)
LEAK_TEST_FAILED = "leak_test_failed"  # the leak test could not decide in time (retried on the next run)

# Small models echo the format's placeholder instead of writing an intervention.
PLACEHOLDERS = {"the replacement step", "replacement step", "..."}
KEY_NAMES = {"verification", "intervention", "error_step", "error step", "content", "location", "self_check"}


def proposal_id(attempt_id: str, index: int) -> str:
    return f"{attempt_id}/p{index}"


def proposal_schema(num_steps: int) -> dict[str, Any]:
    """The JSON a constrained engine must return: a verification log first (room to think, and the
    self-check), then the error step as an integer within this attempt's own steps — or 0 when there
    is no critical error (the paper's "empty" outcome, e.g. a misgraded attempt) — then the
    intervention (empty with 0). Key order matters: engines generate in it. No maxLength: llama.cpp's
    converter unrolls it into a grammar too large to load; max_tokens bounds the reply instead."""
    return {
        "type": "object",
        "properties": {
            "verification": {"type": "string", "description": "the step-by-step verification and the self-check"},
            # an enum as well as the bounds: llama.cpp's grammars ignore integer minimum/maximum
            "error_step": {"type": "integer", "minimum": 0, "maximum": num_steps, "enum": list(range(num_steps + 1)),
                           "description": "the substep with the first critical error; 0 if there is none"},
            "intervention": {"type": "string", "description": "the replacement step; empty if error_step is 0"},
        },
        "required": ["verification", "error_step", "intervention"],
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
    verification: str | None
    reject_reason: str | None  # None: accepted (so far; the leak test comes after)


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
    r"\W*(?:none\b|no\b(?!\.\s*\d)|n/?a\b|null\b|nothing\b|there\s+is\s+no\b|all\s+(?:the\s+)?(?:sub)?steps\s+are\s+correct)",
    re.I,
)


def normalize_step(raw: Any) -> int | str | None:
    """An error location as an int; "none" where the model says there is no error; None if unreadable.
    Accepts 5, "5", "Substep 5", "Step #5", "**5**", "5th", "five", "the fifth substep"; a reply that starts
    by saying there is no error ("None", "No error; step 3 is fine") is "none"."""
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
        re.search(r"(?:sub)?step\s*#?\s*(-?\d+)", text, re.I)
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


def _json_blocks(text: str) -> list[tuple[int, dict[str, Any]]]:
    """(end position, object) for each JSON object in the text that has one of our keys."""
    decoder = json.JSONDecoder(strict=False)  # a raw newline inside a string is still the model's text
    found = []
    for match in re.finditer(r"\{\s*\"", text):
        try:
            obj, end = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and ({"error_step", "intervention"} & set(obj)):
            found.append((end, obj))
    return found


_TAG = {name: re.compile(rf"<{name}>(.*?)</{name}>", re.S | re.I) for name in ("error_step", "intervention", "verification")}


def _tag_blocks(text: str) -> list[tuple[int, dict[str, Any]]]:
    steps = [(m.start(), m.group(1)) for m in _TAG["error_step"].finditer(text)]
    blocks = []
    for m in _TAG["intervention"].finditer(text):
        before = [value for start, value in steps if start < m.start()]
        after = [value for start, value in steps if start > m.end()]
        step = before[-1] if before else (after[0] if after else None)
        blocks.append((m.end(), {"error_step": step, "intervention": m.group(1)}))
    if not blocks and steps:
        blocks.append((len(text), {"error_step": steps[-1][1], "intervention": None}))
    return blocks


def _plain(text: str) -> str:
    """Text compared for echoes: lower case, markup and punctuation at the ends gone, spaces folded."""
    return re.sub(r"\s+", " ", text).strip(" \t\n*_`'\".:;<>[]{}").lower()


def is_echo(intervention: str, verification: str | None, steps: list[str]) -> bool:
    """Does the intervention only repeat a key name, the verification text or one of the attempt's steps?"""
    plain = _plain(intervention)
    return plain in KEY_NAMES or (bool(verification) and plain == _plain(verification or "")) or any(
        plain == _plain(step) for step in steps
    )


def _judge(block: dict[str, Any], num_steps: int, steps: list[str]) -> Parsed:
    step = normalize_step(block.get("error_step"))
    raw = block.get("intervention")
    intervention = raw.strip() if isinstance(raw, str) else None
    verification = block.get("verification") if isinstance(block.get("verification"), str) else None
    if step == "none":
        return Parsed(None, intervention, verification, NO_ERROR_FOUND)
    if not isinstance(step, int) or not 1 <= step <= num_steps:
        return Parsed(None, intervention, verification, BAD_LOCATION)
    if not intervention or not re.search(r"\w", intervention) or intervention.strip(" .<>[]").lower() in PLACEHOLDERS:
        return Parsed(step, intervention, verification, EMPTY)
    if is_echo(intervention, verification, steps):
        return Parsed(step, intervention, verification, ECHO)
    return Parsed(step, intervention, verification, None)


def parse_proposal(text: str | None, num_steps: int, steps: list[str] | None = None) -> Parsed:
    """Read the proposer's reply; the last well-formed block wins, else the last block's reason.
    With the attempt's `steps`, an intervention that only repeats one of them is rejected as an echo."""
    if not text:
        return Parsed(None, None, None, NO_BLOCK)
    blocks = sorted(_json_blocks(text) + _tag_blocks(text), key=lambda b: b[0])
    if not blocks:
        return Parsed(None, None, None, NO_BLOCK)
    judged = [_judge(block, num_steps, steps or []) for _, block in blocks]
    accepted = [p for p in judged if p.reject_reason is None]
    return accepted[-1] if accepted else judged[-1]


# --- the answer-leak test -----------------------------------------------------------------------
#
# An intervention must not state the final answer. What counts is a *stated answer*, not a number that
# happens to appear: a box; "the answer is/should be X"; "the minimum value is X"; a conclusion ("so there
# are X ways", "thus we get X", "so x = X"); the result of pure arithmetic ("25 \\times 40 = 1,000"); values
# given to a tuple of unknowns ("(a,b) = (1, 2)"). An intermediate relation ("Set x = 1", "f(1) = 0",
# "a+b=7") is not. Each candidate is compared with the gold answer by math equivalence, never by substring.

_MATH_DELIMITERS = re.compile(r"\$+|\\[()\[\]]")
_VALUE = r"([^\n;]{1,80}?)(?=\s*(?:[.;!?](?:\s|$)|,\s|\n|$|=))"
_STATED = [
    re.compile(r"\banswers?\b[^.\n]{0,30}?\b(?:is|be|equals?|was)\b\s*:?\s*" + _VALUE, re.I),
    re.compile(r"\banswers?\s*(?::|=)\s*" + _VALUE, re.I),
    re.compile(r"\b(?:minimum|maximum|smallest|largest|least|greatest|minimal|maximal)\b[^.=\n]{0,50}?"
               r"\b(?:is|equals|be)\b\s*" + _VALUE, re.I),
    re.compile(r"\b(?:so|thus|therefore|hence|altogether|in\s+total)\b,?\s+(?:there\s+(?:are|is|were)|"
               r"we\s+(?:get|have|obtain|find)|the\s+(?:total|result|number)\s+is)\s+" + _VALUE, re.I),
    re.compile(r"\b(?:so|thus|therefore|hence|giving|gives|we\s+get|we\s+find|we\s+obtain|which\s+means)\b,?\s+"
               r"(?:that\s+)?[A-Za-z](?:_\{?\w+\}?)?\s*=\s*" + _VALUE, re.I),
    re.compile(r"\(\s*[A-Za-z](?:\s*,\s*[A-Za-z])+\s*\)\s*=\s*(\([^()]{1,80}\))"),
]
# The trailing run of an equation's left side made of numbers, operators and LaTeX commands only.
_ARITHMETIC_TAIL = re.compile(r"(?:\\[A-Za-z]+|[\d\s+\-*/^(){}\[\].,!]|\\[{}])*$")
_OPERATOR = re.compile(r"[+\-*/^]|\)\s*\(|\\(?:times|cdot|div|frac|dfrac|tfrac|sqrt|binom)")


def _arithmetic_results(text: str) -> list[str]:
    """The right-hand sides of equations whose left side is pure arithmetic: `3 + 4 = 7`, not `x + 4 = 7`."""
    found = []
    for match in re.finditer(r"=", text):
        left = text[: match.start()]
        left = left[max(left.rfind(c) for c in ".;:!?\n=") + 1:]  # this clause, after any earlier `=`
        tail = _ARITHMETIC_TAIL.search(left).group(0).lstrip()  # type: ignore[union-attr]
        before = left[: len(left) - len(tail)]
        if not re.match(r"[\d(\\-]", tail) or (before and not before[-1].isspace()):
            continue  # a variable or a function is part of it: `f(1) = 0`, `2x + 3 = 7`
        if re.search(r"\d", tail) and _OPERATOR.search(tail):
            value = re.match(_VALUE, text[match.end():].lstrip())
            if value:
                found.append(value.group(1))
    return found


def leak_candidates(intervention: str) -> list[str]:
    """The answers an intervention states (see above). For each stated value, its first word is tried too
    ("42 ways" -> "42"), so that a unit or noun after the number does not hide it."""
    text = _MATH_DELIMITERS.sub(" ", intervention)
    found = boxed_answers(intervention)
    for pattern in _STATED:
        found += [m.group(1) for m in pattern.finditer(text)]
    found += _arithmetic_results(text)
    candidates = []
    for value in found:
        value = value.strip()
        first = value.split()[0].rstrip(".,;:") if value else ""
        candidates += [value, first if re.fullmatch(r"[-+]?\d[\d,]*(?:\.\d+)?", first) else ""]
    return list(dict.fromkeys(c for c in candidates if c))


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
    include_truncated: bool = False
    allow_no_reference: bool = False  # propose without a reference solution (the prompt says only the answer is known)

    @property
    def style(self) -> str:
        return "two-turn" if self.reference_prompt is not None else "single-turn"

    def prompts(self) -> list[Prompt]:
        return [p for p in (self.reference_prompt, self.critique_prompt) if p is not None]


def fingerprint(s: ProposeSettings) -> dict[str, Any]:
    return {
        "proposals": s.proposals, "sampling": s.sampling.to_dict(), "style": s.style, "structured": s.structured,
        "include_truncated": s.include_truncated, "allow_no_reference": s.allow_no_reference,
        "prompts_sha256": [p.sha256 for p in s.prompts()], "steps": STEPS_VERSION,
    }


def failed_attempts(part: Part, include_truncated: bool) -> list[dict[str, Any]]:
    """The attempts to propose for: wrong ones (and, if asked, truncated ones) of selected problems."""
    selected = {row["problem_id"] for row in part.tables["pass_rates"] if row["selected"]}
    return [
        a for a in part.tables["graded"]
        if a["problem_id"] in selected and (a["correct"] is False or (include_truncated and a["truncated"]))
    ]


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


def read_reply(row: dict[str, Any], out: Completion, steps: list[str]) -> dict[str, Any]:
    """The row once the proposer's reply `out` is parsed (accepted so far; the leak test comes after).
    A reply cut at the token limit is `truncated`, whatever it holds: never a parse failure."""
    row = row | {"raw": out.text, "finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens,
                 "completion_tokens": out.completion_tokens}
    if out.finish_reason == ERROR:
        reason = failed_call_reason(out.error)
        return row | {"reject_reason": reason, "error": out.error if reason == CALL_FAILED else None}
    parsed = parse_proposal(out.text, len(steps), steps)
    row |= {"error_step": parsed.error_step, "intervention": parsed.intervention,
            "verification": parsed.verification, "reject_reason": parsed.reject_reason}
    if out.finish_reason == LENGTH:
        row["reject_reason"] = TRUNCATED
    elif parsed.reject_reason is None:
        row["intervened_text"] = intervened_text(steps, parsed.error_step, parsed.intervention)
    return row


def check_leaks(rows: list[dict[str, Any]], answers: dict[str, str]) -> Generator[Ask, Answer, None]:
    """Accept each parsed proposal unless a stated answer in its intervention equals the gold answer."""
    items, owners = [], []
    for n, row in enumerate(rows):
        for candidate in leak_candidates(row["intervention"]):
            items.append((answers[row["problem_id"]], candidate, BARE))
            owners.append(n)
    verdicts = (yield Grading(items)) if items else []
    leaks = {owners[k] for k, verdict in enumerate(verdicts) if verdict.correct is True}
    undecided = {owners[k]: provisional(v) for k, v in enumerate(verdicts) if provisional(v)}
    for n, row in enumerate(rows):
        if n in leaks:
            row |= {"reject_reason": LEAKS_ANSWER, "intervened_text": None}
        elif n in undecided:  # the leak test timed out: not accepted now, tried again on the next run
            row |= {"reject_reason": LEAK_TEST_FAILED, "intervened_text": None, "error": undecided[n]}
        else:
            row["accepted"] = True


def reference_turns(ids: list[str], problems: dict[str, dict[str, Any]], s: ProposeSettings) -> Compute:
    """Turn 1 of the two-turn prompt, one call per problem: {problem_id: (messages, its completion)}."""
    if s.reference_prompt is None or not ids:
        return {}
    messages = [reference_messages(problems[i]["problem"], reference_text(problems[i], True) or "",
                                   s.reference_prompt.text) for i in ids]
    outs = yield ModelCalls([make_request(m, s.sampling) for m in messages])
    return {i: (m, out[0]) for i, m, out in zip(ids, messages, outs)}


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


def compute(part: Part, s: ProposeSettings) -> Compute:
    problems = part.problems()
    failed = failed_attempts(part, s.include_truncated)
    steps_of = {a["attempt_id"]: split_steps(a["text"]) for a in failed}
    ids = sorted({a["problem_id"] for a in failed if reference_text(problems[a["problem_id"]], s.allow_no_reference)})
    turn1 = yield from reference_turns(ids, problems, s)
    rows: list[dict[str, Any]] = []
    requests, asked = [], []
    for attempt in failed:
        steps, problem = steps_of[attempt["attempt_id"]], problems[attempt["problem_id"]]
        blank = [proposal_row(attempt, steps, j) for j in range(s.proposals)]
        why_not = unproposable(steps, problem, turn1.get(attempt["problem_id"]), s)
        if why_not is not None:
            rows += [row | why_not for row in blank]
            continue
        requests.append(critique_request(steps, problem, turn1.get(attempt["problem_id"]), s))
        asked.append((len(rows), attempt))
        rows += blank
    completions = (yield ModelCalls(requests)) if requests else []
    for (start, attempt), outs in zip(asked, completions):
        for j, out in enumerate(outs):
            rows[start + j] = read_reply(rows[start + j], out, steps_of[attempt["attempt_id"]])
    parsed = [row for row in rows if row["reject_reason"] is None]
    yield from check_leaks(parsed, {i: p["answer"] for i, p in problems.items()})
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
    failed = [a for a in failed_attempts(part, s.include_truncated)
              if reference_text(problems[a["problem_id"]], s.allow_no_reference) is not None]
    first_turns = len({a["problem_id"] for a in failed}) if s.reference_prompt is not None else 0
    return len(failed) * s.proposals + first_turns


STAGE = Stage(
    name="propose", reads=("graded", "problems", "pass_rates"), writes={"proposals": PROPOSAL_SCHEMA},
    fingerprint=fingerprint, compute=compute, summarize=summarize, work=work,
)
