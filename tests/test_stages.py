"""Pure stage functions on plain rows: the solve prompt, continuation prefixes, ids, pass rates, export rows.
The propose stage's own tests (prompts, parsing, the leak test) are in test_propose.py."""

from __future__ import annotations

import polars as pl

from intgen.dataset.export import completion_column, prompt_column
from intgen.resources import read_prompt
from intgen.stages import grade as grade_stage
from intgen.stages import propose
from intgen.stages.sample import attempt_rows, sample_requests, solve_messages
from intgen.stages.verify import Condition, continuation_id, continuation_prefix, intervened_text, prefix_id

from examples import ATTEMPT, STEPS


def test_attempt_has_four_steps() -> None:
    assert len(STEPS) == 4


# --- prompts ----------------------------------------------------------------------------------------

def test_solve_prompt_asks_for_a_box_and_keeps_latex() -> None:
    [message] = solve_messages("Find $\\frac{1}{2} + {{x}}$.", read_prompt("solve.md"))
    assert message["role"] == "user"
    assert message["content"].startswith("Find $\\frac{1}{2} + {{x}}$.")  # untrusted markers are not expanded
    assert "\\boxed{}" in message["content"]


def test_sample_requests_ask_for_k_samples() -> None:
    from intgen.backends.base import Sampling

    requests = sample_requests([{"problem_id": "p", "problem": "1+1?"}], read_prompt("solve.md"), Sampling(), 4)
    assert requests[0].n == 4 and requests[0].messages[-1][0] == "user"


# --- prefixes and ids -------------------------------------------------------------------------------

def test_continuation_prefixes_for_each_condition() -> None:
    fix = "I add carefully: 3 + 4 is seven, not eight."
    # the intervention's prefix is the SFT completion itself: nothing added after the intervention
    assert (continuation_prefix(STEPS, 2, fix, Condition.intervention) == STEPS[0] + fix
            == intervened_text(STEPS, 2, fix))
    assert continuation_prefix(STEPS, 2, fix, Condition.original_step) == STEPS[0] + STEPS[1]
    assert continuation_prefix(STEPS, 2, fix, Condition.resample_step) == STEPS[0]
    assert continuation_prefix(STEPS, 2, fix, Condition.problem_only) == ""
    assert continuation_prefix(STEPS, 1, fix, Condition.intervention) == fix
    text = intervened_text(STEPS, 2, "  " + fix + "\n")
    assert ATTEMPT.startswith(text[: len(STEPS[0])]) and text.endswith(fix)
    assert "leaving 8 - 2" not in text  # never the suffix


def test_ids_chain() -> None:
    pid = propose.proposal_id("abc/a1", 2)
    assert pid == "abc/a1/p2"
    proposal = {"proposal_id": pid, "attempt_id": "abc/a1", "problem_id": "abc", "error_step": 3}
    assert continuation_id(prefix_id(Condition.intervention, proposal), 5) == "abc/a1/p2/c5"
    assert prefix_id(Condition.original_step, proposal) == "abc/a1/s3/original-step"
    assert prefix_id(Condition.resample_step, proposal) == "abc/a1/s3/resample-step"
    assert continuation_id(prefix_id(Condition.problem_only, proposal), 0) == "abc/problem-only/c0"


# --- grade rows and pass rates ----------------------------------------------------------------------

def test_attempt_rows_mark_truncation_and_errors() -> None:
    from intgen.backends.base import Completion, error_completion

    rows = attempt_rows(
        [{"problem_id": "p"}],
        [[Completion("a \\boxed{1}", "stop"), Completion("cut off", "length"), error_completion("http_503: x")]],
    )
    assert [r["attempt_id"] for r in rows] == ["p/a0", "p/a1", "p/a2"]
    assert [r["truncated"] for r in rows] == [False, True, False]
    assert [grade_stage.needs_grading(r) for r in rows] == [None, grade_stage.TRUNCATED, grade_stage.SAMPLE_ERROR]


def test_pass_rates() -> None:
    graded = pl.LazyFrame({
        "problem_id": ["a", "a", "a", "a", "b", "b"],
        "correct": [True, False, None, False, False, False],
        "truncated": [False, False, True, False, False, False],
    })
    rates = grade_stage.pass_rates(graded).collect().sort("problem_id")
    assert rates.select("correct", "incorrect", "ungradable", "truncated", "pass_rate").rows() == [
        (1, 2, 1, 1, 0.25), (0, 2, 0, 0, 0.0)
    ]


# --- export rows ------------------------------------------------------------------------------------

def test_export_rows_are_trl_conversational() -> None:
    frame = pl.DataFrame({"problem": ["1+1?"], "intervened_text": ["Step one.\n\nFix."]})
    out = frame.select(prompt_column("{{problem}}\n\nBox it.", "Be careful.").alias("prompt"),
                       completion_column().alias("completion"))
    row = out.row(0, named=True)
    assert row["prompt"] == [{"role": "system", "content": "Be careful."},
                             {"role": "user", "content": "1+1?\n\nBox it."}]
    assert row["completion"] == [{"role": "assistant", "content": "Step one.\n\nFix."}]


# --- token counts per sample ------------------------------------------------------------------------

def test_token_counts_never_exceed_max_tokens_and_add_up() -> None:
    from intgen.backends.base import share_usage

    out = share_usage([("short", "stop"), ("cut off here", "length"), ("a much longer answer text", "stop")],
                      prompt_tokens=50, completion_tokens=100, max_tokens=40)
    assert [c.completion_tokens for c in out][1] == 40  # stopped at the limit: exactly max_tokens
    assert all(c.completion_tokens <= 40 for c in out) and sum(c.prompt_tokens for c in out) == 50
    counted = share_usage([("one two", "stop"), ("three", "stop")], 5, 999, count=lambda t: len(t.split()))
    assert [c.completion_tokens for c in counted] == [2, 1]  # the model's tokenizer, where it is known
