"""`--release-layout`: RUN/dataset/release/, the sft rows in the InT release's LLaMA-Factory layout (int_train.json,
dataset_info.json, README.md), on runs built with the in-memory backend (fast tier)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import datasets
import polars as pl
import pytest
from typer.testing import CliRunner

from intgen.cli import app
from intgen.config import EXAMPLE_PROBLEMS, RunConfig
from intgen.dataset.export import CONFIGS, export, export_file
from intgen.dataset.release import COLUMNS, DATA_FILE, DATASET_NAME, FILES, RELEASE
from intgen.hub import dataset_files
from intgen.pipeline import build_dataset
from intgen.rundir import RunDir

from conftest import TEST_SEED
from memory_backend import MemoryBackend
from scripted import INTERVENTION, Script, answers_of

CONFIG = RunConfig(problems=str(EXAMPLE_PROBLEMS), limit=6, samples=2, proposals=2, continuations=4,
                   batch_size=2, grade_workers=1, seed=TEST_SEED, release_layout=True)
# LaTeX in the intervention (the scripted continuations reach the answer whenever INTERVENTION is in the prefix)
LATEX = INTERVENTION + r" Write each partial total as $\frac{a}{b}$, and keep $\boxed{\,}$ for the end."
runner = CliRunner()


def build(run_dir: Path, config: RunConfig = CONFIG, **script: object) -> dict:
    backend = MemoryBackend(Script(answers_of(EXAMPLE_PROBLEMS), seed=TEST_SEED, **script))  # type: ignore[arg-type]
    return build_dataset(config, run_dir, progress=False, backends={"policy": backend})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("release") / "run"
    assert build(path, intervention=LATEX)["kept"] > 1  # the premise: interventions were kept
    return path


def release_files(run_dir: Path) -> dict[str, bytes]:
    return {name: (run_dir / "dataset" / RELEASE / name).read_bytes() for name in FILES}


def test_the_release_files_hold_the_sft_rows_and_the_llama_factory_mapping(run_dir: Path) -> None:
    folder = run_dir / "dataset" / RELEASE
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)
    info = json.loads((folder / "dataset_info.json").read_text(encoding="utf-8"))
    assert info == {DATASET_NAME: {"file_name": DATA_FILE, "formatting": "alpaca",
                                   "columns": {"prompt": "instruction", "response": "intervention_guided_attempt"}}}
    # the columns LLaMA-Factory's parser reads from `columns` (DatasetAttr.join), each naming a column of the file
    assert set(info[DATASET_NAME]["columns"]) <= {"prompt", "query", "response", "history", "messages", "system",
                                                  "tools", "images", "videos", "audios", "chosen", "rejected",
                                                  "kto_tag"}
    rows = json.loads((folder / DATA_FILE).read_text(encoding="utf-8"))
    sft = pl.read_parquet(export_file(run_dir / "dataset", "sft"))
    run = RunDir(run_dir)
    problems = {r["problem_id"]: r for r in run.scan("problems").collect().iter_rows(named=True)}
    attempts = dict(run.scan("samples").select("attempt_id", "text").collect().iter_rows())
    assert len(rows) == sft.height > 1
    for row, expected in zip(rows, sft.iter_rows(named=True)):
        assert tuple(row) == COLUMNS
        assert set(info[DATASET_NAME]["columns"].values()) <= set(row)
        # the sft config's completion text, byte for byte, row by row
        assert row["intervention_guided_attempt"].encode() == expected["completion"][0]["content"].encode()
        assert row["intervention_guided_attempt"].endswith(LATEX)
        problem = problems[expected["problem_id"]]
        assert (row["problem"], row["answer"], row["reference_solution"]) == (
            problem["problem"], problem["answer"], problem["solution"])
        assert row["incorrect_attempt"] == attempts[expected["attempt_id"]]
        assert row["instruction"] == expected["prompt"][-1]["content"]  # the user message verify continued under
        assert row["intervention"] == {"content": expected["intervention"], "location": expected["error_step"]}
    # LaTeX's backslashes survive as they are: escaped once in the JSON text, never doubled or lost
    text = (folder / DATA_FILE).read_text(encoding="utf-8")
    assert r"$\\frac{a}{b}$" in text and r"$\\boxed{\\,}$" in text
    assert r"\frac{a}{b}" in rows[0]["intervention_guided_attempt"] and "\\\\frac" not in rows[0]["intervention"][
        "content"]


def test_the_file_loads_as_llama_factory_loads_it(run_dir: Path) -> None:
    folder = run_dir / "dataset" / RELEASE
    loaded = datasets.load_dataset("json", data_files=[str(folder / DATA_FILE)], split="train")  # its loader.py
    sft = pl.read_parquet(export_file(run_dir / "dataset", "sft"))
    assert loaded.num_rows == sft.height and set(COLUMNS) <= set(loaded.column_names)
    assert loaded["intervention_guided_attempt"] == [c[0]["content"] for c in sft["completion"]]
    readme = (folder / "README.md").read_text(encoding="utf-8")
    for needle in (f"{sft.height} rows", "dataset_dir=", f"dataset={DATASET_NAME}", "end-of-turn / EOS token",
                   "qwen3_nothink_noeos", 'format_assistant=StringFormatter(slots=["{{content}}"])', "efficient_eos",
                   "intgen train sft", "max_samples", "solve.md"):
        assert needle in readme, needle
    card = (run_dir / "dataset" / "README.md").read_text(encoding="utf-8")
    assert f"`{RELEASE}/{DATA_FILE}`" in card and "`intgen push` uploads the configs' parquet files" in card


def test_the_release_folder_adds_no_config_and_every_config_still_loads(run_dir: Path) -> None:
    dataset = str(run_dir / "dataset")
    names = datasets.get_dataset_config_names(dataset)
    assert sorted(names) == sorted(n for n in CONFIGS if pl.read_parquet(export_file(run_dir / "dataset", n)).height)
    for name in names:
        loaded = datasets.load_dataset(dataset, name, split="train")
        assert loaded.num_rows == pl.read_parquet(export_file(run_dir / "dataset", name)).height, name
        assert "intervention_guided_attempt" not in loaded.column_names
    # `intgen push` uploads the configs' parquet files (and the card and the report), not the release folder
    assert all(RELEASE not in path.parts for path in dataset_files(run_dir / "dataset"))
    assert len(dataset_files(run_dir / "dataset")) == len(CONFIGS)


def test_a_rerun_of_export_writes_the_same_bytes(run_dir: Path) -> None:
    before = release_files(run_dir)
    card = (run_dir / "dataset" / "README.md").read_bytes()
    export(RunDir(run_dir), CONFIG)
    assert release_files(run_dir) == before
    assert (run_dir / "dataset" / "README.md").read_bytes() == card
    assert not list((run_dir / "dataset").rglob("*.tmp"))


def test_without_the_option_no_release_folder_is_written_and_a_stale_one_goes(tmp_path: Path) -> None:
    build(tmp_path / "run", replace(CONFIG, release_layout=False))
    assert not (tmp_path / "run" / "dataset" / RELEASE).exists()
    assert f"{RELEASE}/" not in (tmp_path / "run" / "dataset" / "README.md").read_text(encoding="utf-8")
    # the option on the export command (saved in config.json), then off again
    result = runner.invoke(app, ["export", "--run-dir", str(tmp_path / "run"), "--release-layout"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "run" / "dataset" / RELEASE).iterdir()) == sorted(FILES)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["release_layout"] is True
    result = runner.invoke(app, ["export", "--run-dir", str(tmp_path / "run"), "--no-release-layout"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "run" / "dataset" / RELEASE).exists()


def test_the_option_is_on_export_and_build_dataset() -> None:
    for command in ("export", "build-dataset"):
        result = runner.invoke(app, [command, "--help"], terminal_width=200)
        assert result.exit_code == 0 and "--release-layout" in result.output, command


def test_nothing_kept_writes_the_files_with_zero_rows(tmp_path: Path) -> None:
    assert build(tmp_path / "run", fixes=False)["kept"] == 0  # no continuation reaches the answer
    folder = tmp_path / "run" / "dataset" / RELEASE
    assert json.loads((folder / DATA_FILE).read_text(encoding="utf-8")) == []
    info = json.loads((folder / "dataset_info.json").read_text(encoding="utf-8"))
    assert info[DATASET_NAME]["file_name"] == DATA_FILE
    assert "**0 rows**: no intervention was kept" in (folder / "README.md").read_text(encoding="utf-8")
    card = (tmp_path / "run" / "dataset" / "README.md").read_text(encoding="utf-8")
    assert "**Empty:**" in card and f"`{RELEASE}/{DATA_FILE}` (the 0 `sft` rows" in card
    for name in datasets.get_dataset_config_names(str(tmp_path / "run" / "dataset")):
        assert name != "sft"
        datasets.load_dataset(str(tmp_path / "run" / "dataset"), name, split="train")


def test_the_prompt_is_the_user_message_the_interventions_were_verified_under() -> None:
    from intgen.dataset.release import dataset_info, readme_text

    assert dataset_info(True)[DATASET_NAME]["columns"] == {
        "prompt": "instruction", "response": "intervention_guided_attempt", "system": "system"}
    text = readme_text(3, "`solve.md` (sha256 0)", True)
    assert "the solve prompt `solve.md` (sha256 0) around the problem" in text
    assert "its system prompt is `system`" in text
