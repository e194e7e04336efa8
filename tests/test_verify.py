"""verify on plain data: one request per distinct prefix, empty prefixes as fresh turns (rendered with SmolLM2's
real chat template through transformers), and Table 1 counted per problem as the paper counts it."""

from __future__ import annotations

import polars as pl
import pytest

from intgen.backends.base import Completion, Sampling
from intgen.grading import Verdict
from intgen.resources import load_prompt
from intgen.stages import Grading, ModelCalls, Part, run_by_hand
from intgen.stages.verify import Condition, VerifySettings, compute, table1, verify_jobs
from intgen.steps import step_ends

from examples import ATTEMPT, STEPS
ALL = tuple(Condition)


def proposal(index: int, error_step: int, attempt: str = "p/a0") -> dict:
    return {"proposal_id": f"{attempt}/p{index}", "attempt_id": attempt, "problem_id": "p", "accepted": True,
            "error_step": error_step, "intervention": f"Fix number {index}: recount the apples.",
            "step_ends": step_ends(STEPS)}


def settings(conditions: tuple[Condition, ...] = ALL, continuations: int = 2) -> VerifySettings:
    return VerifySettings(continuations, Sampling(max_tokens=64, seed=1), load_prompt("solve.md"), conditions=conditions)


PROBLEMS = {"p": {"problem_id": "p", "problem": "Tom has 3 apples and buys 4. He gives 2 away. How many?", "answer": "5"}}


def test_each_baseline_is_continued_once_per_distinct_prefix() -> None:
    # three proposals for one attempt: two locate the error at step 2, one at step 3
    proposals = [proposal(0, 2), proposal(1, 2), proposal(2, 3)]
    jobs = verify_jobs(proposals, PROBLEMS, {"p/a0": ATTEMPT}, settings())
    by_condition = {c: [j.prefix_id for j in jobs if j.condition is c] for c in Condition}
    assert by_condition[Condition.intervention] == ["p/a0/p0", "p/a0/p1", "p/a0/p2"]
    assert by_condition[Condition.original_step] == ["p/a0/s2/original-step", "p/a0/s3/original-step"]
    assert by_condition[Condition.resample_step] == ["p/a0/s2/resample-step", "p/a0/s3/resample-step"]
    assert by_condition[Condition.problem_only] == ["p/problem-only"]


def test_verify_uses_the_steps_propose_numbered() -> None:
    # the proposal recorded its own step boundaries (one step of the whole text): verify must not re-split
    row = proposal(0, 1) | {"step_ends": [len(ATTEMPT)]}
    [job] = verify_jobs([row], PROBLEMS, {"p/a0": ATTEMPT}, settings((Condition.original_step,)))
    assert job.prefix == ATTEMPT


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from intgen.backends.local import default_gguf

    gguf = default_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.mark.parametrize("error_step", [1, 3])
def test_every_condition_continues_inside_the_assistant_turn(smollm2_tokenizer, error_step: int) -> None:
    from intgen.backends.local import default_gguf
    from intgen.chat_template import load_chat_template

    template = load_chat_template(str(default_gguf()))
    jobs = verify_jobs([proposal(0, error_step)], PROBLEMS, {"p/a0": ATTEMPT}, settings())
    assert len(jobs) == 4
    for job in jobs:
        request = job.request
        rendered = smollm2_tokenizer.apply_chat_template(
            request.message_dicts(), tokenize=False, continue_final_message=request.continue_final,
            add_generation_prompt=not request.continue_final,
        )
        # the generation starts inside the one assistant turn, right after the prefix
        assert rendered.endswith("<|im_start|>assistant\n" + job.prefix), (job.condition, rendered[-200:])
        assert rendered.count("<|im_start|>assistant") == 1
        assert not rendered.endswith("<|im_end|>\n")
        # the openai backend's client-side rendering (completions mode) and the local engine's agree
        assert template.render(request.message_dicts(), continue_final=request.continue_final) == rendered
        empty = job.prefix == ""
        assert request.continue_final is not empty  # an empty prefix is a fresh generation, not a continuation
        assert empty is (job.condition is Condition.problem_only or (job.condition is Condition.resample_step and error_step == 1))


def answer_with(correct_prefixes: set[str]):
    """Answers a verify part's asks: continuations of `correct_prefixes` are right, the rest wrong."""
    state: dict = {}

    def answer(ask):
        if isinstance(ask, ModelCalls):
            state["requests"] = ask.requests
            return [[Completion(f"text {i}.{m}", "stop", 5, 3) for m in range(r.n)] for i, r in enumerate(ask.requests)]
        assert isinstance(ask, Grading)
        return [Verdict(any(text.startswith(p) for p in correct_prefixes), "x", "math") for _, text, _ in ask.items]

    return answer, state


def test_compute_counts_each_prefix_once_and_keeps_by_the_rule() -> None:
    part = Part(0, {"proposals": [proposal(0, 2), proposal(1, 2)], "problems": list(PROBLEMS.values()),
                    "samples": [{"attempt_id": "p/a0", "text": ATTEMPT}]})
    intervened = STEPS[0] + "Fix number 0"
    answer, state = answer_with({intervened})
    out = run_by_hand(compute(part, settings(continuations=3)), answer)
    assert len(state["requests"]) == 2 + 1 + 1 + 1  # two interventions, one of each baseline
    from intgen.stages.verify import work

    assert work(part, settings(continuations=3)) == sum(r.n for r in state["requests"])  # progress knows ahead
    verify = {row["prefix_id"]: row for row in out["verify"]}
    assert verify["p/a0/p0"]["successes"] == 3 and verify["p/a0/p0"]["kept"]
    assert verify["p/a0/p1"]["successes"] == 0 and not verify["p/a0/p1"]["kept"]
    assert not verify["p/a0/s2/original-step"]["kept"] and verify["p/problem-only"]["attempt_id"] is None
    assert len(out["continuations"]) == 5 * 3
    assert {row["continuation_id"] for row in out["continuations"]} >= {"p/a0/p0/c2", "p/problem-only/c0"}


def continuations_table(rows: list[tuple[str, str, bool | None]]) -> pl.LazyFrame:
    return pl.LazyFrame(
        {"condition": [r[0] for r in rows], "problem_id": [r[1] for r in rows], "correct": [r[2] for r in rows],
         "error": [None] * len(rows)},
        schema={"condition": pl.String, "problem_id": pl.String, "correct": pl.Boolean, "error": pl.String},
    )


def test_table1_counts_per_problem_like_the_paper() -> None:
    rows = []
    # problem a: the intervention solves it in 2 of 8 continuations (two proposals x 4); original step never
    rows += [("intervention", "a", m < 2) for m in range(8)] + [("original-step", "a", False)] * 4
    # problem b: both solve it once
    rows += [("intervention", "b", m == 0) for m in range(8)] + [("original-step", "b", m == 0) for m in range(4)]
    # problem c: neither; one intervention continuation was ungradable (None counts as not correct)
    rows += [("intervention", "c", None)] + [("intervention", "c", False)] * 7 + [("original-step", "c", False)] * 4
    table = table1(continuations_table(rows))
    assert table["problems"] == 3
    intervention, original = table["conditions"]["intervention"], table["conditions"]["original-step"]
    assert (intervention["solved"], intervention["problems"]) == (2, 3)  # per problem, not per proposal
    assert (original["solved"], original["problems"]) == (1, 3)
    assert intervention["mean_accuracy"] == pytest.approx(3 / 24)  # over all its continuations
    assert original["mean_accuracy"] == pytest.approx(1 / 12)
    vs = intervention["vs_original_step"]
    assert vs["solved_ratio"] == pytest.approx(2.0)
    assert vs["accuracy_ratio"] == pytest.approx((3 / 24) / (1 / 12))
    low, high = vs["solved_ratio_ci95"]
    assert low is not None and low <= 2.0 and (high is None or high >= 2.0)
    assert table1(continuations_table(rows)) == table  # seeded: the same intervals every time
    assert "vs_original_step" not in original


def test_table1_without_the_baseline_has_no_ratios() -> None:
    table = table1(continuations_table([("intervention", "a", True), ("intervention", "b", False)]))
    assert table["conditions"]["intervention"] == {"problems": 2, "solved": 1, "continuations": 2, "correct": 1,
                                                   "mean_accuracy": 0.5}
