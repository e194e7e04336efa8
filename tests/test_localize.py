"""`intgen eval-localize`: ProcessBench's metric on hand-made cases, the reply parser on real SmolLM2 replies,
and an end-to-end run on ProcessBench GSM8K items through the real llama.cpp server."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from intgen.backends.base import Completion
from intgen.cli import app
from intgen.stages.localize import LOCALIZE_SCHEMA, metrics, parse_index, read_items, vote

runner = CliRunner()


def table(rows: list[tuple[str, int, int | None]]) -> pl.DataFrame:
    return pl.DataFrame([{"id": str(i), "subset": s, "label": label, "predicted": p, "votes": [], "reply": "",
                          "finish_reason": "stop", "error": None, "prompt_tokens": 0, "completion_tokens": 0}
                         for i, (s, label, p) in enumerate(rows)], schema=LOCALIZE_SCHEMA)


LABELS = [("gsm8k", 2), ("gsm8k", -1), ("gsm8k", 0), ("gsm8k", -1), ("math", 1), ("math", -1)]


def test_an_oracle_scores_100() -> None:
    result = metrics(table([(s, label, label) for s, label in LABELS]))
    assert result["subsets"]["gsm8k"] == {"items": 4, "erroneous": 2, "correct": 2, "error_acc": 1.0,
                                          "correct_acc": 1.0, "f1": 1.0, "unparseable": 0}
    assert result["mean_f1"] == 1.0


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


SMOLLM2 = [json.loads(line) for line in (Path(__file__).parent / "data/smollm2_localize.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("case", SMOLLM2, ids=[f"smollm2-{c['critic']}-{i}" for i, c in enumerate(SMOLLM2)])
def test_parse_real_smollm2_replies(case: dict) -> None:
    assert parse_index(Completion(case["text"], case["finish_reason"]), case["num_steps"], case["critic"]) == case["expected"]


def test_items_are_read_in_processbench_format(shared_data: Path, tmp_path: Path) -> None:
    items = read_items(shared_data / "processbench/gsm8k.json")
    assert items.height == 400 and set(items["subset"]) == {"gsm8k"}
    assert items.filter(pl.col("label") == -1).height == 193
    lines = tmp_path / "few.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in json.loads((shared_data / "processbench/gsm8k.json").read_text())[:3]))
    assert read_items(lines, subset="gsm8k").height == 3
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"problem": "p", "steps": ["a"], "label": 5}]))
    from intgen.io import BadInputError

    with pytest.raises(BadInputError, match=r"bad.json\[0\]: `label` must be -1 or the index of a step"):
        read_items(bad)


@pytest.mark.slow
@pytest.mark.parametrize("critic", ["intgen", "processbench"])
def test_end_to_end_through_the_llama_server(llama_server, shared_data: Path, tmp_path: Path, critic: str) -> None:
    from servers import Proxy

    few = tmp_path / "gsm8k.jsonl"
    few.write_text("".join(json.dumps(r) + "\n" for r in json.loads((shared_data / "processbench/gsm8k.json").read_text())[:4]))
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
