"""verify on plain data: which proposals are verified, the matched unit and its baselines, each condition its own
draw, empty prefixes as fresh turns (rendered with SmolLM2's real chat template through transformers), grading of
the continuation alone, and Table 1 on the matched set — tested on data with no effect (its intervals hold 1) and
with one (they do not)."""

from __future__ import annotations

from math import comb

import numpy as np
import polars as pl
import pytest

from intgen.backends.base import Completion, Sampling
from intgen.cache import sample_keys
from intgen.dataset.analysis import table1
from intgen.grading import Verdict
from intgen.lift import KeepRule
from intgen.resources import load_prompt
from intgen.stages import Grading, ModelCalls, Part, run_by_hand
from intgen.stages.sample import sample_requests
from intgen.stages.verify import (
    CONTINUATION_SCHEMA,
    VERIFY_SCHEMA,
    Baselines,
    Condition,
    VerifySettings,
    compute,
    intervened_text,
    verify_jobs,
    work,
)
from intgen.steps import step_ends

from examples import ATTEMPT, STEPS

ALL = tuple(Condition)
SOLVE = load_prompt("solve.md")
PROBLEMS = {"p": {"problem_id": "p", "problem": "Tom has 3 apples and buys 4. He gives 2 away. How many?",
                  "answer": "5"}}


def proposal(index: int, error_step: int, attempt: str = "p/a0", accepted: bool = True, problem: str = "p") -> dict:
    return {"proposal_id": f"{attempt}/p{index}", "proposal_index": index, "attempt_id": attempt,
            "problem_id": problem, "accepted": accepted, "error_step": error_step,
            "intervention": f"Fix number {index}: recount the apples.", "step_ends": step_ends(STEPS)}


def settings(conditions: tuple[Condition, ...] = ALL, continuations: int = 2, all_proposals: bool = False,
             seed: int | None = 1) -> VerifySettings:
    return VerifySettings(continuations, Sampling(max_tokens=64, seed=seed), SOLVE, conditions=conditions,
                          all_proposals=all_proposals)


TEXTS = {f"p/a{k}": ATTEMPT for k in range(4)}


def test_the_first_accepted_proposal_of_each_attempt_is_verified_unless_all_are_asked_for() -> None:
    proposals = [proposal(0, 2, accepted=False), proposal(2, 3), proposal(1, 2),  # p1 is a0's first accepted one
                 proposal(0, 3, attempt="p/a1")]
    first = verify_jobs(proposals, PROBLEMS, TEXTS, settings((Condition.intervention,)))
    assert [j.prefix_id for j in first] == ["p/a0/p1", "p/a1/p0"]
    every = verify_jobs(proposals, PROBLEMS, TEXTS, settings((Condition.intervention,), all_proposals=True))
    assert [j.prefix_id for j in every] == ["p/a0/p1", "p/a0/p2", "p/a1/p0"]


def test_baselines_are_run_for_the_matched_unit_only() -> None:
    # attempt a1 lists first in the table, but a0 is the first failed attempt with an accepted proposal
    proposals = [proposal(0, 3, attempt="p/a1"), proposal(1, 2, attempt="p/a1"), proposal(0, 2, accepted=False),
                 proposal(1, 2), proposal(2, 3)]
    jobs = verify_jobs(proposals, PROBLEMS, TEXTS, settings(all_proposals=True))
    by_condition = {c: [j.prefix_id for j in jobs if j.condition is c] for c in Condition}
    assert by_condition[Condition.intervention] == ["p/a0/p1", "p/a0/p2", "p/a1/p0", "p/a1/p1"]
    assert by_condition[Condition.original_step] == ["p/a0/s2/original-step"]  # the matched unit: a0/p1, step 2
    assert by_condition[Condition.resample_step] == ["p/a0/s2/resample-step"]
    assert by_condition[Condition.problem_only] == ["p/problem-only"]
    assert [j.prefix_id for j in jobs if j.matched] == ["p/a0/p1", "p/a0/s2/original-step", "p/a0/s2/resample-step",
                                                        "p/problem-only"]
    assert all(j.proposal["proposal_id"] == "p/a0/p1" for j in jobs if j.matched)
    assert {j.request.n for j in jobs} == {2}  # every condition continued M times


def test_verify_uses_the_steps_propose_numbered() -> None:
    # the proposal recorded its own step boundaries (one step of the whole text): verify must not re-split
    row = proposal(0, 1) | {"step_ends": [len(ATTEMPT)]}
    [_, job] = verify_jobs([row], PROBLEMS, TEXTS, settings((Condition.intervention, Condition.original_step)))
    assert job.prefix == ATTEMPT


def test_the_sft_completion_is_exactly_the_prefix_verified() -> None:
    [job] = verify_jobs([proposal(0, 3)], PROBLEMS, TEXTS, settings((Condition.intervention,)))
    assert job.prefix == intervened_text(STEPS, 3, proposal(0, 3)["intervention"])
    assert job.prefix == STEPS[0] + STEPS[1] + "Fix number 0: recount the apples."  # no separator added after it


def test_each_condition_is_an_independent_draw_never_a_sampled_attempt() -> None:
    # The sample stage's request for the same problem with the same sampling: before, problem-only's first K
    # samples had its cache keys (the sampled attempts, known failures, served again), and resample-step at step 1
    # was the very same request as problem-only.
    s = settings(continuations=8, seed=0)
    sampled = sample_requests(list(PROBLEMS.values()), SOLVE.text, s.sampling, 4)[0]
    jobs = verify_jobs([proposal(0, 1)], PROBLEMS, TEXTS, s)
    empty = [j for j in jobs if j.prefix == ""]
    assert {j.condition for j in empty} == {Condition.problem_only, Condition.resample_step}
    assert empty[0].request.messages == empty[1].request.messages == sampled.messages  # the same prompt ...
    keys = {job.condition: set(sample_keys("openai", "m", job.request)) for job in jobs}
    sample_stage = set(sample_keys("openai", "m", sampled))
    for condition, ks in keys.items():
        assert not ks & sample_stage, condition  # ... but other draws
        assert all(not ks & other for c, other in keys.items() if c is not condition)
    seeds = {job.request.sampling.seed for job in jobs}
    assert len(seeds) == len(jobs) and sampled.sampling.seed not in seeds  # vLLM samples by seed: each its own
    again = verify_jobs([proposal(0, 1)], PROBLEMS, TEXTS, s)
    assert [j.request for j in again] == [j.request for j in jobs]  # derived, so the same on every run
    unseeded = verify_jobs([proposal(0, 1)], PROBLEMS, TEXTS, settings(seed=None))
    assert len({frozenset(sample_keys("openai", "m", j.request)) for j in unseeded}) == 4  # the draw label alone


@pytest.mark.slow
def test_no_problem_only_continuation_is_a_sampled_attempt(tmp_path) -> None:
    # Over the wire to the scripted server, whose reply is a function of the request (its seed, the choice's index,
    # the prompt): the paper's sampling for both stages, one cache; the sample stage's K attempts, then verify's
    # problem-only and resample-step (error at step 1) continuations of the same prompt. A continuation equal to
    # an attempt would mean the same seed and index were asked for again, or the cache answered it.
    from intgen.backends.openai_http import OpenAIBackend
    from intgen.cache import CallCache
    from intgen.calls import CallStats, run_requests

    from scripted import ScriptedServer

    sampling = Sampling(temperature=0.7, top_p=0.8, top_k=20, max_tokens=400, seed=0)
    s = VerifySettings(4, sampling, SOLVE, conditions=(Condition.intervention, Condition.resample_step,
                                                       Condition.problem_only))
    server = ScriptedServer({row["problem"]: row["answer"] for row in PROBLEMS.values()})
    backend = OpenAIBackend("scripted", base_url=server.url, continuation="chat", backoff_initial_s=0.05)
    cache = CallCache(tmp_path / "cache.sqlite")
    try:
        [attempts] = run_requests(backend, sample_requests(list(PROBLEMS.values()), SOLVE.text, sampling, 4), cache)
        empty = [j.request for j in verify_jobs([proposal(0, 1)], PROBLEMS, TEXTS, s) if j.prefix == ""]
        stats = CallStats()
        answers = run_requests(backend, empty, cache, stats)
    finally:
        backend.close()
        server.stop()
    assert len(empty) == 2 and stats.cache_hits == 0  # nothing answered from the sampled attempts' cache entries
    sampled = {c.text for c in attempts}
    assert len(sampled) == 4  # the premise: four different attempts that a repeated draw would reproduce
    texts = [c.text for cs in answers for c in cs]
    assert len(texts) == 8 and all(texts)
    assert not sampled & set(texts) and len(set(texts)) == len(texts)  # fresh draws, and the two conditions differ


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
    jobs = verify_jobs([proposal(0, error_step)], PROBLEMS, TEXTS, settings())
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
        assert empty is (job.condition is Condition.problem_only
                         or (job.condition is Condition.resample_step and error_step == 1))


def answer_with(correct_prefixes: set[str], texts: dict[str, str] | None = None):
    """Answers a verify part's asks: continuations of `correct_prefixes` are right, the rest wrong; `texts` gives
    the continuation text per prefix (default `text i.m`)."""
    state: dict = {}

    def answer(ask):
        if isinstance(ask, ModelCalls):
            state["requests"] = ask.requests
            out = []
            for i, r in enumerate(ask.requests):
                prefix = r.messages[-1][1] if r.continue_final else ""
                text = (texts or {}).get(prefix, f"text {i}")
                out.append([Completion(text, "stop", 5, 3) for _ in range(r.n)])
                state.setdefault("prefix_of", {})[text] = prefix
            return out
        assert isinstance(ask, Grading)
        state["graded"] = [text for _, text, _ in ask.items]
        return [Verdict(state["prefix_of"].get(text, "") in correct_prefixes, "x", "math") for _, text, _ in ask.items]

    return answer, state


def part_of(proposals: list[dict]) -> Part:
    return Part(0, {"proposals": proposals, "problems": list(PROBLEMS.values()),
                    "samples": [{"attempt_id": a, "text": t} for a, t in TEXTS.items()]})


def test_compute_keeps_by_the_rule_and_progress_knows_the_work_ahead() -> None:
    part = part_of([proposal(0, 2), proposal(1, 2, attempt="p/a1")])
    answer, state = answer_with({STEPS[0] + "Fix number 0: recount the apples."})
    out = run_by_hand(compute(part, settings(continuations=3)), answer)
    assert len(state["requests"]) == 2 + 3  # two interventions (one per attempt), the matched unit's three baselines
    assert work(part, settings(continuations=3)) == sum(r.n for r in state["requests"])
    verify = {row["prefix_id"]: row for row in out["verify"]}
    assert verify["p/a0/p0"]["successes"] == 3 and verify["p/a0/p0"]["kept"] and verify["p/a0/p0"]["matched"]
    assert verify["p/a1/p1"]["successes"] == 0 and not verify["p/a1/p1"]["kept"] and not verify["p/a1/p1"]["matched"]
    assert not verify["p/a0/s2/original-step"]["kept"] and verify["p/problem-only"]["attempt_id"] is None
    assert verify["p/problem-only"]["proposal_id"] == "p/a0/p0"  # the baselines name the proposal they are matched to
    assert len(out["continuations"]) == 5 * 3
    assert {row["continuation_id"] for row in out["continuations"]} >= {"p/a0/p0/c2", "p/problem-only/c0"}


def test_a_continuation_is_graded_on_its_own_text() -> None:
    # the original step's prefix ends in the attempt's own boxed answer; a continuation that writes none earns nothing
    part = part_of([proposal(0, 4)])
    original = "".join(STEPS)
    answer, state = answer_with(set(), texts={original: " Let me double-check: yes."})
    out = run_by_hand(compute(part, settings((Condition.intervention, Condition.original_step))), answer)
    assert " Let me double-check: yes." in state["graded"]
    assert all("\\boxed{6}" not in text for text in state["graded"])  # never the prefix with it
    stored = [row["text"] for row in out["continuations"] if row["condition"] == "original-step"]
    assert stored == [" Let me double-check: yes."] * 2  # the table keeps the continuation alone too


def test_a_part_of_continuations_round_trips_through_its_schema() -> None:
    out = run_by_hand(compute(part_of([proposal(0, 2)]), settings()), answer_with(set())[0])
    frame = pl.DataFrame(out["continuations"], schema=CONTINUATION_SCHEMA)
    assert frame["matched"].all() and frame.height == 4 * 2


# --- Table 1 -------------------------------------------------------------------------------------

def continuations_frame(correct: dict[str, np.ndarray], problems: list[str], failed: set[tuple[str, str]] = frozenset(),
                        too_long: set[tuple[str, str]] = frozenset()) -> pl.LazyFrame:
    """Matched continuation rows: `correct[condition]` is a problems x M array of outcomes."""
    rows = []
    for condition, grid in correct.items():
        for i, problem in enumerate(problems):
            for m, hit in enumerate(grid[i]):
                long = (problem, condition) in too_long
                rows.append({"problem_id": problem, "condition": condition, "matched": True,
                             "correct": None if long else bool(hit),
                             "grade_reason": "prefix_too_long" if long else "math",
                             "error": "http_500: x" if (problem, condition) in failed and m == 0 else None})
    return pl.LazyFrame(rows, schema={"problem_id": pl.String, "condition": pl.String, "matched": pl.Boolean,
                                      "correct": pl.Boolean, "grade_reason": pl.String, "error": pl.String})


CONDITIONS = [c.value for c in Condition]


def null_table(rate: float, problems: int, m: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    ids = [f"q{i}" for i in range(problems)]
    return table1(continuations_frame({c: rng.random((problems, m)) < rate for c in CONDITIONS}, ids), CONDITIONS, m)


def holds_one(pair: list[float | None]) -> bool:
    low, high = pair
    return (low is None or low <= 1.0) and (high is None or high >= 1.0)


def test_table1_counts_each_problem_once_with_equal_weight() -> None:
    ids = ["a", "b", "c"]
    grids = {"intervention": np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]),
             "original-step": np.array([[0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])}
    table = table1(continuations_frame(grids, ids), ["intervention", "original-step"], 4)
    intervention, original = table["conditions"]["intervention"], table["conditions"]["original-step"]
    assert table["problems"] == 3 and table["continuations_per_condition"] == 4
    assert (intervention["solved"], intervention["problems"], intervention["continuations"]) == (2, 3, 12)
    assert (original["solved"], original["problems"]) == (1, 3)
    assert intervention["mean_accuracy"] == pytest.approx((2 / 4 + 1 / 4 + 0) / 3)
    vs = intervention["vs_original_step"]
    assert vs["solved_ratio"] == pytest.approx(2.0) and vs["accuracy_ratio"] == pytest.approx(3.0)
    low, high = vs["solved_ratio_ci95"]
    assert low is not None and low <= 2.0 and (high is None or high >= 2.0)  # the interval holds the estimate
    assert table1(continuations_frame(grids, ids), ["intervention", "original-step"], 4) == table  # seeded
    assert "vs_original_step" not in original and "selection" in table


def test_table1_leaves_out_incomplete_problems_and_says_why() -> None:
    ids = ["a", "b", "c"]
    grids = {c: np.zeros((3, 4)) for c in ("intervention", "original-step")}
    table = table1(continuations_frame(grids, ids, failed={("b", "original-step")}, too_long={("c", "intervention")}),
                   ["intervention", "original-step"], 4)
    assert table["problems"] == 1 and table["left_out"] == {"failed_calls": 1, "prefix_too_long": 1}
    assert table["conditions"]["intervention"]["continuations"] == 4
    none = table1(continuations_frame(grids, ids[1:], failed={("b", "original-step"), ("c", "intervention")}),
                  ["intervention", "original-step"], 4)
    assert none["problems"] == 0 and none["conditions"] == {} and none["left_out"]["failed_calls"] == 2


def test_table1_intervals_hold_one_when_every_condition_has_the_same_rate() -> None:
    # the paper's scale: 334 problems, 32 continuations each, a success rate of 1% in every condition
    table = null_table(0.01, 334, 32, seed=3)
    for condition in ("intervention", "resample-step", "problem-only"):
        vs = table["conditions"][condition]["vs_original_step"]
        assert holds_one(vs["solved_ratio_ci95"]) and holds_one(vs["accuracy_ratio_ci95"]), (condition, vs)
    # and over many such runs the 95% intervals hold 1 about 95% of the time (not 100%: they are not too wide)
    held = [holds_one(null_table(0.05, 120, 8, seed)["conditions"]["intervention"]["vs_original_step"]
                      ["solved_ratio_ci95"]) for seed in range(100)]
    assert 0.88 <= sum(held) / len(held) <= 0.995


def test_table1_finds_a_real_effect() -> None:
    rng = np.random.default_rng(0)
    ids = [f"q{i}" for i in range(334)]
    grids = {"intervention": rng.random((334, 32)) < 0.05, "original-step": rng.random((334, 32)) < 0.01}
    vs = table1(continuations_frame(grids, ids), ["intervention", "original-step"], 32)["conditions"]["intervention"]
    assert vs["vs_original_step"]["solved_ratio_ci95"][0] > 1.5 and vs["vs_original_step"]["accuracy_ratio_ci95"][0] > 3


def test_many_proposals_per_problem_do_not_make_an_effect_that_does_not_exist() -> None:
    # The case: 334 problems, 4 failed attempts x 4 accepted proposals each, every proposal verified, the same
    # 1% success rate in every condition. Counted over all verified interventions, the intervention "solves" far
    # more problems than the original step (a budget 16x larger); on the matched set it does not.
    rng = np.random.default_rng(7)
    problems = [{"problem_id": f"q{i}", "problem": f"Problem {i}?", "answer": "5"} for i in range(334)]
    proposals = [proposal(j, 2, attempt=f"q{i}/a{k}", problem=f"q{i}") for i in range(334) for k in range(4)
                 for j in range(4)]
    part = Part(0, {"proposals": proposals, "problems": problems,
                    "samples": [{"attempt_id": f"q{i}/a{k}", "text": ATTEMPT} for i in range(334) for k in range(4)]})

    def answer(ask):
        if isinstance(ask, ModelCalls):
            return [[Completion("\\boxed{5}", "stop") for _ in range(r.n)] for r in ask.requests]
        return [Verdict(bool(rng.random() < 0.01), "5", "math") for _ in ask.items]

    s = settings(continuations=32, all_proposals=True)
    out = run_by_hand(compute(part, s), answer)
    frame = pl.LazyFrame(out["continuations"], schema=CONTINUATION_SCHEMA)
    naive = frame.group_by("condition", "problem_id").agg(pl.col("correct").any()).group_by("condition").agg(
        pl.col("correct").sum()).collect()
    solved = dict(zip(naive["condition"].to_list(), naive["correct"].to_list()))
    assert solved["intervention"] > 1.5 * solved["original-step"]  # the premise: the unequal budget is there
    table = table1(frame, CONDITIONS, 32)
    assert table["problems"] == 334
    for condition in CONDITIONS:
        assert table["conditions"][condition]["continuations"] == 334 * 32
    for condition in ("intervention", "resample-step", "problem-only"):
        vs = table["conditions"][condition]["vs_original_step"]
        assert holds_one(vs["solved_ratio_ci95"]) and holds_one(vs["accuracy_ratio_ci95"]), (condition, vs)


# --- each intervention's own baseline, and the lift rule -------------------------------------------------------

def lift_settings(keep_rule: KeepRule, continuations: int = 32) -> VerifySettings:
    return VerifySettings(continuations, Sampling(max_tokens=64, seed=1), SOLVE, conditions=ALL, all_proposals=True,
                          baselines=Baselines.every, keep_rule=keep_rule, alpha=0.05)


def test_every_verified_proposal_gets_its_attempts_step_baselines_once() -> None:
    proposals = [proposal(0, 2), proposal(1, 2, attempt="p/a1"), proposal(2, 2, attempt="p/a1"),
                 proposal(3, 3, attempt="p/a1")]
    jobs = verify_jobs(proposals, PROBLEMS, TEXTS, lift_settings(KeepRule.paper))
    ids = [j.prefix_id for j in jobs]
    assert len(ids) == len(set(ids))  # a baseline two proposals share (a1, step 2) is continued once
    assert ids == ["p/a0/p0", "p/a0/s2/original-step", "p/a0/s2/resample-step", "p/problem-only",
                   "p/a1/p1", "p/a1/s2/original-step", "p/a1/s2/resample-step", "p/a1/p2",
                   "p/a1/p3", "p/a1/s3/original-step", "p/a1/s3/resample-step"]
    assert [j.matched for j in jobs] == [True] * 4 + [False] * 7  # Table 1 still counts only the matched unit
    matched_only = verify_jobs(proposals, PROBLEMS, TEXTS, settings(all_proposals=True))
    assert [j.prefix_id for j in matched_only][4:] == ["p/a1/p1", "p/a1/p2", "p/a1/p3"]


def answer_counts(correct: dict[str, int]):
    """Answers a verify part: the first `correct[prefix]` continuations of a prefix are right, the rest wrong."""
    where: dict[str, tuple[str, int]] = {}

    def answer(ask):
        if isinstance(ask, ModelCalls):
            out = []
            for i, r in enumerate(ask.requests):
                prefix = r.messages[-1][1] if r.continue_final else ""
                for m in range(r.n):
                    where[f"t{i}.{m}"] = (prefix, m)
                out.append([Completion(f"t{i}.{m}", "stop", 5, 3) for m in range(r.n)])
            return out
        assert isinstance(ask, Grading)
        return [Verdict(where[text][1] < correct.get(where[text][0], 0), "x", "math") for _, text, _ in ask.items]

    return answer


@pytest.mark.parametrize("keep_rule", list(KeepRule))
def test_the_lift_is_measured_against_the_interventions_own_baseline(keep_rule: KeepRule) -> None:
    # a0: 6/32 against its original step's 0/32 (p = 0.0121); a1: 3/32 against 0/32 (p = 0.119, a lucky pass)
    part = part_of([proposal(0, 2), proposal(1, 3, attempt="p/a1")])
    fix = {0: STEPS[0] + "Fix number 0: recount the apples.",
           1: STEPS[0] + STEPS[1] + "Fix number 1: recount the apples."}
    out = run_by_hand(compute(part, lift_settings(keep_rule)),
                      answer_counts({fix[0]: 6, fix[1]: 3, "".join(STEPS[:2]): 0, "".join(STEPS[:1]): 5}))
    rows = {row["prefix_id"]: row for row in out["verify"]}
    a0, a1 = rows["p/a0/p0"], rows["p/a1/p1"]
    assert (a0["successes"], a0["baseline_successes"], a0["baseline_continuations"]) == (6, 0, 32)
    assert a0["lift"] == pytest.approx(6 / 32) and a0["lift_p"] == pytest.approx(comb(32, 6) / comb(64, 6))
    assert (a0["resample_successes"], a0["resample_continuations"]) == (5, 32)  # steps before the error: STEPS[0]
    assert (a1["successes"], a1["baseline_successes"]) == (3, 0)
    assert a1["lift_p"] == pytest.approx(comb(32, 3) / comb(64, 3))
    assert a0["kept"] and a1["kept"] is (keep_rule is KeepRule.paper)  # the lift rule drops the lucky pass
    assert all(rows[p]["lift"] is None for p in rows if rows[p]["condition"] != "intervention")
    pl.DataFrame(out["verify"], schema=VERIFY_SCHEMA)  # the new columns fit the table's schema


def test_the_lift_rule_needs_the_baselines_it_compares_with() -> None:
    from intgen.config import resolve
    from intgen.errors import UserError

    with pytest.raises(UserError, match="keep-rule: lift .* needs --condition original-step and --baselines every"):
        resolve({"keep_rule": "lift", "conditions": ["intervention", "original-step"]}, {})
    config = resolve({"keep_rule": "lift", "conditions": ["intervention", "original-step"], "baselines": "every"}, {})
    assert (config.keep_rule, config.alpha) == ("lift", 0.05)


def test_top_up_below_at_most_half_alpha_is_a_clear_error() -> None:
    from intgen.config import RunConfig
    from intgen.errors import UserError

    lift = {"conditions": ("intervention", "original-step"), "baselines": "every", "keep_rule": "lift", "top_up": 8}
    with pytest.raises(UserError, match=r"top_up_below: 0.02 is at most alpha/2 \(0.025\)"):
        RunConfig(**lift, top_up_below=0.02)
    with pytest.raises(UserError, match="top_up: topping up re-tests a borderline lift: it needs --keep-rule lift"):
        RunConfig(top_up=8)
