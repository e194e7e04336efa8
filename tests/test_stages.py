"""Pure stage functions on plain rows: prompts, proposal parsing (a corpus of messy real outputs),
the answer-leak test, continuation prefixes, pass rates, export rows."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from intgen.grading import are_equivalent
from intgen.resources import read_prompt
from intgen.stages import Part
from intgen.stages import grade as grade_stage
from intgen.stages import propose
from intgen.stages.export import completion_column, prompt_column
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


def test_two_turn_and_single_turn_critique_prompts() -> None:
    turn1_messages = propose.reference_messages("P?", "Ref.", read_prompt("propose_reference.md"))
    two = propose.critique_messages("P?", "Ref.", STEPS, read_prompt("propose_critique.md"), (turn1_messages, "My sol."))
    assert [m["role"] for m in two] == ["user", "assistant", "user"]
    assert "Ref." in two[0]["content"] and two[1]["content"] == "My sol."
    assert "Substep 2: Tom starts with 3 apples" in two[2]["content"] and "Substep 4" in two[2]["content"]
    assert "Substep 1 to Substep 4" in two[2]["content"]
    one = propose.critique_messages("P?", "Ref.", STEPS, read_prompt("propose_single.md"))
    assert len(one) == 1 and "P?" in one[0]["content"] and "Ref." in one[0]["content"]
    assert "<error_step>" in one[0]["content"]


def test_proposal_schema_bounds_the_step_to_the_attempt_and_allows_no_error() -> None:
    schema = propose.proposal_schema(4)
    assert list(schema["properties"]) == ["verification", "error_step", "intervention"]  # verification first
    step = schema["properties"]["error_step"]
    assert (step["type"], step["minimum"], step["maximum"]) == ("integer", 0, 4)  # 0: no critical error
    assert step["enum"] == [0, 1, 2, 3, 4]  # llama.cpp's grammars ignore minimum/maximum
    assert "minLength" not in schema["properties"]["intervention"]  # the paper's "empty" outcome is allowed
    assert propose.parse_proposal('{"verification": "all fine", "error_step": 0, "intervention": ""}', 4).reject_reason \
        == propose.NO_ERROR_FOUND


def test_critique_prompt_holds_the_self_check_with_the_answer() -> None:
    [message] = propose.critique_messages("P?", "Ref.", STEPS, read_prompt("propose_single.md"), answer="42")
    assert 'Does it contain the exact final answer "42"?' in message["content"]
    assert "key insight" in message["content"] and "later than the error" in message["content"]
    assert "give 0 as the substep" in message["content"]


# --- parsing: a corpus of messy proposer outputs ------------------------------------------------------

CORPUS = [
    # (reply, num_steps, expected reject_reason, expected error_step, expected intervention)
    ('{"verification": "Step 2 adds wrong.", "error_step": 2, "intervention": "I add 3 + 4 = 7 carefully."}', 4, None, 2, "I add 3 + 4 = 7 carefully."),
    ("Checking...\n<error_step>2</error_step>\n<intervention>I recompute 3 + 4 carefully.</intervention>", 4, None, 2, "I recompute 3 + 4 carefully."),
    ("<error_step>Substep 2</error_step><intervention>Let me redo the sum.</intervention>", 4, None, 2, "Let me redo the sum."),
    ("<error_step>**Step 3**</error_step>\n<intervention>Fix it.</intervention>", 4, None, 3, "Fix it."),
    ("<error_step>the second substep</error_step><intervention>Redo the addition.</intervention>", 4, None, 2, "Redo the addition."),
    ("<error_step>two</error_step><intervention>Redo the addition.</intervention>", 4, None, 2, "Redo the addition."),
    ("<ERROR_STEP> 2. </ERROR_STEP>\n<INTERVENTION>\n  Redo it.  \n</INTERVENTION>", 4, None, 2, "Redo it."),
    # the last well-formed block wins
    ("<error_step>1</error_step><intervention>First try.</intervention> on reflection "
     "<error_step>2</error_step><intervention>Second try.</intervention>", 4, None, 2, "Second try."),
    ("<error_step>2</error_step><intervention>Good one.</intervention> and then a broken "
     "<error_step>9</error_step><intervention>bad</intervention>", 4, None, 2, "Good one."),
    ('Draft: {"error_step": 1, "intervention": "a"} Final: {"error_step": 3, "intervention": "Subtract 2 from 7."}', 4, None, 3, "Subtract 2 from 7."),
    ('```json\n{"verification": "ok", "error_step": "Substep 2", "intervention": "Use 7."}\n```', 4, None, 2, "Use 7."),
    ('{"error_step": 2.0, "intervention": "Float step number."}', 4, None, 2, "Float step number."),
    # the step comes after the intervention
    ("<intervention>Recount the apples.</intervention>\n<error_step>2</error_step>", 4, None, 2, "Recount the apples."),
    # rejections, each with its reason
    ("The attempt looks fine to me.", 4, propose.NO_BLOCK, None, None),
    ("", 4, propose.NO_BLOCK, None, None),
    ('{"verification": "truncated mid-str', 4, propose.NO_BLOCK, None, None),
    ("<error_step>7</error_step><intervention>Out of range.</intervention>", 4, propose.BAD_LOCATION, None, "Out of range."),
    ("<error_step>somewhere</error_step><intervention>Vague.</intervention>", 4, propose.BAD_LOCATION, None, "Vague."),
    ("<error_step>2</error_step>", 4, propose.EMPTY, 2, None),
    ("<error_step>2</error_step><intervention>   </intervention>", 4, propose.EMPTY, 2, ""),
    ("<error_step>2</error_step><intervention>the replacement step</intervention>", 4, propose.EMPTY, 2, "the replacement step"),
    ("<error_step>2</error_step><intervention>...</intervention>", 4, propose.EMPTY, 2, "..."),
    ("<error_step>None</error_step><intervention>n/a</intervention>", 4, propose.NO_ERROR_FOUND, None, "n/a"),
    ("<error_step>No error</error_step><intervention>Nothing to fix.</intervention>", 4, propose.NO_ERROR_FOUND, None, "Nothing to fix."),
    ('{"error_step": -1, "intervention": "none"}', 4, propose.NO_ERROR_FOUND, None, "none"),
    ('{"error_step": 0, "intervention": "x"}', 4, propose.NO_ERROR_FOUND, None, "x"),
    ('{"error_step": true, "intervention": "Bool is not a step."}', 4, propose.BAD_LOCATION, None, "Bool is not a step."),
]


@pytest.mark.parametrize("reply, num_steps, reason, step, intervention", CORPUS)
def test_parse_corpus(reply: str, num_steps: int, reason: str | None, step: int | None, intervention: str | None) -> None:
    parsed = propose.parse_proposal(reply, num_steps)
    assert (parsed.reject_reason, parsed.error_step, parsed.intervention) == (reason, step, intervention)


SMOLLM2 = [json.loads(line) for line in (Path(__file__).parent / "data/smollm2_proposals.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("case", SMOLLM2, ids=[f"smollm2-{i}" for i in range(len(SMOLLM2))])
def test_parse_real_smollm2_outputs(case: dict) -> None:
    parsed = propose.parse_proposal(case["text"], case["num_steps"])
    expected = case["expected"]
    assert (parsed.reject_reason, parsed.error_step, parsed.intervention) == (
        expected["reject_reason"], expected["error_step"], expected["intervention"]
    )


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) + len(SMOLLM2) >= 30


@pytest.mark.parametrize(
    "raw, expected",
    [(3, 3), ("3", 3), ("Substep 3", 3), ("step #3", 3), ("(3)", 3), ("3.", 3), ("three", 3), ("the third one", 3),
     ("3rd", 3), ("the 5th substep", 5), ("2nd", 2), ("Step 12", 12),
     ("none", "none"), ("-1", "none"), ("No error; step 3 is fine", "none"), ("There is no critical error", "none"),
     ("All steps are correct", "none"), (None, None), ("", None), ("many", None), (True, None)],
)
def test_normalize_step(raw: object, expected: object) -> None:
    assert propose.normalize_step(raw) == expected


@pytest.mark.parametrize(
    "reply, reason",
    [
        ('{"verification": "verification", "error_step": 1, "intervention": "verification"}', propose.ECHO),
        ('{"verification": "x", "error_step": 1, "intervention": "intervention"}', propose.ECHO),
        ('{"verification": "x", "error_step": 2, "intervention": "error_step"}', propose.ECHO),
        ('{"verification": "The last one", "error_step": 2, "intervention": "The last one"}', propose.ECHO),
        ('{"verification": "x", "error_step": 2, "intervention": "Tom starts with 3 apples and buys 4 more, so 3 + 4 = 8."}',
         propose.ECHO),  # one of the attempt's own steps, verbatim
        ('{"verification": "x", "error_step": 2, "intervention": "I add 3 + 4 carefully and get seven."}', None),
    ],
)
def test_echoes_are_rejected(reply: str, reason: str | None) -> None:
    assert propose.parse_proposal(reply, len(STEPS), STEPS).reject_reason == reason


def test_a_reply_cut_at_the_token_limit_is_truncated_not_a_parse_failure() -> None:
    from intgen.backends.base import Completion

    row = propose.proposal_row({"problem_id": "p", "attempt_id": "p/a0"}, STEPS, 0)
    cut = propose.read_reply(row, Completion("\n\n\n\n   \n\n", "length"), STEPS)
    assert cut["reject_reason"] == propose.TRUNCATED
    whole = propose.read_reply(row, Completion('{"verification": "v", "error_step": 2, "intervention": "Redo it."}',
                                               "stop"), STEPS)
    assert whole["reject_reason"] is None and whole["intervened_text"] == STEPS[0] + "Redo it."
    assert whole["step_ends"] == [len(STEPS[0]), len(STEPS[0] + STEPS[1]), len("".join(STEPS[:3])), len(ATTEMPT)]


# --- the leak test ----------------------------------------------------------------------------------

LEAKS = [
    # (intervention, gold, leaks): a stated final answer leaks, an intermediate equation does not
    ("So the answer is $\\boxed{7}$.", "7", True),
    ("We get 3 + 4 = 7, then continue.", "7", True),
    ("The answer is 0.5.", "\\frac{1}{2}", True),  # equivalence, not substring
    ("So there are 42 ways to choose them.", "42", True),
    ("I think the answer should be 42 here.", "42", True),
    ("The minimum value is 12.", "12", True),
    ("Thus the maximum possible value of $x$ is $\\frac{3}{2}$.", "3/2", True),
    ("So $(a,b)=(1, 2)$ works.", "(1,2)", True),
    ("We compute $25 \\times 40 = 1,000$ apples in all.", "1000", True),
    ("Therefore $n = 12$.", "12", True),
    ("Thus we get 9 in total.", "9", True),
    ("Final answer: 15.", "15", True),
    ("We have 17 apples so far.", "7", False),  # "7" is a substring, not an answer
    ("Set x = 17 and continue.", "7", False),
    ("Set x = 1 and substitute back into the equation.", "1", False),
    ("Note that f(1) = 0, so 1 is a root of the cubic.", "0", False),
    ("Since a+b=7, I should rewrite the product using a and b.", "7", False),
    ("Then $2x + 3 = 7$ gives the next relation to use.", "7", False),
    ("First find 3 + 4 = 8? No: recompute the sum carefully.", "7", False),
    ("Multiply: 2 \\times 3 = 6, then add the rest.", "11", False),
    ("I should instead add 4 to 3 before subtracting.", "5", False),
    ("Let me count the cases where $x^2 = 4$ first.", "4", False),
    ("There are 3 cases to consider; start with the first.", "12", False),
]


@pytest.mark.parametrize("intervention, gold, leaks", LEAKS)
def test_leak_test_is_about_stated_answers_by_math_equivalence(intervention: str, gold: str, leaks: bool) -> None:
    candidates = propose.leak_candidates(intervention)
    verdicts = are_equivalent([(gold, c) for c in candidates], workers=1) if candidates else []
    assert any(v is True for v in verdicts) is leaks, candidates


# --- prefixes and ids -------------------------------------------------------------------------------

def test_continuation_prefixes_for_each_condition() -> None:
    fix = "I add carefully: 3 + 4 is seven, not eight."
    assert continuation_prefix(STEPS, 2, fix, Condition.intervention) == STEPS[0] + fix + "\n\n"
    assert continuation_prefix(STEPS, 2, fix, Condition.original_step) == STEPS[0] + STEPS[1]
    assert continuation_prefix(STEPS, 2, fix, Condition.resample_step) == STEPS[0]
    assert continuation_prefix(STEPS, 2, fix, Condition.problem_only) == ""
    assert continuation_prefix(STEPS, 1, fix, Condition.intervention) == fix + "\n\n"
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
    assert row["prompt"] == [{"role": "system", "content": "Be careful."}, {"role": "user", "content": "1+1?\n\nBox it."}]
    assert row["completion"] == [{"role": "assistant", "content": "Step one.\n\nFix."}]


# --- propose: problems without a reference, and a failed first turn -----------------------------------

def propose_part(solution: str | None) -> Part:
    problem = {"problem_id": "p", "problem": "Tom has 3 apples and buys 4. He gives 2 away. How many?", "answer": "5",
               "solution": solution}
    attempt = {"problem_id": "p", "attempt_id": "p/a0", "text": ATTEMPT, "correct": False, "truncated": False}
    return Part(0, {"graded": [attempt], "problems": [problem], "pass_rates": [{"problem_id": "p", "selected": True}]})


def propose_settings(allow: bool = False) -> "propose.ProposeSettings":
    from intgen.backends.base import Sampling
    from intgen.resources import load_prompt

    return propose.ProposeSettings(2, Sampling(max_tokens=64), load_prompt("propose_critique.md"),
                                   load_prompt("propose_reference.md"), allow_no_reference=allow)


def test_a_problem_without_a_reference_is_skipped_and_counted() -> None:
    from intgen.stages import run_by_hand

    asked = []
    out = run_by_hand(propose.compute(propose_part(None), propose_settings()), lambda ask: asked.append(ask) or [])
    assert asked == [] and [row["reject_reason"] for row in out["proposals"]] == [propose.NO_REFERENCE] * 2
    assert all(row["error"] is None for row in out["proposals"])  # not a failure: nothing to retry


def test_allow_no_reference_tells_the_proposer_only_the_answer_is_known() -> None:
    from intgen.backends.base import Completion
    from intgen.stages import ModelCalls, run_by_hand

    seen = []

    def answer(ask):
        if isinstance(ask, ModelCalls):
            seen.extend(ask.requests)
            return [[Completion("I solve it.", "stop")] * r.n for r in ask.requests]
        return []

    run_by_hand(propose.compute(propose_part(""), propose_settings(allow=True)), answer)
    assert "Only the correct final answer is known: 5." in seen[0].messages[0][1]  # turn 1
    assert len(seen) == 2 and seen[1].messages[-1][0] == "user"
    # progress knows the work before the part starts: one first turn, P proposals
    assert propose.work(propose_part(""), propose_settings(allow=True)) == sum(r.n for r in seen) == 3


def test_a_failed_first_turn_is_an_error_to_retry() -> None:
    from intgen.backends.base import error_completion
    from intgen.stages import run_by_hand

    out = run_by_hand(propose.compute(propose_part("Add, then subtract: 5."), propose_settings()),
                      lambda ask: [[error_completion("http_503: down")]])
    rows = out["proposals"]
    assert [row["reject_reason"] for row in rows] == [propose.CALL_FAILED] * 2
    assert all(row["error"] == "http_503: down" for row in rows)  # the part is computed again on the next run


# --- token counts per sample ------------------------------------------------------------------------

def test_token_counts_never_exceed_max_tokens_and_add_up() -> None:
    from intgen.backends.base import share_usage

    out = share_usage([("short", "stop"), ("cut off here", "length"), ("a much longer answer text", "stop")],
                      prompt_tokens=50, completion_tokens=100, max_tokens=40)
    assert [c.completion_tokens for c in out][1] == 40  # stopped at the limit: exactly max_tokens
    assert all(c.completion_tokens <= 40 for c in out) and sum(c.prompt_tokens for c in out) == 50
    counted = share_usage([("one two", "stop"), ("three", "stop")], 5, 999, count=lambda t: len(t.split()))
    assert [c.completion_tokens for c in counted] == [2, 1]  # the model's tokenizer, where it is known
