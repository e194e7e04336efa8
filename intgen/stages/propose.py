"""propose: for each failed attempt, find the first critical error and write one intervention.

Building the prompt and parsing the reply are separate pure functions. The reply is read as JSON
(what a schema-constrained engine returns) or as free text ending in `<error_step>` / `<intervention>`
tags; where a model writes several blocks, the last well-formed one wins. Every rejection has a reason.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from intgen.grading import boxed_answers
from intgen.resources import fill
from intgen.steps import number_steps

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
