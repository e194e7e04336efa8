from __future__ import annotations

import json
from pathlib import Path

import datasets
import polars as pl
import pytest

from intgen.io import PROBLEM_COLUMNS, BadInputError, load_problems, problem_id, read_problems

ROWS = [
    {"question": "What is 2+3?", "answer": "5", "solution": "2+3 is $\\boxed{5}$."},
    {"question": "What is 10/4?", "answer": "\\frac{5}{2}", "solution": "Divide: $\\boxed{\\frac52}$."},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_every_file_type_loads_the_same(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"set{suffix}"
    frame = pl.DataFrame(ROWS)
    if suffix == ".jsonl":
        frame.write_ndjson(path)
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS))
    elif suffix == ".parquet":
        frame.write_parquet(path)
    else:
        frame.write_csv(path)
    problems = load_problems(path, source_name="set")
    assert problems.columns == list(PROBLEM_COLUMNS)
    assert problems["problem"].to_list() == ["What is 2+3?", "What is 10/4?"]
    assert problems["answer"].to_list() == ["5", "\\frac{5}{2}"]
    assert problems["problem_id"].to_list() == [problem_id("set", r["question"]) for r in ROWS]


def test_problem_id_is_stable_and_depends_on_source_and_text() -> None:
    assert problem_id("a", "x") == problem_id("a", "x")
    assert len({problem_id("a", "x"), problem_id("b", "x"), problem_id("a", "y")}) == 3


def test_column_mapping(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "odd.jsonl", [{"q": "Compute 1+1.", "final": "2", "ref": "It is 2."}])
    problems = load_problems(path, problem_column="q", answer_column="final", solution_column="ref")
    assert problems.row(0, named=True) | {"problem_id": None} == {
        "problem_id": None, "problem": "Compute 1+1.", "answer": "2", "solution": "It is 2.",
        "source": f"{tmp_path.name}/odd.jsonl", "source_id": None,
    }


def test_missing_column_names_it_and_lists_those_present(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "What?", "answer": "1"}])
    with pytest.raises(BadInputError, match=r"p.jsonl:1: no problem column .*columns present: text, answer"):
        load_problems(path)
    with pytest.raises(BadInputError, match=r"no answer column 'gold'; columns present: text, answer"):
        load_problems(path, problem_column="text", answer_column="gold")


def test_malformed_line_is_reported_or_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": "One?", "answer": "1"}\n{"problem": "Two?", "answ\n'
                    '{"problem": "Three?", "answer": "3"}\n')
    with pytest.raises(BadInputError, match=r"bad.jsonl:2: not valid JSON"):
        load_problems(path)
    result = read_problems(path, on_bad_row="skip")
    assert result.frame["problem"].to_list() == ["One?", "Three?"]
    assert [str(r) for r in result.skipped] == ["bad.jsonl:2: not valid JSON (Invalid control character at, column 26)"]


def test_empty_problem_and_missing_answer_are_bad_rows(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "e.jsonl",
        [{"problem": "  ", "answer": "1"}, {"problem": "Fine?", "answer": "2"},
         {"problem": "No answer?", "answer": None}],
    )
    with pytest.raises(BadInputError, match=r"e.jsonl:1: empty or missing problem"):
        load_problems(path)
    result = read_problems(path, on_bad_row="skip")
    assert result.frame["problem"].to_list() == ["Fine?"]
    assert [r.where for r in result.skipped] == ["e.jsonl:1", "e.jsonl:3"]


def test_nothing_to_load_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="no problems found"):
        load_problems(write_jsonl(tmp_path / "none.jsonl", []))
    with pytest.raises(BadInputError, match="no such file"):
        load_problems(tmp_path / "absent.jsonl")


def test_duplicates_are_dropped_and_counted(tmp_path: Path) -> None:
    result = read_problems(write_jsonl(tmp_path / "d.jsonl", [ROWS[0], ROWS[0], ROWS[1]]))
    assert result.frame.height == 2 and result.duplicates == 1


def test_answer_taken_from_a_boxed_solution(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "m.jsonl", [{"problem": "P?", "solution": "so $\\boxed{\\frac{1}{2}}$"}])
    assert load_problems(path)["answer"].to_list() == ["\\frac{1}{2}"]


def test_limit(tmp_path: Path) -> None:
    assert load_problems(write_jsonl(tmp_path / "l.jsonl", ROWS), limit=1).height == 1


def test_dataset_folders_load_through_datasets(tmp_path: Path) -> None:
    # A Hub id goes through datasets.load_dataset; the Hub is out of reach, so use its local forms.
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "saved"))
    assert load_problems(tmp_path / "saved")["answer"].to_list() == ["5", "\\frac{5}{2}"]
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    assert load_problems(tmp_path / "saved_dict").height == 2
    files = tmp_path / "repo" / "data"
    files.mkdir(parents=True)
    ds.to_parquet(str(files / "test-00000-of-00001.parquet"))
    assert load_problems(tmp_path / "repo", split="test")["problem"].to_list() == [r["question"] for r in ROWS]
    with pytest.raises(BadInputError, match="split"):
        load_problems(tmp_path / "repo", split="validation")


# --- the project's reference data --------------------------------------------------------------

def test_math500(evalsets: Path) -> None:
    problems = load_problems(evalsets / "math500/test.jsonl")
    assert problems.height == 500
    assert problems["solution"].null_count() == 0
    assert problems["problem_id"].n_unique() == 500
    assert problems["source_id"][0] == "test/precalculus/807.json"


def test_gsm8k_final_answer_line(evalsets: Path) -> None:
    problems = load_problems(evalsets / "gsm8k/test.jsonl")
    assert problems.height == 1319
    first = problems.row(0, named=True)
    assert first["answer"] == "18"
    assert "####" not in first["solution"] and "<<" not in first["solution"]
    assert first["solution"].endswith("$18 every day at the farmer’s market.")


@pytest.mark.parametrize("name, count", [("aime24_test.jsonl", 30), ("amc23_test.jsonl", 40)])
def test_aime_amc(evalsets: Path, name: str, count: int) -> None:
    problems = load_problems(evalsets / "aime_amc" / name)
    assert problems.height == count
    assert problems["answer"].str.contains(r"\.0$").sum() == 0  # AMC's float answers lose ".0"


def test_imo_answerbench_reports_its_malformed_row(evalsets: Path) -> None:
    path = evalsets / "imo_answerbench/answerbench_v2.csv"
    with pytest.raises(BadInputError, match=r"row 36 \(imo-bench-algebra-036\): 5 fields where the header has 6"):
        load_problems(path)
    result = read_problems(path, on_bad_row="skip")
    assert result.frame.height == 399
    assert [r.where for r in result.skipped] == ["answerbench_v2.csv row 36 (imo-bench-algebra-036)"]
    assert "imo-bench-algebra-036" not in result.frame["source_id"].to_list()


def test_a_folder_shaped_like_the_int_hard_set_loads_as_it_is(tmp_path: Path) -> None:
    # CMU-AIRe/InT-hard-set's layout: one `train` split, and both a curated `reference_solution` and a `solution`
    folder = tmp_path / "InT-hard-set"
    (folder / "data").mkdir(parents=True)
    pl.DataFrame({
        "problem": ["Find the number of subsets of {1,2,3}.", "Compute 2+2."],
        "answer": ["8", "4"],
        "reference_solution": ["Each element is in or out: $2^3=8$.", "Add: 4."],
        "reference_solution_source": ["human", "gemini"],
        "source": ["omni-math", "polaris"],
        "solution": ["a model's own worked solution", "another one"],
    }).write_parquet(folder / "data" / "train-00000-of-00001.parquet")
    problems = load_problems(str(folder))  # no split given: the only one, `train`
    assert problems["solution"].to_list() == ["Each element is in or out: $2^3=8$.", "Add: 4."]
    assert problems["answer"].to_list() == ["8", "4"] and problems["source"].to_list() == ["omni-math", "polaris"]
    with pytest.raises(BadInputError, match='split "test"'):
        load_problems(str(folder), split="test")
    assert load_problems(str(folder), solution_column="solution")["solution"][0] == "a model's own worked solution"
