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

from intgen.backends.base import ERROR, Completion, Sampling, make_request
from intgen.grading import BARE, boxed_answers
from intgen.resources import Prompt, fill
from intgen.stages import Answer, Ask, Compute, Grading, ModelCalls, Part, Stage
from intgen.stages.verify import intervened_text
from intgen.steps import number_steps, split_steps

# rejection reasons
NO_BLOCK = "no_block"
BAD_LOCATION = "bad_location"
EMPTY = "empty"
NO_ERROR_FOUND = "no_error_found"
LEAKS_ANSWER = "leaks_answer"
PROMPT_TOO_LONG = "prompt_too_long"
CALL_FAILED = "call_failed"
NO_STEPS = "no_steps"

# Small models echo the format's placeholder instead of writing an intervention.
PLACEHOLDERS = {"the replacement step", "replacement step", "...", "intervention"}


def proposal_id(attempt_id: str, index: int) -> str:
    return f"{attempt_id}/p{index}"


def proposal_schema(num_steps: int) -> dict[str, Any]:
    """The JSON a constrained engine must return: a verification log first (room to think), then the
    error step as an integer within this attempt's own steps, then a non-empty intervention. Key order
    matters (engines generate in it). No maxLength: llama.cpp's converter unrolls it into a grammar
    too large to load; max_tokens bounds the reply instead."""
    return {
        "type": "object",
        "properties": {
            "verification": {"type": "string"},
            "error_step": {"type": "integer", "minimum": 1, "maximum": num_steps},
            "intervention": {"type": "string", "minLength": 1},
        },
        "required": ["verification", "error_step", "intervention"],
        "additionalProperties": False,
    }


def reference_messages(problem: str, solution: str, template: str) -> list[dict[str, str]]:
    """Turn 1 of the two-turn prompt: the proposer solves the problem guided by the reference."""
    return [{"role": "user", "content": fill(template, problem=problem, reference_solution=solution)}]


def critique_messages(
    problem: str,
    solution: str,
    steps: list[str],
    critique_template: str,
    turn1: tuple[list[dict[str, str]], str] | None = None,
) -> list[dict[str, str]]:
    """The proposer's prompt. With `turn1` (messages, the proposer's guided solution) it is the paper's
    two-turn prompt; without, the single-turn variant (`critique_template` then holds everything)."""
    body = fill(
        critique_template,
        problem=problem,
        reference_solution=solution,
        numbered_attempt=number_steps(steps),
        num_steps=str(len(steps)),
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


def normalize_step(raw: Any) -> int | str | None:
    """An error location as an int; "none" where the model says there is no error; None if unreadable.
    Accepts 5, "5", "Substep 5", "Step #5", "**5**", "five", "the fifth substep"."""
    if raw is None or isinstance(raw, bool):
        return None
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if isinstance(raw, int):
        return "none" if raw in _NO_ERROR_NUMBERS else raw
    text = str(raw).strip().strip("*_`'\"").strip()
    if not text:
        return None
    match = re.search(r"(?:sub)?step\s*#?\s*(-?\d+)", text, re.I) or re.fullmatch(r"\(?#?\s*(-?\d+)\s*[.):]?", text)
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
    decoder = json.JSONDecoder()
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


def _judge(block: dict[str, Any], num_steps: int) -> Parsed:
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
    return Parsed(step, intervention, verification, None)


def parse_proposal(text: str | None, num_steps: int) -> Parsed:
    """Read the proposer's reply; the last well-formed block wins, else the last block's reason."""
    if not text:
        return Parsed(None, None, None, NO_BLOCK)
    blocks = sorted(_json_blocks(text) + _tag_blocks(text), key=lambda b: b[0])
    if not blocks:
        return Parsed(None, None, None, NO_BLOCK)
    judged = [_judge(block, num_steps) for _, block in blocks]
    accepted = [p for p in judged if p.reject_reason is None]
    return accepted[-1] if accepted else judged[-1]


# --- the answer-leak test -----------------------------------------------------------------------

_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*:?\s*\$?([^\n$]+?)\$?\s*(?:[.;]\s|[.;]?$|\n)", re.I)
_EQUALS = re.compile(r"=\s*\$?([^=\n$,;]+?)\$?\s*(?=[.,;:!?)]*(?:\s|$))")


def leak_candidates(intervention: str) -> list[str]:
    """Stand-alone answers an intervention states: boxed contents, "the answer is X", and the right-hand
    sides of equations. Each is compared with the gold answer by math equivalence (not by substring:
    "17" does not leak "7", and "0.5" does leak "\\frac{1}{2}")."""
    found = boxed_answers(intervention)
    found += [m.group(1) for m in _ANSWER_IS.finditer(intervention)]
    found += [m.group(1) for m in _EQUALS.finditer(intervention)]
    seen: set[str] = set()
    return [c.strip() for c in found if c.strip() and not (c.strip() in seen or seen.add(c.strip()))]


# --- the stage ----------------------------------------------------------------------------------

PROPOSAL_SCHEMA = {
    "problem_id": pl.String, "attempt_id": pl.String, "proposal_id": pl.String, "proposal_index": pl.Int32,
    "num_steps": pl.Int32, "error_step": pl.Int32, "intervention": pl.String, "verification": pl.String,
    "intervened_text": pl.String, "accepted": pl.Boolean, "reject_reason": pl.String, "raw": pl.String,
    "finish_reason": pl.String, "error": pl.String, "prompt_tokens": pl.Int64, "completion_tokens": pl.Int64,
}


@dataclass(frozen=True)
class ProposeSettings:
    proposals: int
    sampling: Sampling
    critique_prompt: Prompt  # turn 2 of the two-turn prompt, or the whole single-turn prompt
    reference_prompt: Prompt | None = None  # turn 1 (solve guided by the reference); None: single-turn
    structured: bool = True  # constrain the reply by a JSON schema where the backend can
    include_truncated: bool = False

    @property
    def style(self) -> str:
        return "two-turn" if self.reference_prompt is not None else "single-turn"

    def prompts(self) -> list[Prompt]:
        return [p for p in (self.reference_prompt, self.critique_prompt) if p is not None]


def fingerprint(s: ProposeSettings) -> dict[str, Any]:
    return {
        "proposals": s.proposals, "sampling": s.sampling.to_dict(), "style": s.style, "structured": s.structured,
        "include_truncated": s.include_truncated, "prompts_sha256": [p.sha256 for p in s.prompts()],
    }


def failed_attempts(part: Part, include_truncated: bool) -> list[dict[str, Any]]:
    """The attempts to propose for: wrong ones (and, if asked, truncated ones) of selected problems."""
    selected = {row["problem_id"] for row in part.tables["pass_rates"] if row["selected"]}
    return [
        a for a in part.tables["graded"]
        if a["problem_id"] in selected and (a["correct"] is False or (include_truncated and a["truncated"]))
    ]


def proposal_row(attempt: dict[str, Any], num_steps: int, index: int) -> dict[str, Any]:
    """A proposal row before its reply is read: not accepted, no reason yet."""
    return {"problem_id": attempt["problem_id"], "attempt_id": attempt["attempt_id"],
            "proposal_id": proposal_id(attempt["attempt_id"], index), "proposal_index": index,
            "num_steps": num_steps, "error_step": None, "intervention": None, "verification": None,
            "intervened_text": None, "accepted": False, "reject_reason": None, "raw": None, "finish_reason": None,
            "error": None, "prompt_tokens": 0, "completion_tokens": 0}


def failed_call_reason(error: str | None) -> str:
    """A prompt the engine's context cannot hold is a property of the data, not a failure to retry."""
    text = (error or "").lower()
    return PROMPT_TOO_LONG if "context" in text or "too long" in text else CALL_FAILED


def read_reply(row: dict[str, Any], out: Completion, steps: list[str]) -> dict[str, Any]:
    """The row once the proposer's reply `out` is parsed (accepted so far; the leak test comes after)."""
    row = row | {"raw": out.text, "finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens,
                 "completion_tokens": out.completion_tokens}
    if out.finish_reason == ERROR:
        reason = failed_call_reason(out.error)
        return row | {"reject_reason": reason, "error": out.error if reason == CALL_FAILED else None}
    parsed = parse_proposal(out.text, len(steps))
    row |= {"error_step": parsed.error_step, "intervention": parsed.intervention,
            "verification": parsed.verification, "reject_reason": parsed.reject_reason}
    if parsed.reject_reason is None:
        row["intervened_text"] = intervened_text(steps, parsed.error_step, parsed.intervention)
    return row


def check_leaks(rows: list[dict[str, Any]], answers: dict[str, str]) -> Generator[Ask, Answer, None]:
    """Accept each parsed proposal unless a stand-alone answer in its intervention equals the gold answer."""
    items, owners = [], []
    for n, row in enumerate(rows):
        for candidate in leak_candidates(row["intervention"]):
            items.append((answers[row["problem_id"]], candidate, BARE))
            owners.append(n)
    verdicts = (yield Grading(items)) if items else []
    leaks = {owners[k] for k, verdict in enumerate(verdicts) if verdict.correct is True}
    for n, row in enumerate(rows):
        if n in leaks:
            row |= {"reject_reason": LEAKS_ANSWER, "intervened_text": None}
        else:
            row["accepted"] = True


def reference_turns(failed: list[dict[str, Any]], problems: dict[str, dict[str, Any]], s: ProposeSettings) -> Compute:
    """Turn 1 of the two-turn prompt, one call per problem: {problem_id: (messages, the guided solution)}."""
    if s.reference_prompt is None:
        return {}
    ids = sorted({a["problem_id"] for a in failed})
    messages = [reference_messages(problems[i]["problem"], problems[i]["solution"] or "", s.reference_prompt.text)
                for i in ids]
    outs = yield ModelCalls([make_request(m, s.sampling) for m in messages])
    return {i: (m, out[0].text) for i, m, out in zip(ids, messages, outs) if out[0].error is None}


def compute(part: Part, s: ProposeSettings) -> Compute:
    problems = part.problems()
    failed = failed_attempts(part, s.include_truncated)
    steps_of = {a["attempt_id"]: split_steps(a["text"]) for a in failed}
    turn1 = yield from reference_turns(failed, problems, s)
    rows: list[dict[str, Any]] = []
    requests, asked = [], []
    for attempt in failed:
        steps = steps_of[attempt["attempt_id"]]
        blank = [proposal_row(attempt, len(steps), j) for j in range(s.proposals)]
        if not steps or (s.reference_prompt is not None and attempt["problem_id"] not in turn1):
            rows += [row | {"reject_reason": NO_STEPS if not steps else CALL_FAILED} for row in blank]
            continue
        problem = problems[attempt["problem_id"]]
        messages = critique_messages(problem["problem"], problem["solution"] or "", steps, s.critique_prompt.text,
                                     turn1.get(attempt["problem_id"]))
        schema = proposal_schema(len(steps)) if s.structured else None
        requests.append(make_request(messages, s.sampling, n=s.proposals, json_schema=schema))
        asked.append((len(rows), attempt, blank))
        rows += blank
    completions = (yield ModelCalls(requests)) if requests else []
    for (start, attempt, blank), outs in zip(asked, completions):
        for j, out in enumerate(outs):
            rows[start + j] = read_reply(blank[j], out, steps_of[attempt["attempt_id"]])
    parsed = [row for row in rows if row["reject_reason"] is None]
    yield from check_leaks(parsed, {i: p["answer"] for i, p in problems.items()})
    return {"proposals": rows}


def summarize(tables: dict[str, pl.LazyFrame], s: ProposeSettings) -> dict[str, Any]:
    table = tables["proposals"]
    rejected = table.filter(~pl.col("accepted")).group_by("reject_reason").len().collect()
    return {
        "attempts": table.select(pl.col("attempt_id").n_unique()).collect().item(),
        "accepted": table.select(pl.col("accepted").sum()).collect().item(),
        "rejected_by_reason": dict(zip(rejected["reject_reason"].to_list(), rejected["len"].to_list())),
        "prompt_files": [p.name for p in s.prompts()],
    }


STAGE = Stage(
    name="propose", reads=("graded", "problems", "pass_rates"), writes={"proposals": PROPOSAL_SCHEMA},
    fingerprint=fingerprint, compute=compute, summarize=summarize,
)
