"""`intgen eval-localize`: ProcessBench's metric on hand-made cases, the reply parser on real SmolLM2 replies,
and an end-to-end run on ProcessBench GSM8K items through the real llama.cpp server."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from intgen.backends.base import Completion, Sampling
from intgen.cli import app
from intgen.evals.localize import (
    LOCALIZE_SCHEMA,
    LocalizeSettings,
    compute,
    metrics,
    parse_index,
    proposal_rows,
    read_items,
    vote,
)
from intgen.resources import load_prompt
from intgen.stages import Part
from intgen.stages.propose import PROPOSAL_SCHEMA

runner = CliRunner()


def table(rows: list[tuple[str, int, int | None]], failed: int = 0) -> pl.DataFrame:
    """Localize rows, and `failed` more (per subset) whose call failed: no reply, nothing to judge."""
    subsets = list(dict.fromkeys(s for s, _, _ in rows))
    rows = [(s, label, p, "stop") for s, label, p in rows]
    rows += [(s, 1, None, "error") for s in subsets for _ in range(failed)]
    return pl.DataFrame([{"id": str(i), "subset": s, "label": label, "predicted": p, "votes": [], "reply": "",
                          "finish_reason": finish, "error": "timeout" if finish == "error" else None,
                          "prompt_tokens": 0, "completion_tokens": 0}
                         for i, (s, label, p, finish) in enumerate(rows)], schema=LOCALIZE_SCHEMA)


LABELS = [("gsm8k", 2), ("gsm8k", -1), ("gsm8k", 0), ("gsm8k", -1), ("math", 1), ("math", -1)]


def test_an_oracle_scores_100() -> None:
    result = metrics(table([(s, label, label) for s, label in LABELS]))
    assert result["subsets"]["gsm8k"] == {"items": 4, "erroneous": 2, "correct": 2, "error_acc": 1.0,
                                          "correct_acc": 1.0, "f1": 1.0, "unparseable": 0, "left_out": 0}
    assert result["mean_f1"] == 1.0 and result["left_out"] == 0


def test_always_no_error_scores_zero_f1() -> None:
    result = metrics(table([(s, label, -1) for s, label in LABELS]))
    gsm8k = result["subsets"]["gsm8k"]
    assert (gsm8k["error_acc"], gsm8k["correct_acc"], gsm8k["f1"]) == (0.0, 1.0, 0.0)
    assert result["mean_f1"] == 0.0


def test_unparseable_counts_as_wrong_and_the_mean_is_unweighted() -> None:
    rows = [("gsm8k", 2, 2), ("gsm8k", -1, None), ("math", 1, None), ("math", -1, -1), ("math", 3, 3), ("math", -1, -1)]
    result = metrics(table(rows))
    assert result["subsets"]["gsm8k"]["correct_acc"] == 0.0 and result["subsets"]["gsm8k"]["unparseable"] == 1
    assert result["subsets"]["math"]["error_acc"] == 0.5 and result["subsets"]["math"]["f1"] == pytest.approx(2 / 3)
    assert result["mean_f1"] == pytest.approx((0.0 + 2 / 3) / 2)


def test_failed_calls_are_left_out_and_counted() -> None:
    # ProcessBench scores what the critic answered: a call that failed (retried on the next run) is not a wrong answer.
    rows = [("gsm8k", 2, 2), ("gsm8k", -1, -1), ("gsm8k", 0, None), ("math", 1, 1), ("math", -1, 0)]
    result = metrics(table(rows, failed=3))
    assert result["subsets"]["gsm8k"] == {"items": 3, "erroneous": 2, "correct": 1, "error_acc": 0.5,
                                          "correct_acc": 1.0, "f1": pytest.approx(2 / 3), "unparseable": 1,
                                          "left_out": 3}
    assert result["subsets"]["math"] == {"items": 2, "erroneous": 1, "correct": 1, "error_acc": 1.0,
                                         "correct_acc": 0.0, "f1": 0.0, "unparseable": 0, "left_out": 3}
    assert result["left_out"] == 6 and result["mean_f1"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("replies, predicted, finish", [
    ([("", "error"), ("\\boxed{1}", "stop"), ("\\boxed{1}", "stop")], 1, "stop"),  # one sample failed: the rest vote
    ([("", "error"), ("no box", "stop")], None, "stop"),  # answered, unreadable: wrong
    ([("", "error"), ("", "error")], None, "error"),  # every call failed: left out
])
def test_a_critic_row_reads_error_only_when_every_call_failed(replies, predicted, finish) -> None:
    item = {"id": "0", "subset": "gsm8k", "label": 1, "problem": "p", "steps": ["a", "b", "c"]}
    s = LocalizeSettings("processbench", load_prompt("localize_processbench.md"), Sampling(), vote=len(replies))
    run = compute(Part(0, {"items": [item]}), s)
    next(run)
    with pytest.raises(StopIteration) as done:
        run.send([[Completion(text, why, error="timeout" if why == "error" else None) for text, why in replies]])
    (row,) = done.value.value["localize"]
    assert (row["predicted"], row["finish_reason"]) == (predicted, finish)
    assert metrics(pl.DataFrame([row], schema=LOCALIZE_SCHEMA))["left_out"] == (finish == "error")


def test_votes() -> None:
    assert vote([2, 2, -1, None]) == 2 and vote([3, 1, 3, 1]) == 1 and vote([None, None]) is None


@pytest.mark.parametrize(
    "critic, text, steps, expected",
    [("processbench", "The error is in paragraph 2, so \\boxed{2}.", 4, 2),
     ("processbench", "All paragraphs are fine: \\boxed{-1}", 4, -1),
     ("processbench", "\\boxed{7}", 4, None),  # out of range
     ("processbench", "I think paragraph 1.", 4, None),  # no box
     ("intgen", '{"verification": "x", "error_step": 3, "intervention": "Redo it."}', 4, 2),  # 1-based -> 0-based
     ("intgen", '{"verification": "x", "error_step": 0, "intervention": ""}', 4, -1),
     ("intgen", "<error_step>1</error_step><intervention>fix</intervention>", 4, 0),
     ("intgen", "<error_step>9</error_step><intervention>fix</intervention>", 4, None)],
)
def test_parse_index(critic: str, text: str, steps: int, expected: int | None) -> None:
    assert parse_index(Completion(text, "stop"), steps, critic) == expected
    assert parse_index(Completion(text, "length"), steps, critic) is None  # a reply cut off is not read


SMOLLM2 = [json.loads(line)
           for line in (Path(__file__).parent / "data/smollm2_localize.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("case", SMOLLM2, ids=[f"smollm2-{c['critic']}-{i}" for i, c in enumerate(SMOLLM2)])
def test_parse_real_smollm2_replies(case: dict) -> None:
    reply = Completion(case["text"], case["finish_reason"])
    assert parse_index(reply, case["num_steps"], case["critic"]) == case["expected"]


def test_items_are_read_in_processbench_format(evalsets: Path, tmp_path: Path) -> None:
    items = read_items(evalsets / "processbench/gsm8k.json")
    assert items.height == 400 and set(items["subset"]) == {"gsm8k"}
    assert items.filter(pl.col("label") == -1).height == 193
    lines = tmp_path / "few.jsonl"
    rows = json.loads((evalsets / "processbench/gsm8k.json").read_text())
    lines.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    assert read_items(lines, subset="gsm8k").height == 3
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"problem": "p", "steps": ["a"], "label": 5}]))
    from intgen.io import BadInputError

    with pytest.raises(BadInputError, match=r"bad.json\[0\]: `label` must be -1 or the index of a step"):
        read_items(bad)


@pytest.mark.slow
@pytest.mark.parametrize("critic", ["intgen", "processbench"])
def test_end_to_end_through_the_llama_server(llama_server, evalsets: Path, tmp_path: Path, critic: str) -> None:
    from servers import Proxy

    few = tmp_path / "gsm8k.jsonl"
    rows = json.loads((evalsets / "processbench/gsm8k.json").read_text())
    few.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    proxy = Proxy(llama_server.url)
    args = ["eval-localize", "--problems", str(few), "--backend", "openai", "--model", "smollm2", "--base-url",
            proxy.url, "--structured-output", "json_object", "--max-tokens", "200", "--critic-prompt", critic,
            "--run-dir", str(tmp_path / "run"), "--no-progress"]
    try:
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        sent = len(proxy.forwarded)
        assert sent >= 4 and all(body.get("temperature") == 0 for _, body in proxy.forwarded)  # greedy
        rows = pl.read_parquet(tmp_path / "run" / "localize.parquet")
        assert rows.columns[:4] == ["id", "label", "predicted", "reply"] and rows.height == 4
        report = json.loads((tmp_path / "run" / "localize.json").read_text())
        assert set(report["subsets"]) == {"gsm8k"} and "mean_f1" in report
        assert "F1" in result.output
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and len(proxy.forwarded) == sent  # resumable: nothing sent again
    finally:
        proxy.stop()


# --- scoring a run's own proposals (--score-run) ------------------------------------------------------------------

def proposal(attempt: str, index: int, reason: str | None = None, step: int | None = None, finish: str | None = "stop",
             raw: str | None = "the reply", error: str | None = None) -> dict:
    return {"problem_id": "q", "attempt_id": attempt, "proposal_id": f"{attempt}/p{index}", "proposal_index": index,
            "num_steps": 6, "step_ends": [], "error_step": step, "intervention": None, "verification": None,
            "intervened_text": None, "accepted": reason is None, "reject_reason": reason, "raw": raw,
            "finish_reason": finish, "error": error, "prompt_tokens": 10, "completion_tokens": 5}


FAILED = {"reason": "call_failed", "finish": "error", "raw": "", "error": "http_503: overloaded"}
# (what the attempt's proposals are, in table order; the proposal scored, its 0-based prediction, its finish_reason)
ATTEMPTS = {
    "first-answered": ([proposal("a", 0, step=3), proposal("a", 1, step=5)], "a/p0", 2, "stop"),
    "lowest-index-wins-whatever-the-order": ([proposal("b", 2, step=1), proposal("b", 1, step=4)], "b/p1", 3, "stop"),
    "failed-call-skipped": ([proposal("c", 0, **FAILED), proposal("c", 1, step=2)], "c/p1", 1, "stop"),
    "first-turn-failed-skipped": ([proposal("d", 0, "call_failed", finish=None, raw=None, error="timeout"),
                                   proposal("d", 1, "no_error_found", step=None)], "d/p1", -1, "stop"),
    "error-without-reply-skipped": ([proposal("e", 0, None, finish=None, raw=None, error="worker_died"),
                                     proposal("e", 1, "echo", step=4)], "e/p1", 3, "stop"),
    "truncated-never-its-location": ([proposal("f", 0, "truncated", step=2, finish="length"),
                                      proposal("f", 1, step=2)], "f/p0", None, "length"),
    "truncated-no-error-is-not-minus-one": ([proposal("g", 0, "truncated", step=None, finish="length")], "g/p0", None,
                                            "length"),
    "leak-test-failed-still-answered": ([proposal("h", 0, "leak_test_failed", step=6, error="timeout")], "h/p0", 5,
                                        "stop"),
    "unreadable-is-wrong": ([proposal("i", 0, "no_block"), proposal("i", 1, step=1)], "i/p0", None, "stop"),
    "prompt-too-long-is-wrong": ([proposal("j", 0, "prompt_too_long", finish="error", raw=""),
                                  proposal("j", 1, "prompt_too_long", finish="error", raw="")],
                                 "j/p0", None, "too_long"),
    "every-call-failed-left-out": ([proposal("k", 0, **FAILED), proposal("k", 1, **FAILED)], "k/p0", None, "error"),
    "never-asked-left-out": ([proposal("l", 0, "no_reference", finish=None, raw=None)], "l/p0", None, "error"),
}


@pytest.mark.parametrize("case", ATTEMPTS, ids=list(ATTEMPTS))
def test_one_proposal_per_attempt(case: str) -> None:
    proposals, scored, predicted, finish = ATTEMPTS[case]
    attempt = proposals[0]["attempt_id"]
    labels = pl.DataFrame({"attempt_id": [attempt, "labelled-without-proposals"], "label": [1, 0]})
    rows = proposal_rows(pl.DataFrame(proposals, schema=PROPOSAL_SCHEMA), labels)
    assert rows.select("id", "predicted", "finish_reason").rows() == [(scored, predicted, finish)]


def test_score_run_metric() -> None:
    # label per attempt (0-based); predictions as ATTEMPTS gives them: a 2, b 3, c 1, d -1, e 3, f/g None, h 5, i/j None
    labels = {"a": 2, "b": 0, "c": 1, "d": -1, "e": -1, "f": 1, "g": -1, "h": 5, "i": 0, "j": 3, "k": 1, "l": -1}
    unlabelled = [proposal("z", 0, step=1)]
    proposals = pl.DataFrame([p for ps, *_ in ATTEMPTS.values() for p in ps] + unlabelled, schema=PROPOSAL_SCHEMA)
    rows = proposal_rows(proposals, pl.DataFrame({"attempt_id": list(labels), "label": list(labels.values())}))
    assert rows.height == 12 and rows.filter(pl.col("finish_reason") == "error")["error"].to_list() == [
        "http_503: overloaded", "no_reference"]  # why each was left out
    result = metrics(rows)
    # scored: 10 attempts. erroneous a b c f h i j: right a c h -> 3/7; correct d e g: right d -> 1/3
    assert result["subsets"]["proposals"] == {
        "items": 10, "erroneous": 7, "correct": 3, "error_acc": pytest.approx(3 / 7),
        "correct_acc": pytest.approx(1 / 3), "f1": pytest.approx(0.375), "unparseable": 4, "left_out": 2}
    assert result["left_out"] == 2
