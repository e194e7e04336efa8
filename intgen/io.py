"""Problem loading: local files (.jsonl, .json, .parquet, .csv), dataset folders and Hub datasets.

Every source comes out as one polars frame with the columns of `PROBLEM_COLUMNS`. Bad input gets
an error naming the file, the line or row, and the column at fault (with the columns present); a
bad row is never dropped silently — `on_bad_row="skip"` drops it and reports it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import polars as pl

from intgen.errors import UserError

log = logging.getLogger(__name__)

PROBLEM_COLUMNS = ("problem_id", "problem", "answer", "solution", "source", "source_id")
PROBLEM_SCHEMA = {name: pl.String for name in PROBLEM_COLUMNS}

# Column names tried in order when no mapping is given (the conventions of common benchmarks).
PROBLEM_NAMES = ("problem", "question", "Problem", "Question")
ANSWER_NAMES = ("answer", "Short Answer", "final_answer", "expected_answer", "Answer")
# A dataset with both (the InT hard set) holds the curated reference in `reference_solution`.
SOLUTION_NAMES = ("reference_solution", "solution", "Solution")
ID_NAMES = ("id", "unique_id", "Problem ID", "problem_id")
# --attempts: the attempt's text (the release's InT-hard-set-with-incorrect-attempts calls it `incorrect_attempt`)
# and, where the file has one, its own verdict (False: taken as incorrect, not graded)
ATTEMPT_NAMES = ("incorrect_attempt", "attempt", "response", "completion")
CORRECT_NAMES = ("correct", "is_correct")
VERDICTS = {"true": True, "false": False, "1": True, "0": False, "": None}
GIVEN_ATTEMPTS = "given_attempts"  # the problems table's column of attempts made elsewhere
GIVEN_ATTEMPT_TYPE = pl.List(pl.Struct({"text": pl.String, "correct": pl.Boolean}))

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
_GSM8K_ANSWER = re.compile(r"\n####\s*(.+?)\s*$", re.DOTALL)
_GSM8K_CALCULATOR = re.compile(r"<<[^<>]*>>")


class BadInputError(UserError):
    """The problem source cannot be read as asked; the message says where and why."""


@dataclass(frozen=True)
class BadRow:
    where: str  # "file.jsonl:12" or "file.csv row 37"
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class LoadResult:
    frame: pl.DataFrame
    skipped: list[BadRow] = field(default_factory=list)
    duplicates: int = 0  # rows whose problem_id was already loaded (same source, same text)


def problem_id(source: str, problem: str) -> str:
    """Stable id of a problem: a hash of where it comes from and its text."""
    return hashlib.sha256(f"{source}\n{problem}".encode()).hexdigest()[:16]


def _source_label(source: str | Path) -> str:
    path = Path(source)
    if path.exists():
        return f"{path.parent.name}/{path.name}" if path.parent.name else path.name
    return str(source)


# --- raw records ------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            where = f"{path.name}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield where, BadRow(where, f"not UTF-8 text (byte {exc.start}); save the file as UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line, object_pairs_hook=_object)
            except json.JSONDecodeError as exc:
                yield where, BadRow(where, f"not valid JSON ({exc.msg}, column {exc.colno})")
            except _DuplicateKey as exc:
                yield where, BadRow(where, f"the key {exc.args[0]!r} appears twice")


class _DuplicateKey(ValueError):
    pass


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object; a key given twice is an error (json keeps the last silently)."""
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise _DuplicateKey(key)
        found[key] = value
    return found


def _text_of(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadInputError(f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8 "
                            "(a spreadsheet export may be Latin-1)") from None


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(_text_of(path), object_pairs_hook=_object)
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except _DuplicateKey as exc:
        raise BadInputError(f"{path}: the key {exc.args[0]!r} appears twice in an object") from None
    if isinstance(data, dict):  # {"data": [...]} or similar: the one list-valued key
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise BadInputError(f"{path}: expected a list of records, or an object holding one list")
        data = lists[0]
    if not isinstance(data, list):
        raise BadInputError(f"{path}: expected a list of records, got {type(data).__name__}")
    for index, record in enumerate(data):
        yield f"{path.name}[{index}]", record


def _read_csv(path: Path) -> Iterator[tuple[str, Any]]:
    reader = csv.reader(io.StringIO(_text_of(path), newline=""))  # utf-8-sig: a BOM before the header is not a name
    header = next(reader, None)
    if header is None:
        return
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise BadInputError(f"{path}: the header names {', '.join(map(repr, repeated))} more than once")
    for number, fields in enumerate(reader, start=1):
        where = f"{path.name} row {number}"
        if len(fields) != len(header):
            label = f" ({fields[0]})" if fields else ""
            yield where, BadRow(where + label,
                                f"{len(fields)} fields where the header has {len(header)} (broken quoting?)")
            continue
        yield where, dict(zip(header, fields))


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        frame = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadInputError(f"{path}: not a readable parquet file ({reason})") from None
    return _read_frame(frame, path.name)


def _read_frame(frame: pl.DataFrame, name: str) -> Iterator[tuple[str, Any]]:
    for index, record in enumerate(frame.iter_rows(named=True)):
        yield f"{name} row {index}", record


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
# A source that ends like a file name (or starts like a path) is a file, never a Hub dataset id.
_LOOKS_LIKE_A_FILE = re.compile(r"(^[.~/]|\.[A-Za-z0-9]{1,8}$)")


def _records(source: str | Path, split: str | None, config: str | None) -> Iterator[tuple[str, Any]]:
    path = Path(source)
    if path.is_file():
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise BadInputError(f"{path}: unknown file type {path.suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")
        return reader(path)
    if not path.exists() and _LOOKS_LIKE_A_FILE.search(str(source)):
        raise BadInputError(f"{path}: no such file")
    return _read_frame(_load_dataset(str(source), split, config), str(source))


def _load_dataset(source: str, split: str | None, config: str | None) -> pl.DataFrame:
    """A dataset folder (save_to_disk or data files) or a Hub id, through `datasets`. Without a split, the
    dataset's only split (MATH-500's `test`, the InT hard set's `train`); with several, the user must say."""
    import datasets

    path = Path(source)
    try:
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            loaded = datasets.load_from_disk(source)
        else:
            loaded = datasets.load_dataset(source, config, split=split)
    except FileNotFoundError as exc:
        raise BadInputError(f"{source}: no such file, folder or Hub dataset ({exc})") from exc
    except OSError as exc:  # the Hub out of reach (offline) or refusing
        raise BadInputError(f"{source}: cannot load it from the Hub ({exc})") from exc
    except ValueError as exc:  # unknown split or config
        raise BadInputError(f"{source}: {exc}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split is None and len(loaded) == 1:
            split = next(iter(loaded))
        if split is None:
            raise BadInputError(f"{source}: several splits ({', '.join(loaded)}); pass --split")
        if split not in loaded:
            raise BadInputError(f"{source}: no split {split!r}; splits: {', '.join(loaded)}")
        loaded = loaded[split]
    return pl.from_arrow(loaded.data.table)  # type: ignore[return-value]


# --- column conventions -----------------------------------------------------------------------


def _pick(columns: Sequence[str], asked: str | None, defaults: Sequence[str], role: str, where: str) -> str | None:
    if asked is not None:
        if asked not in columns:
            raise BadInputError(
                f"{where}: no {role} column {asked!r}; columns present: {', '.join(columns) or '(none)'}"
            )
        return asked
    return next((name for name in defaults if name in columns), None)


class _NotText(ValueError):
    pass


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _text(value: Any) -> str | None:
    """A cell as text: numbers lose a useless `.0` (AMC's answer 27.0), blanks become None; a list or an
    object where text is expected is an error (never its Python repr)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple, dict)):
        raise _NotText(f"holds {'an object' if isinstance(value, dict) else 'a list'}, not text")
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return str(int(value))
    text = value if isinstance(value, str) else str(value)
    if (lone := _LONE_SURROGATE.search(text)) is not None:  # valid JSON ("\\ud800"), but no text: UTF-8 cannot hold it
        raise _NotText(f"holds a lone surrogate (U+{ord(lone.group()):04X}), which is not text")
    return text if text.strip() else None


def _gsm8k(answer: str) -> tuple[str, str] | None:
    """GSM8K's answer field is a worked solution ending in `#### 18`: split off the final answer."""
    match = _GSM8K_ANSWER.search(answer)
    if not match:
        return None
    solution = _GSM8K_CALCULATOR.sub("", answer[: match.start()]).strip()
    return match.group(1).strip(), solution


def _columns(record: dict[str, Any], asked: dict[str, str | None], where: str) -> dict[str, str | None]:
    """Which column holds each field, resolved once, from the first good record."""
    columns = list(record)
    names = {
        "problem": _pick(columns, asked["problem"], PROBLEM_NAMES, "problem", where),
        "answer": _pick(columns, asked["answer"], ANSWER_NAMES, "answer", where),
        "solution": _pick(columns, asked["solution"], SOLUTION_NAMES, "solution", where),
        "id": _pick(columns, asked["id"], ID_NAMES, "id", where),
    }
    if names["problem"] is None:
        raise BadInputError(
            f"{where}: no problem column (tried {', '.join(PROBLEM_NAMES)}; pass --problem-column); "
            f"columns present: {', '.join(columns)}"
        )
    if names["answer"] is None and names["solution"] is None:
        raise BadInputError(
            f"{where}: no answer column (tried {', '.join(ANSWER_NAMES)}; pass --answer-column) and no "
            f"solution to take a boxed answer from; columns present: {', '.join(columns)}"
        )
    return names


def _attempt_columns(record: dict[str, Any], asked: str | None, where: str) -> dict[str, str | None]:
    columns = list(record)
    names = {"attempt": _pick(columns, asked, ATTEMPT_NAMES, "attempt", where),
             "correct": _pick(columns, None, CORRECT_NAMES, "verdict", where)}
    if names["attempt"] is None:
        raise BadInputError(f"{where}: no attempt column (tried {', '.join(ATTEMPT_NAMES)}; pass --attempt-column); "
                            f"columns present: {', '.join(columns)}")
    return names


def _given_attempt(record: dict[str, Any], names: dict[str, str | None], where: str) -> dict[str, Any] | BadRow:
    """One attempt made elsewhere: its text, and its verdict where the file gives one (else None: graded)."""
    try:
        text = _text(record.get(names["attempt"]))  # type: ignore[arg-type]
    except _NotText as exc:
        return BadRow(where, f"column {names['attempt']!r} {exc}")
    if text is None:
        return BadRow(where, f"empty or missing attempt (column {names['attempt']!r})")
    verdict = record.get(names["correct"]) if names["correct"] else None
    if isinstance(verdict, float) and math.isnan(verdict):
        verdict = None
    if isinstance(verdict, (str, int)) and not isinstance(verdict, bool):  # a CSV's text, a 0/1 column
        verdict = VERDICTS.get(str(verdict).strip().lower(), verdict)
    if verdict is not None and not isinstance(verdict, bool):
        return BadRow(where, f"column {names['correct']!r} holds {verdict!r}, not true or false")
    return {"text": text, "correct": verdict}


def _another_attempt(kept: dict[str, Any], record: dict[str, Any], given: dict[str, Any], where: str,
                     first: str) -> bool:
    """Add `given`, another attempt at a problem read before (`kept`); False for an attempt the file already gave
    (a repeated row: the same critique and continuations again, not an independent draw). A row whose answer or
    reference solution differs from the problem's first row (at `first`) is an error naming both."""
    for column in ("answer", "solution"):
        if record[column] != kept[column]:
            raise BadInputError(f"{where}: this problem's {column} differs from its row at {first} "
                                f"({record[column]!r} here, {kept[column]!r} there)")
    if any(a["text"] == given["text"] for a in kept[GIVEN_ATTEMPTS]):
        return False
    kept[GIVEN_ATTEMPTS].append(given)
    return True


def _problem(record: dict[str, Any], names: dict[str, str | None], where: str, label: str) -> dict[str, Any] | BadRow:
    """One problem row from a record, or why the record is bad."""
    cells = {}
    for role in ("problem", "answer", "solution", "id"):
        try:
            cells[role] = _text(record.get(names[role])) if names[role] else None  # type: ignore[arg-type]
        except _NotText as exc:
            return BadRow(where, f"column {names[role]!r} {exc}")
    problem, answer, solution = cells["problem"], cells["answer"], cells["solution"]
    if problem is None:
        return BadRow(where, f"empty or missing problem (column {names['problem']!r})")
    if answer is not None and solution is None and (gsm8k := _gsm8k(answer)):
        answer, solution = gsm8k
    if answer is None and solution is not None:  # MATH's convention: the answer is boxed in the solution
        from intgen.grading import extract_answer

        answer = extract_answer(solution)
    if answer is None:
        return BadRow(where, f"empty or missing answer (column {names['answer'] or names['solution']!r})")
    source = record.get("source")
    return {"problem_id": problem_id(label, problem), "problem": problem, "answer": answer.strip(),
            "solution": solution, "source": source if isinstance(source, str) and source.strip() else label,
            "source_id": cells["id"]}


def read_problems(
    source: str | Path,
    *,
    problem_column: str | None = None,
    answer_column: str | None = None,
    solution_column: str | None = None,
    id_column: str | None = None,
    source_name: str | None = None,
    split: str | None = None,
    config: str | None = None,
    on_bad_row: Literal["error", "skip"] = "error",
    limit: int | None = None,
    attempts: bool = False,
    attempt_column: str | None = None,
) -> LoadResult:
    """Load problems and report what was skipped. See `load_problems`. With `attempts`, every row also holds an
    attempt made elsewhere (several rows per problem allowed): each problem gets them, in file order, as its
    `given_attempts` (text, and the file's own verdict where it has a `correct` / `is_correct` column)."""
    label = source_name or _source_label(source)
    asked = {"problem": problem_column, "answer": answer_column, "solution": solution_column, "id": id_column}
    rows: dict[str, dict[str, Any]] = {}
    skipped: list[BadRow] = []
    duplicates = 0
    names: dict[str, str | None] | None = None
    attempt_names: dict[str, str | None] | None = None
    first_at: dict[str, str] = {}  # --attempts: where each problem's first row is
    for where, record in _records(source, split, config):
        given: dict[str, Any] | BadRow | None = None
        if not isinstance(record, (dict, BadRow)):
            record = BadRow(where, f"expected an object with named fields, got {type(record).__name__}")
        if not isinstance(record, BadRow):
            names = names or _columns(record, asked, where)
            if attempts:
                attempt_names = attempt_names or _attempt_columns(record, attempt_column, where)
                given = _given_attempt(record, attempt_names, where)
            record = given if isinstance(given, BadRow) else _problem(record, names, where, label)
        if isinstance(record, BadRow):
            if on_bad_row == "error":
                raise BadInputError(f"{record} (pass on_bad_row='skip' / --skip-bad-rows to skip and count such rows)")
            skipped.append(record)
        elif record["problem_id"] in rows:
            pid = record["problem_id"]
            duplicates += given is None or not _another_attempt(rows[pid], record, given, where, first_at[pid])
        elif limit is None or len(rows) < limit:
            rows[record["problem_id"]] = record | ({GIVEN_ATTEMPTS: [given]} if given else {})
            if attempts:  # (only there: a map of every problem costs ~100 bytes each while loading)
                first_at[record["problem_id"]] = where
        elif given is None:
            break  # with attempts, the rest of the file may hold more attempts at the problems kept
    if not rows:
        detail = f"; all {len(skipped)} row(s) were bad, first: {skipped[0]}" if skipped else ""
        raise BadInputError(f"{label}: no problems found{detail}")
    if skipped:
        log.warning("%s: skipped %d bad row(s): %s", label, len(skipped), "; ".join(map(str, skipped[:5])))
    if duplicates:
        log.warning("%s: dropped %d duplicate problem(s)", label, duplicates)
    schema = PROBLEM_SCHEMA | ({GIVEN_ATTEMPTS: GIVEN_ATTEMPT_TYPE} if attempts else {})
    return LoadResult(pl.DataFrame(list(rows.values()), schema=schema), skipped, duplicates)


def load_problems(source: str | Path, **options: Any) -> pl.DataFrame:
    """Problems from a file, a dataset folder or a Hub dataset id, as a polars frame.

    Columns: `problem_id` (stable hash of source and text), `problem`, `answer`, `solution`
    (null when the source has none), `source`, `source_id` (the source's own id, if any).
    Options: `problem_column`, `answer_column`, `solution_column`, `id_column` (defaults follow
    common benchmarks), `source_name`, `split`, `config`, `on_bad_row` ("error" or "skip"), `limit`.
    """
    return read_problems(source, **options).frame
