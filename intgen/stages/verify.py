"""verify: does the intervention fix the attempt? Continue from `steps before the error + intervention`.

The continuation is the same assistant turn (true prefill), never a new user turn. The same machinery
runs the paper's comparison conditions, each continued from a different prefix of the same attempt:

- `intervention`: the steps before the error, then the intervention (the InT condition);
- `original-step`: the steps up to and including the original wrong step;
- `resample-step`: the steps before the error (the model re-writes the step itself);
- `problem-only`: nothing (a fresh attempt).
"""

from __future__ import annotations

from enum import Enum

from intgen.steps import join_steps


class Condition(str, Enum):
    intervention = "intervention"
    original_step = "original-step"
    resample_step = "resample-step"
    problem_only = "problem-only"


def continuation_id(proposal_id: str, condition: Condition, index: int) -> str:
    suffix = "" if condition is Condition.intervention else f"/{condition.value}"
    return f"{proposal_id}{suffix}/c{index}"


def intervened_text(steps: list[str], error_step: int, intervention: str) -> str:
    """The attempt's own steps before the error, then the intervention: what SFT trains on (never the suffix)."""
    return join_steps(steps[: error_step - 1]) + intervention.strip()


def continuation_prefix(steps: list[str], error_step: int, intervention: str, condition: Condition) -> str:
    """The assistant-message prefix each condition continues from (1-based `error_step`)."""
    if condition is Condition.intervention:
        return intervened_text(steps, error_step, intervention) + "\n\n"
    if condition is Condition.original_step:
        return join_steps(steps[:error_step])
    if condition is Condition.resample_step:
        return join_steps(steps[: error_step - 1])
    return ""
