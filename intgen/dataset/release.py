"""The InT release's SFT layout (`--release-layout`): RUN/dataset/release/, the files the release's own SFT script
reads (LLaMA-Factory full SFT; its `sft.sh` passes `dataset=int_train` and `template=qwen3_nothink_noeos`).

- `int_train.json`: the `sft` config's rows, in its order, as a JSON list in the columns of the release's
  CMU-AIRe/InT-SFT that intgen has: `problem`, `answer`, `reference_solution`, `incorrect_attempt`,
  `intervention` ({content, location}) and `intervention_guided_attempt`, which is the `sft` config's completion
  text as exported (read back from its parquet file, never recomputed): the attempt's steps before the error step,
  then the intervention. The release's rows also held `self_verify_prompt` and `self_verify_output` (the
  proposer's prompt and reply), which are not written.
- `dataset_info.json`: LLaMA-Factory's description of it (alpaca: prompt = instruction, the user message the
  interventions were verified under; response = intervention_guided_attempt).
- `README.md`: how to train on it, and why without an end-of-turn token after the response.

Checked against hiyouga/LLaMA-Factory's source (ff6d4d1: data/README.md, data/parser.py, data/converter.py,
data/template.py, data/processor/supervised.py) and the release (intervention-training/int: sft.sh,
parse_interventions.ipynb, filter_guided_rollouts.ipynb); see docs/pipeline.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from intgen.rundir import RunDir, atomic_write_text

if TYPE_CHECKING:
    from intgen.config import RunConfig

RELEASE = "release"  # the folder under RUN/dataset
DATASET_NAME = "int_train"  # the name the release's sft.sh trains on (`dataset=int_train`)
DATA_FILE = "int_train.json"
FILES = (DATA_FILE, "dataset_info.json", "README.md")
COLUMNS = ("problem", "answer", "reference_solution", "incorrect_attempt", "intervention",
           "intervention_guided_attempt", "instruction")  # and `system` where the run has a system prompt


def dataset_info(system: bool = False) -> dict[str, Any]:
    """LLaMA-Factory's dataset_info.json entry (its parser sets every column named under `columns`, the others to
    None). The prompt is `instruction`, the user message the interventions were verified under (the `sft`
    config's prompt), not the bare `problem` the release's own policy was sampled with."""
    columns = {"prompt": "instruction", "response": "intervention_guided_attempt"} | (
        {"system": "system"} if system else {})
    return {DATASET_NAME: {"file_name": DATA_FILE, "formatting": "alpaca", "columns": columns}}


def release_rows(run: RunDir, dataset_dir: Path) -> list[dict[str, Any]]:
    """The exported `sft` config's rows in the release's columns, in the config's order."""
    from intgen.dataset.export import export_file

    problems = run.scan("problems").select("problem_id", "problem", "answer",
                                           pl.col("solution").alias("reference_solution"))
    attempts = run.scan("samples").select("attempt_id", pl.col("text").alias("incorrect_attempt"))
    rows = (
        pl.scan_parquet(export_file(dataset_dir, "sft")).with_row_index("row")
        .join(problems, on="problem_id", how="left").join(attempts, on="attempt_id", how="left")
        .sort("row")
        .select(
            "problem", "answer", "reference_solution", "incorrect_attempt",
            pl.struct(content=pl.col("intervention"), location=pl.col("error_step")).alias("intervention"),
            pl.col("completion").list.first().struct.field("content").alias("intervention_guided_attempt"),
            "prompt",
        )
        .collect()
    )
    out = []
    for row in rows.to_dicts():
        messages = row.pop("prompt")  # [system,] user: as the sft config and verify have them
        row["instruction"] = messages[-1]["content"]
        if messages[0]["role"] == "system":
            row["system"] = messages[0]["content"]
        out.append(row)
    return out


def write_release(run: RunDir, config: RunConfig) -> None:
    """RUN/dataset/release/ when `config.release_layout`; otherwise the files an earlier export wrote there are
    removed (a stale copy would not follow the dataset)."""
    folder = run.path / "dataset" / RELEASE
    if not config.release_layout:
        for name in FILES:
            (folder / name).unlink(missing_ok=True)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        return
    rows = release_rows(run, run.path / "dataset")
    # json.dumps keeps every character as it is (LaTeX's backslashes are escaped, and read back, exactly)
    atomic_write_text(folder / DATA_FILE, json.dumps(rows, ensure_ascii=False, indent=2) + "\n")
    system = config.system_prompt is not None
    atomic_write_text(folder / "dataset_info.json", json.dumps(dataset_info(system), indent=2) + "\n")
    atomic_write_text(folder / "README.md", readme_text(len(rows), config.prompt("solve").label(), system))


NO_EOS_TEMPLATE = '''register_template(
    name="qwen3_nothink_noeos",
    format_user=StringFormatter(slots=["<|im_start|>user\\n{{content}}<|im_end|>\\n<|im_start|>assistant\\n"]),
    format_assistant=StringFormatter(slots=["{{content}}"]),
    format_system=StringFormatter(slots=["<|im_start|>system\\n{{content}}<|im_end|>\\n"]),
    stop_words=["<|im_end|>"],
    replace_eos=True,
)'''


def readme_text(rows: int, solve_label: str, system_prompt: bool) -> str:
    """RUN/dataset/release/README.md."""
    count = (f"{rows} rows, one per kept intervention" if rows else
             "**0 rows**: no intervention was kept, so `int_train.json` is an empty list and there is nothing to "
             "train on")
    prompt = (f"LLaMA-Factory's prompt is `instruction`: the user message this run's interventions were "
              f"verified under (the solve prompt {solve_label} around the problem, as the `sft` config's prompt)"
              + (", and its system prompt is `system`" if system_prompt else "") + ". The release mapped the bare "
              "`problem` instead (its policy was sampled with the bare problem); `problem` is here too, for a "
              "mapping of one's own.")
    return f"""# intgen's SFT rows in the InT release's LLaMA-Factory layout

Written by `intgen export --release-layout`; the rest of the dataset is the parent folder (`datasets.load_dataset`).
This folder is not uploaded by `intgen push`.

- `{DATA_FILE}`: {count}.
  A JSON list, in the `sft` config's order, with the columns of the release's `CMU-AIRe/InT-SFT` that intgen
  has: `problem`, `answer`, `reference_solution`, `incorrect_attempt`, `intervention` (`content`, `location` = the
  1-based error step) and `intervention_guided_attempt` (the release's rows also had `self_verify_prompt` and
  `self_verify_output`, not written here); and `instruction` (`system`), the prompt below.
  `intervention_guided_attempt` is the `sft` config's completion, character for character: the attempt's own
  steps before the error step, then the intervention; the error step and the rest of the attempt are dropped, as
  in the release. (intgen splits steps on blank lines but never inside display math or code, and strips the
  intervention; the release split on every blank line and doubled each newline inside the intervention.)
- `dataset_info.json`: `{DATASET_NAME}` (the name the release's `sft.sh` passes as `dataset=`), alpaca format,
  `prompt` = `instruction`, `response` = `intervention_guided_attempt`.

{prompt}

## Training with LLaMA-Factory

Point LLaMA-Factory at this folder: `dataset_dir=<this folder> dataset={DATASET_NAME}` with the release's
settings (`cutoff_len=16384`, 4 epochs, effective batch 64, `learning_rate=1e-6`,
`lr_scheduler_type=cosine_with_min_lr`, `lr_scheduler_kwargs='{{"min_lr_rate": 0.1}}'`, full SFT, DeepSpeed ZeRO-3,
bf16). LLaMA-Factory's example full-SFT configs set `max_samples: 1000`, which silently caps the rows trained on
(the release inherited it): set `max_samples` to at least {rows}.

## No end-of-turn token after the response

A response here is a *prefix* of a solution, and the model must not learn to stop after it. LLaMA-Factory's
templates append an end-of-turn / EOS token to the response by default, in the labels: `qwen3_nothink` (its
template for Qwen3-4B-Instruct-2507) formats the assistant turn as `{{{{content}}}}<|im_end|>\\n`; a template
registered without `format_assistant` appends the tokenizer's EOS; one with `efficient_eos=True` still appends EOS
once at the end of the sequence. The paper's recipe trained without one, with a template (`qwen3_nothink_noeos`)
the release did not ship. A template whose assistant formatter is `{{{{content}}}}` alone (and `efficient_eos`
left False) adds nothing after the response, e.g. this one (qwen3_nothink without the assistant's
`<|im_end|>\\n`; intgen's reconstruction, not the release's file; checked with LLaMA-Factory 0.9.5: the labels
end with the response's last token), registered in LLaMA-Factory's `src/llamafactory/data/template.py`, then
`template=qwen3_nothink_noeos`:

```python
{NO_EOS_TEMPLATE}
```

Or train with intgen's own `intgen train sft` on the parent folder, which tokenizes without an end-of-turn token
after the completion.
"""
