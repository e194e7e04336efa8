"""localize: how well does the proposer find the first wrong step? ProcessBench's protocol, on any backend.

Each item is a problem, a solution as a list of steps, and a human label: the 0-based index of the first
wrong step, or -1 when every step is right. The critic is asked for the first wrong step with one of two
prompts: `intgen` (the proposer's own critique prompt without a reference solution, its JSON schema and its
parser — what the pipeline's propose stage does) or `processbench` (ProcessBench's protocol: paragraphs tagged
and indexed from 0, the index in `\\boxed{}`). Greedy by default; with `vote` > 1, that many samples and the
most common parsed answer (ties: the earliest step). An unparseable reply counts as wrong; an item whose calls
all failed (no reply at all: a rerun asks again) is left out of the metric and counted as `left_out`.

ProcessBench's metric, per subset: accuracy on the erroneous items (label != -1), accuracy on the correct
items (label == -1), and their harmonic mean F1; the headline is the unweighted mean F1 over the subsets.

`proposal_rows` scores a run's own proposals the same way: one per attempt, the first one answered.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from intgen.backends.base import ERROR, LENGTH, TOO_LONG, Completion, Sampling, make_request
from intgen.errors import UserError
from intgen.grading import extract_answer
from intgen.io import BadInputError
from intgen.resources import Prompt, fill
from intgen.stages import Compute, ModelCalls, Part, Stage
from intgen.stages.propose import (
    CALL_FAILED,
    NO_ERROR_FOUND,
    NO_REFERENCE,
    NO_STEPS,
    PROMPT_TOO_LONG,
    TRUNCATED,
    parse_proposal,
    proposal_schema,
)
from intgen.steps import number_steps

CRITICS = ("intgen", "processbench")
ITEM_SCHEMA = {"id": pl.String, "subset": pl.String, "generator": pl.String, "problem": pl.String,
               "steps": pl.List(pl.String), "final_answer_correct": pl.Boolean, "label": pl.Int64}
LOCALIZE_SCHEMA = {"id": pl.String, "label": pl.Int64, "predicted": pl.Int64, "reply": pl.String,
                   "subset": pl.String, "votes": pl.List(pl.Int64), "finish_reason": pl.String, "error": pl.String,
                   "prompt_tokens": pl.Int64, "completion_tokens": pl.Int64}


@dataclass(frozen=True)
class LocalizeSettings:
    critic: str  # intgen | processbench
    prompt: Prompt
    sampling: Sampling
    vote: int = 1
    structured: bool = True  # intgen critic: the proposer's JSON schema where the backend can


def read_records(path: Path, what: str) -> list[Any]:
    """A JSON list, or JSON lines."""
    try:
        text = path.read_text(encoding="utf-8-sig")
        if text.lstrip().startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{path}: not a JSON list or JSON lines of {what} ({exc})") from None


def read_item_files(paths: list[Path]) -> pl.DataFrame:
    """Several ProcessBench subsets (one per file); ids must be unique across them."""
    items = pl.concat([read_items(path) for path in paths])
    repeated = items.filter(pl.col("id").is_duplicated())["id"].unique(maintain_order=True).to_list()
    if repeated:
        raise BadInputError(f"item id {repeated[0]!r} appears more than once in {', '.join(map(str, paths))}")
    return items


def read_items(path: str | Path, subset: str | None = None) -> pl.DataFrame:
    """ProcessBench's format: a JSON list (or JSON lines) of {id, generator, problem, steps, final_answer_correct,
    label}; the subset is `subset`, else the file's name (gsm8k.json -> gsm8k)."""
    path = Path(path)
    records = read_records(path, "ProcessBench items")
    rows = []
    for index, record in enumerate(records):
        where = f"{path.name}[{index}]"
        if not isinstance(record, dict) or not isinstance(record.get("steps"), list) or not record.get("problem"):
            raise BadInputError(f"{where}: expected an object with `problem` and a list of `steps`")
        if not isinstance(record.get("label"), int) or not -1 <= record["label"] < len(record["steps"]):
            raise BadInputError(f"{where}: `label` must be -1 or the index of a step, got {record.get('label')!r}")
        rows.append({"id": str(record.get("id", index)), "subset": subset or record.get("subset") or path.stem,
                     "generator": record.get("generator"), "problem": record["problem"],
                     "steps": [str(s) for s in record["steps"]],
                     "final_answer_correct": record.get("final_answer_correct"), "label": record["label"]})
    if not rows:
        raise BadInputError(f"{path}: no items")
    return pl.DataFrame(rows, schema=ITEM_SCHEMA)


def critic_kind(prompt: Prompt) -> str:
    """Which protocol a critic prompt follows, from its markers: how its steps are shown and its reply read."""
    if "{{tagged_steps}}" in prompt.text:
        return "processbench"
    if "{{numbered_attempt}}" in prompt.text:
        return "intgen"
    raise UserError(f"{prompt.name}: a critic prompt needs {{{{numbered_attempt}}}} (intgen's numbered steps, "
                     "the reply parsed as a proposal) or {{{{tagged_steps}}}} (ProcessBench's paragraphs, the index in "
                     "\\boxed{{}})")


def critic_messages(item: dict[str, Any], s: LocalizeSettings) -> list[dict[str, str]]:
    steps = item["steps"]
    if s.critic == "processbench":
        tagged = "\n\n".join(f"<paragraph_{i}>\n{step}\n</paragraph_{i}>" for i, step in enumerate(steps))
        return [{"role": "user", "content": fill(s.prompt.text, problem=item["problem"], tagged_steps=tagged)}]
    body = fill(s.prompt.text, problem=item["problem"], numbered_attempt=number_steps(steps), num_steps=str(len(steps)))
    return [{"role": "user", "content": body}]


def parse_index(reply: Completion, num_steps: int, critic: str) -> int | None:
    """The 0-based index of the first wrong step the reply names; -1 for none; None when it cannot be read."""
    if reply.finish_reason in (ERROR, LENGTH) or not reply.text:
        return None
    if critic == "processbench":
        boxed = extract_answer(reply.text)
        try:
            value = int(str(boxed).strip()) if boxed is not None else None
        except ValueError:
            return None
        return value if value is not None and -1 <= value < num_steps else None
    parsed = parse_proposal(reply.text, num_steps)
    if parsed.reject_reason == NO_ERROR_FOUND:
        return -1
    return parsed.error_step - 1 if parsed.error_step is not None else None


def vote(predictions: list[int | None]) -> int | None:
    """The most common readable prediction (ties: the earliest step); None when none could be read."""
    readable = [p for p in predictions if p is not None]
    if not readable:
        return None
    counts = Counter(readable)
    best = max(counts.values())
    return min(p for p, c in counts.items() if c == best)


def fingerprint(s: LocalizeSettings) -> dict[str, Any]:
    return {"critic": s.critic, "prompt_sha256": s.prompt.sha256, "sampling": s.sampling.to_dict(), "vote": s.vote,
            "structured": s.structured}


def compute(part: Part, s: LocalizeSettings) -> Compute:
    items = part.tables["items"]
    requests = []
    for item in items:
        schema = proposal_schema(len(item["steps"])) if s.critic == "intgen" and s.structured else None
        requests.append(make_request(critic_messages(item, s), s.sampling, n=s.vote, json_schema=schema))
    replies = (yield ModelCalls(requests)) if requests else []
    rows = []
    for item, outs in zip(items, replies):
        predictions = [parse_index(out, len(item["steps"]), s.critic) for out in outs]
        errors = [out.error for out in outs if out.error]
        # the first sample that has a reply: the row reads `error` only when every call failed (then `metrics` leaves
        # it out, as ProcessBench scores only what the critic answered)
        shown = next((out for out in outs if out.finish_reason != ERROR), outs[0] if outs else None)
        rows.append({
            "id": item["id"], "subset": item["subset"], "label": item["label"], "predicted": vote(predictions),
            "votes": predictions, "reply": shown.text if shown else None,
            "finish_reason": shown.finish_reason if shown else None, "error": errors[0] if errors else None,
            "prompt_tokens": sum(o.prompt_tokens for o in outs),
            "completion_tokens": sum(o.completion_tokens for o in outs),
        })
    return {"localize": rows}


def metrics(table: pl.DataFrame) -> dict[str, Any]:
    """ProcessBench's metric per subset and the unweighted mean F1 over subsets (fractions; unparseable = wrong).
    Rows with no reply (`finish_reason` error: the call failed) are not judged: left out, and counted."""
    subsets: dict[str, Any] = {}
    for (subset,), every in table.group_by("subset", maintain_order=True):
        rows = every.filter(pl.col("finish_reason").fill_null("") != ERROR)
        erroneous, correct = rows.filter(pl.col("label") != -1), rows.filter(pl.col("label") == -1)
        error_acc = erroneous.select((pl.col("predicted") == pl.col("label")).fill_null(False).mean()).item() \
            if erroneous.height else None
        correct_acc = correct.select((pl.col("predicted") == -1).fill_null(False).mean()).item() \
            if correct.height else None
        f1 = None
        if error_acc is not None and correct_acc is not None:
            f1 = 0.0 if error_acc + correct_acc == 0 else 2 * error_acc * correct_acc / (error_acc + correct_acc)
        subsets[str(subset)] = {"items": rows.height, "erroneous": erroneous.height, "correct": correct.height,
                                "error_acc": error_acc, "correct_acc": correct_acc, "f1": f1,
                                "unparseable": int(rows["predicted"].null_count()),
                                "left_out": every.height - rows.height}
    f1s = [v["f1"] for v in subsets.values() if v["f1"] is not None]
    return {"subsets": subsets, "mean_f1": sum(f1s) / len(f1s) if f1s else None,
            "left_out": sum(v["left_out"] for v in subsets.values())}


def read_labels(path: str | Path) -> pl.DataFrame:
    """Human labels for a run's attempts: JSON (lines) of {attempt_id, label}, label = the 0-based index of the
    first wrong step in intgen's split of the attempt into steps, or -1 when every step is right."""
    path = Path(path)
    rows = []
    for index, record in enumerate(read_records(path, "labels")):
        if not isinstance(record, dict) or not isinstance(record.get("attempt_id"), str) \
                or not isinstance(record.get("label"), int) or record["label"] < -1:
            raise BadInputError(
                f"{path.name}[{index}]: expected {{\"attempt_id\": \"...\", \"label\": -1 or a step index}}")
        rows.append({"attempt_id": record["attempt_id"], "label": record["label"]})
    return pl.DataFrame(rows, schema={"attempt_id": pl.String, "label": pl.Int64})


def proposal_rows(proposals: pl.DataFrame, labels: pl.DataFrame) -> pl.DataFrame:
    """A run's proposals for labelled attempts, as localize rows (subset `proposals`), one per attempt as ProcessBench
    counts: the first answered proposal (lowest `proposal_index` with a reply). Its error step (1-based) becomes a
    0-based index; "no error found" is -1; a reply cut at the token limit or unreadable is unparseable (wrong), and so
    is a prompt too long for the engine (every proposal of the attempt would hit it). An attempt with no answered
    proposal (every call failed, or none was made: no reference solution, no steps) is a row with `finish_reason`
    error, `error` saying why, which `metrics` leaves out and counts."""
    reason = pl.col("reject_reason")
    no_reply = pl.col("raw").fill_null("") == ""
    unanswered = ((reason == CALL_FAILED) | (pl.col("error").is_not_null() & no_reply)
                  | reason.is_in([NO_REFERENCE, NO_STEPS])).fill_null(False)
    truncated = ((pl.col("finish_reason") == LENGTH) | (reason == TRUNCATED)).fill_null(False)
    rows = proposals.join(labels, on="attempt_id", how="inner").with_columns(unanswered.alias("unanswered"))
    first = rows.group_by("attempt_id", maintain_order=True).agg(
        pl.all().sort_by(["unanswered", "proposal_index"]).first())
    unanswered = pl.col("unanswered")
    predicted = (pl.when(unanswered | truncated).then(pl.lit(None, pl.Int64))
                 .when(reason == NO_ERROR_FOUND).then(pl.lit(-1, pl.Int64))
                 .otherwise(pl.col("error_step").cast(pl.Int64) - 1))
    finish = (pl.when(unanswered).then(pl.lit(ERROR))
              .when(reason == PROMPT_TOO_LONG).then(pl.lit(TOO_LONG))  # an answer of sorts: the engine refused it
              .otherwise(pl.col("finish_reason")))
    error = pl.when(unanswered).then(pl.coalesce("error", reason)).otherwise(pl.col("error"))
    return first.select(
        pl.col("proposal_id").alias("id"), pl.col("label"), predicted.alias("predicted"), pl.col("raw").alias("reply"),
        pl.lit("proposals").alias("subset"), pl.lit([], pl.List(pl.Int64)).alias("votes"),
        finish.alias("finish_reason"), error.alias("error"), "prompt_tokens", "completion_tokens",
    ).cast(LOCALIZE_SCHEMA)


def summarize(tables: dict[str, pl.LazyFrame], s: LocalizeSettings) -> dict[str, Any]:
    return metrics(tables["localize"].collect())


STAGE = Stage(
    name="localize", reads=("items",), writes={"localize": LOCALIZE_SCHEMA},
    fingerprint=fingerprint, compute=compute, summarize=summarize, sends=("schema",),
    work=lambda part, s: len(part.tables["items"]) * s.vote,
)
