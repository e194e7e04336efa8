"""The fast tier: the whole pipeline (driver, resume, part markers, refusal of changed settings, retry of failed
rows) on the in-memory backend (tests/memory_backend.py), in seconds and with no server. The same paths against
real servers are the slow tier's (test_pipeline, test_faults, test_cli)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from intgen.config import EXAMPLE_PROBLEMS, RunConfig
from intgen.dataset.export import export_file
from intgen.driver import StageConfigChanged
from intgen.pipeline import build_dataset, run_named_stage
from intgen.rundir import RunDir

from conftest import TEST_SEED
from memory_backend import Killed, MemoryBackend
from scripted import Script, answers_of

CONFIG = RunConfig(problems=str(EXAMPLE_PROBLEMS), limit=6, samples=2, proposals=2, continuations=4,
                   batch_size=2, grade_workers=1, seed=TEST_SEED, conditions=("intervention", "original-step"))


def script() -> Script:
    return Script(answers_of(EXAMPLE_PROBLEMS), seed=TEST_SEED)


def build(run_dir: Path, backend: MemoryBackend, config: RunConfig = CONFIG, force: bool = False) -> dict:
    return build_dataset(config, run_dir, force=force, progress=False, backends={"policy": backend})


def tables(run_dir: Path) -> dict[str, pl.DataFrame]:
    return {name: pl.read_parquet(export_file(run_dir / "dataset", name)) for name in ("interventions", "sft")}


def test_a_run_keeps_interventions_and_a_rerun_sends_nothing(tmp_path: Path) -> None:
    backend = MemoryBackend(script())
    summary = build(tmp_path / "run", backend)
    assert summary["kept"] > 0 and not summary["failed"]  # the premise: the script's fixes are kept
    sent = len(backend.sent)
    again = MemoryBackend(script())
    assert build(tmp_path / "run", again)["kept"] == summary["kept"]
    assert again.sent == []  # every part is marked done and every call is cached
    rows = tables(tmp_path / "run")["sft"]
    assert rows.height == summary["kept"] and sent > 0


def test_the_same_config_and_seed_give_the_same_dataset(tmp_path: Path) -> None:
    build(tmp_path / "a", MemoryBackend(script()))
    build(tmp_path / "b", MemoryBackend(script()))
    first, second = tables(tmp_path / "a"), tables(tmp_path / "b")
    for name in first:
        assert first[name].equals(second[name]), name


def stage_tables(run_dir: Path) -> dict[str, pl.DataFrame]:
    return {table: pl.read_parquet(run_dir / table) for table in ("samples", "graded", "proposals", "verify",
                                                                    "continuations")}


def test_scheduling_changes_no_row(tmp_path: Path) -> None:
    # the defaults (3 parts in flight, every request of every part in the window) against a strictly sequential
    # schedule (one part at a time, one sample per batch)
    together = MemoryBackend(script())
    build(tmp_path / "together", together)
    alone = MemoryBackend(script(), window=1)
    build(tmp_path / "alone", alone, RunConfig(**(CONFIG.to_dict() | {"chunks_in_flight": 1})))
    assert max(together.batches) > 1 and max(alone.batches) == 1
    assert sorted(map(repr, together.sent)) == sorted(map(repr, alone.sent))  # the same calls, in another order
    for name, frame in stage_tables(tmp_path / "together").items():
        assert frame.equals(stage_tables(tmp_path / "alone")[name]), name
    for name, frame in tables(tmp_path / "together").items():
        assert frame.height and frame.equals(tables(tmp_path / "alone")[name]), name


# parts of 4 problems computed in chunks of 2 (and 1): against parts of 2 computed whole
CHUNKED = RunConfig(**(CONFIG.to_dict() | {"batch_size": 4}))


@pytest.fixture
def chunks_of_two(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Chunks of 2 problems; returns the (table, part) the dataflow reads from disk, as it reads them."""
    import intgen.driver
    import intgen.parts

    monkeypatch.setattr(intgen.parts, "CHUNK", 2)
    read: list[tuple[str, int]] = []
    real = intgen.driver.read_rows

    def read_rows(run: RunDir, table: str, index: int) -> list[dict]:
        read.append((table, index))
        return real(run, table, index)

    monkeypatch.setattr(intgen.driver, "read_rows", read_rows)
    return read


def test_chunks_are_handed_on_in_memory_and_give_the_rows_of_whole_parts(tmp_path: Path,
                                                                         chunks_of_two: list) -> None:
    build(tmp_path / "chunked", MemoryBackend(script()), CHUNKED)
    # each stage took its input chunks from the stage just before it, not from its files; verify may read the
    # samples back (released if no stage was computing on them: memory holds what is being computed), once a part
    assert {table for table, _ in chunks_of_two} <= {"problems", "samples"}
    samples = [index for table, index in chunks_of_two if table == "samples"]
    assert len(samples) == len(set(samples))
    run = RunDir(tmp_path / "chunked")
    assert run.part_count("verify") == 2 and pl.read_parquet(run.part_path("problems", 0)).height == 4
    run.close()
    build(tmp_path / "whole", MemoryBackend(script()))  # parts of 2: one chunk each
    build(tmp_path / "alone", MemoryBackend(script(), window=1),
          RunConfig(**(CHUNKED.to_dict() | {"chunks_in_flight": 1})))
    for other in ("whole", "alone"):
        for name, frame in stage_tables(tmp_path / "chunked").items():
            assert frame.height and frame.equals(stage_tables(tmp_path / other)[name]), (other, name)
        for name, frame in tables(tmp_path / "chunked").items():
            assert frame.equals(tables(tmp_path / other)[name]), (other, name)


def test_a_part_whose_input_is_computed_again_waits_for_it_and_is_decided_then(
        tmp_path: Path, chunks_of_two: list, monkeypatch: pytest.MonkeyPatch) -> None:
    import intgen.driver
    # a failed sample makes its part due again; the grade part after it is current save for its input, so it
    # waits for the new samples part to be written and is decided then: due (the retried samples changed it)
    config = RunConfig(**(CHUNKED.to_dict() | {"samples": 3}))
    clean = MemoryBackend(script())
    build(tmp_path / "clean", clean, config)
    first = MemoryBackend(script(), fail=lambda r: "http_503: overloaded" if r.n == 3 else None)
    summary = build(tmp_path / "run", first, config)
    assert summary["failed"].get("sample")
    deferred = []
    decide = intgen.driver.Dataflow.due_whatever_its_input

    def spied(flow: intgen.driver.Dataflow, k: int, index: int) -> bool:
        due = decide(flow, k, index)
        if not due:
            deferred.append((flow.plan[k].stage.name, index))
        return due

    monkeypatch.setattr(intgen.driver.Dataflow, "due_whatever_its_input", spied)
    retried = MemoryBackend(script())
    assert not build(tmp_path / "run", retried, config)["failed"]
    assert ("grade", 0) in deferred and ("grade", 1) in deferred
    assert tables(tmp_path / "run")["sft"].equals(tables(tmp_path / "clean")["sft"])
    for name, frame in stage_tables(tmp_path / "clean").items():
        assert frame.equals(stage_tables(tmp_path / "run")[name]), name


@pytest.mark.parametrize("chunked", [False, True], ids=["parts-of-one-chunk", "parts-of-two-chunks"])
@pytest.mark.parametrize("share", [0.5, 0.9])
def test_a_kill_with_chunks_in_flight_resumes_without_paying_twice(tmp_path: Path, share: float, chunked: bool,
                                                                   request: pytest.FixtureRequest) -> None:
    config = CONFIG
    if chunked:  # a kill while a part's chunks of several stages are computed, none of it written yet
        request.getfixturevalue("chunks_of_two")
        config = CHUNKED
    whole = MemoryBackend(script())
    build(tmp_path / "whole", whole, config)
    before_verify = sum(1 for r in whole.sent if not r.continue_final)
    # half way (parts of sample, propose and verify in flight) and late in verify
    killed = MemoryBackend(script(), kill_after=round(len(whole.sent) * share))
    with pytest.raises(Killed):
        build(tmp_path / "run", killed, config)
    run = RunDir(tmp_path / "run")
    parts = run.part_count("problems")
    written = [i for i in range(parts) if run.part_marker("verify", i) is not None]
    run.close()
    assert len(written) < parts  # the last part was not claimed
    for index in written:
        assert (tmp_path / "run" / "verify" / f"part-{index:05d}.parquet").is_file()
    rerun = MemoryBackend(script())
    build(tmp_path / "run", rerun, config)
    # only what had not been answered is sent again: the answered calls are in the cache, the parts on disk
    assert len(rerun.sent) == len(whole.sent) - len(killed.sent) and before_verify < len(whole.sent)
    assert tables(tmp_path / "run")["sft"].equals(tables(tmp_path / "whole")["sft"])


def test_a_kill_between_a_corrected_input_part_and_its_marker_is_followed_on_the_rerun(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the answer of example-01 corrected from 12 to 13 (the same size on disk), and the run killed after the
    # problems part is written but before its marker: the rerun must still regrade against 13
    problems = tmp_path / "problems.jsonl"
    lines = EXAMPLE_PROBLEMS.read_text().splitlines(keepends=True)
    problems.write_text("".join(lines))
    config = RunConfig(**(CONFIG.to_dict() | {"problems": str(problems)}))
    build(tmp_path / "run", MemoryBackend(script()), config)
    assert '"answer": "12"' in lines[0]
    problems.write_text("".join([lines[0].replace('"answer": "12"', '"answer": "13"')] + lines[1:]))
    finish_part = RunDir.finish_part

    def killed_before_the_problems_marker(run: RunDir, table: str, *args, **kwargs) -> None:
        if table == "problems":
            raise Killed("killed between the problems part and its marker")
        finish_part(run, table, *args, **kwargs)

    monkeypatch.setattr(RunDir, "finish_part", killed_before_the_problems_marker)
    with pytest.raises(Killed):
        build(tmp_path / "run", MemoryBackend(script()), config)
    monkeypatch.setattr(RunDir, "finish_part", finish_part)
    build(tmp_path / "run", MemoryBackend(script()), config)
    build(tmp_path / "fresh", MemoryBackend(script()), config)
    assert pl.read_parquet(tmp_path / "run" / "problems")["answer"][0] == "13"
    for name, frame in stage_tables(tmp_path / "fresh").items():  # (the run's attempts came from its cache)
        assert frame.drop("cached", strict=False).equals(stage_tables(tmp_path / "run")[name].drop(
            "cached", strict=False)), name


def test_a_run_made_with_other_parts_names_the_batch_size_that_goes_on_with_it(tmp_path: Path) -> None:
    build(tmp_path / "run", MemoryBackend(script()))  # parts of 2
    with pytest.raises(StageConfigChanged, match=r"parts hold 2 problems each, not 4: pass --batch-size 2"):
        build(tmp_path / "run", MemoryBackend(script()), CHUNKED)
    again = MemoryBackend(script())
    build(tmp_path / "run", again)
    assert again.sent == []


def test_a_changed_setting_is_refused_and_recomputed_with_force(tmp_path: Path) -> None:
    build(tmp_path / "run", MemoryBackend(script()))
    changed = RunConfig(**(CONFIG.to_dict() | {"continuations": 6, "conditions": ("intervention",)}))
    with pytest.raises(StageConfigChanged, match="verify"):
        build(tmp_path / "run", MemoryBackend(script()), changed)
    backend = MemoryBackend(script())
    summary = build(tmp_path / "run", backend, changed, force=True)
    assert backend.sent and all(r.continue_final for r in backend.sent)  # only verify ran again
    verified = pl.read_parquet(tmp_path / "run" / "verify")
    assert set(verified["continuations"].to_list()) == {6} and summary["kept"] > 0


def test_failed_calls_are_rows_that_the_next_run_retries(tmp_path: Path) -> None:
    clean = MemoryBackend(script())
    build(tmp_path / "clean", clean)
    flaky = MemoryBackend(script(), fail=lambda r: "http_503: overloaded" if r.continue_final else None)
    summary = build(tmp_path / "run", flaky)
    assert summary["failed"].get("verify") and summary["kept"] == 0  # said, not silently empty
    retried = MemoryBackend(script())
    assert not build(tmp_path / "run", retried)["failed"]
    assert retried.sent and all(r.continue_final for r in retried.sent)  # only the failed calls
    assert tables(tmp_path / "run")["sft"].equals(tables(tmp_path / "clean")["sft"])


def test_a_stage_runs_alone_on_the_in_memory_backend(tmp_path: Path) -> None:
    from intgen.driver import Engine

    build(tmp_path / "run", MemoryBackend(script()))
    run = RunDir(tmp_path / "run")
    try:
        entry = run_named_stage(run, CONFIG, "propose", Engine(MemoryBackend(script())), progress=False)
    finally:
        run.close()
    assert entry["accepted"] > 0 and entry["failed_rows"] == {}


def test_a_setting_marked_as_changing_output_changes_a_stage_fingerprint_and_no_other_does(tmp_path: Path) -> None:
    """The `output` mark on each stage setting is true: changing the value changes the fingerprint of a stage
    (so a finished stage refuses it without --force), and a setting not marked changes none."""
    import dataclasses

    from intgen.config import FIELDS, SECTIONS
    from intgen.plan import PIPELINE
    from intgen.resources import load_prompt

    def fingerprints(config: RunConfig) -> dict[str, dict]:
        return {step.name: step.stage.fingerprint(step.settings(config)) for step in PIPELINE}

    def other(name: str, value: object) -> object:
        spec = FIELDS[name]
        if spec.metadata["choices"] is not None and not isinstance(value, tuple):
            return next(c.value for c in spec.metadata["choices"] if c.value != value)
        if name == "system_prompt":
            return "Answer briefly."
        if name.endswith("_prompt"):  # a prompt of one's own: the shipped one, one line longer
            shipped = {"solve_prompt": "solve.md", "reference_prompt": "propose_reference.md",
                       "critique_prompt": "propose_critique.md"}[name]
            path = tmp_path / shipped
            path.write_text(load_prompt(shipped).text + "\nBe careful.\n", encoding="utf-8")
            return str(path)
        if isinstance(value, bool):
            return not value
        if isinstance(value, tuple):
            return (*value, "problem-only")
        if isinstance(value, int):
            return value + 1
        if isinstance(value, float):
            return value / 2 if value else 0.5
        raise AssertionError(f"no other value for {name}={value!r}")

    # a setting valid only with others: compared with a base that has them
    lift_rule = {"conditions": ("intervention", "original-step"), "baselines": "every", "keep_rule": "lift"}
    needs = {"keep_rule": {"conditions": ("intervention", "original-step"), "baselines": "every"},
             "top_up": lift_rule, "top_up_below": lift_rule | {"top_up": 8}}
    checked = 0
    for section in ("sample", "grade", "propose", "verify"):
        for spec in dataclasses.fields(SECTIONS[section]):
            start = CONFIG.to_dict() | needs.get(spec.name, {})
            value = getattr(CONFIG, spec.name)  # the needs above never include the setting itself
            changed = RunConfig(**(start | {spec.name: other(spec.name, value)}))
            differs = fingerprints(changed) != fingerprints(RunConfig(**start))
            assert differs == spec.metadata["output"], (spec.name, spec.metadata["output"])
            checked += 1
    assert checked >= 25


def test_prompt_tokens_from_the_servers_prefix_cache_are_counted_per_stage_and_shown(tmp_path: Path) -> None:
    import json

    build(tmp_path / "run", MemoryBackend(script()))
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    for stage in ("sample", "propose", "verify"):
        calls = manifest["stages"][stage]["calls"]  # the script says half of each prompt came from its cache
        assert calls["prompt_tokens"] // 2 - calls["requests_sent"] <= calls["cached_prompt_tokens"] \
            <= calls["prompt_tokens"] // 2 and calls["cached_prompt_tokens"] > 0, stage
    card = (tmp_path / "run" / "dataset" / "README.md").read_text()
    sample = manifest["stages"]["sample"]["calls"]
    row = f"| sample | {sample['prompt_tokens']} | {sample['completion_tokens']} | {sample['cached_prompt_tokens']} |"
    assert row in card and "prefix cache" in card
    # a rerun answers from intgen's own cache: nothing is sent, nothing more is counted
    build(tmp_path / "run", MemoryBackend(script()))
    again = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["sample"]["calls"]
    assert again["cached_prompt_tokens"] == sample["cached_prompt_tokens"]


def test_the_lift_rule_rekeeps_from_the_cache_and_keeps_only_what_beats_its_own_baseline(tmp_path: Path) -> None:
    from intgen.lift import fisher_greater

    every = CONFIG.to_dict() | {"baselines": "every", "verify_all_proposals": True}
    half = Script(answers_of(EXAMPLE_PROBLEMS), seed=TEST_SEED, fix_rate=0.5)  # 0 to 4 of M=4 reach the answer
    paper = build(tmp_path / "run", MemoryBackend(half), RunConfig(**every))
    kept_by_paper = set(tables(tmp_path / "run")["sft"]["proposal_id"])
    again = MemoryBackend(Script(answers_of(EXAMPLE_PROBLEMS), seed=TEST_SEED, fix_rate=0.5))
    lifted = build(tmp_path / "run", again, RunConfig(**every | {"keep_rule": "lift", "alpha": 0.2}), force=True)
    assert again.sent == []  # the rule changes which rows are kept, never which continuations are paid for
    interventions = tables(tmp_path / "run")["interventions"].filter(pl.col("verified"))
    assert interventions.height > 1 and interventions["baseline_continuations"].null_count() == 0
    for row in interventions.iter_rows(named=True):
        p = fisher_greater(row["successes"], row["continuations"], row["baseline_successes"],
                           row["baseline_continuations"])
        assert row["lift_p"] == pytest.approx(p)
        assert row["lift"] == pytest.approx(row["success_rate"] - row["baseline_successes"] / 4)
        assert row["kept"] is (row["successes"] >= 1 and p <= 0.2)
    kept_by_lift = set(tables(tmp_path / "run")["sft"]["proposal_id"])
    assert kept_by_lift < kept_by_paper and lifted["kept"] == len(kept_by_lift) < paper["kept"]
    found = set(interventions["successes"])  # the premise: some kept by both (3/4: p 0.071), some by paper only
    assert max(found) >= 3 and {1, 2} & found
    card = (tmp_path / "run" / "dataset" / "README.md").read_text()
    assert "one-sided Fisher exact p-value of its successes against its own original-step baseline" in card
    assert f"Measured for {interventions.height} verified intervention(s)" in card


def test_top_up_retests_only_borderline_verdicts_pays_once_and_resumes_after_a_kill(tmp_path: Path) -> None:
    from intgen.lift import fisher_greater, two_stage_kept

    lifted = CONFIG.to_dict() | {"baselines": "every", "verify_all_proposals": True, "keep_rule": "lift"}
    config = RunConfig(**lifted | {"top_up": 8})

    def half() -> MemoryBackend:  # 0 to 4 of M=4 reach the answer; the original step never does
        return MemoryBackend(Script(answers_of(EXAMPLE_PROBLEMS), seed=TEST_SEED, fix_rate=0.5))

    whole = half()
    build(tmp_path / "whole", whole, config)
    top_ups = [r for r in whole.sent if (r.draw or "").endswith("/top-up")]
    assert top_ups and all(r.n == 8 for r in top_ups)
    rows = tables(tmp_path / "whole")["interventions"].filter(pl.col("verified"))
    due = rows.filter(pl.col("top_up_continuations").is_not_null())
    # borderline: 1-3 of 4 against 0 of 4 (p 0.5, 0.21, 0.071); 4 of 4 (p 0.014) is kept at the first look
    assert set(due["successes"]) <= {1, 2, 3} and due.height > 0
    assert rows.filter(pl.col("top_up_continuations").is_null() & pl.col("successes").is_in([1, 2, 3])).height == 0
    prefixes = {(r["attempt_id"], r["error_step"], r["intervention"]) for r in due.iter_rows(named=True)}
    # each distinct intervention's 8 more, each baseline's once (two proposals alike share their calls)
    assert len(top_ups) == len(prefixes) + len({p[:2] for p in prefixes}) == len(set(top_ups))
    for row in rows.iter_rows(named=True):
        first = fisher_greater(row["successes"], 4, row["baseline_successes"], 4)
        if row["top_up_continuations"] is None:
            assert row["lift_p"] == pytest.approx(first) and row["kept"] is (first <= 0.025)
            continue
        assert (row["top_up_continuations"], row["baseline_top_up_continuations"]) == (8, 8)
        pooled = fisher_greater(row["successes"] + row["top_up_successes"], 12,
                                row["baseline_successes"] + row["baseline_top_up_successes"], 12)
        assert row["lift_p"] == pytest.approx(pooled) and row["kept"] is two_stage_kept(first, pooled, 0.05)
        assert row["continuations"] == 4  # Table 1's budget stays M
    continuations = pl.read_parquet(tmp_path / "whole" / "continuations")
    extra = continuations.filter(pl.col("top_up"))
    assert extra.height == 8 * (due.height + len({p[:2] for p in prefixes})) and not extra["matched"].any()
    assert extra["continuation_id"].str.extract(r"/c(\d+)$").cast(int).min() == 4
    # the step pairs' counts are the continuations that decided them: lift_p follows from the row itself
    pairs = pl.read_parquet(export_file(tmp_path / "whole" / "dataset", "preference"))
    assert pairs.height and (pairs["chosen_continuations"] == 12).any()
    for pair in pairs.iter_rows(named=True):
        assert pair["lift_p"] == pytest.approx(fisher_greater(
            pair["chosen_successes"], pair["chosen_continuations"], pair["rejected_successes"],
            pair["rejected_continuations"]))
    funnel = __import__("json").loads((tmp_path / "whole" / "analysis.json").read_text())["funnel"]
    first = continuations.filter((pl.col("condition") == "intervention") & ~pl.col("top_up"))
    assert funnel["intervention_continuations"] == first.height and funnel["top_up_continuations"] == extra.height
    assert funnel["lift"]["threshold"] == 0.025 and funnel["lift"]["topped_up"] == due.height
    assert funnel["lift"]["p_at_most_threshold"] == rows.filter(pl.col("lift_p") <= 0.025).height
    plain = half()
    build(tmp_path / "plain", plain, RunConfig(**lifted))
    analysis = {name: __import__("json").loads((tmp_path / name / "analysis.json").read_text())["table1"]
                for name in ("whole", "plain")}
    assert analysis["whole"] == analysis["plain"]  # Table 1: the first M of each arm, at equal budgets

    killed = half()
    killed.kill_after = len(whole.sent) - len(top_ups) // 2  # late: within the last parts' top-ups
    with pytest.raises(Killed):
        build(tmp_path / "run", killed, config)
    rerun = half()
    build(tmp_path / "run", rerun, config)
    assert len(rerun.sent) == len(whole.sent) - len(killed.sent)  # every continuation paid for once
    again = half()
    build(tmp_path / "run", again, config)
    assert again.sent == []
    for name in ("interventions", "sft"):
        assert tables(tmp_path / "run")[name].equals(tables(tmp_path / "whole")[name]), name


def test_the_preference_and_prm_configs_load_and_follow_their_definitions(tmp_path: Path) -> None:
    import datasets

    from intgen.steps import steps_at

    every = CONFIG.to_dict() | {"baselines": "every", "verify_all_proposals": True}
    build(tmp_path / "run", MemoryBackend(Script(answers_of(EXAMPLE_PROBLEMS), seed=TEST_SEED, fix_rate=0.5)),
          RunConfig(**every))
    out = tmp_path / "run" / "dataset"
    interventions = tables(tmp_path / "run")["interventions"]
    attempts = dict(pl.read_parquet(tmp_path / "run" / "samples").select("attempt_id", "text").iter_rows())
    by_id = {row["proposal_id"]: row for row in interventions.iter_rows(named=True)}
    pairs = datasets.load_dataset(str(out), "preference", split="train")
    expected = [p for p, row in by_id.items() if row["kept"] and row["lift"] is not None and row["lift"] > 0]
    assert sorted(pairs["proposal_id"]) == sorted(expected) and len(expected) > 0
    for pair in pairs:
        row = by_id[pair["proposal_id"]]
        steps = steps_at(attempts[row["attempt_id"]], row["step_ends"])
        before, wrong = "".join(steps[: row["error_step"] - 1]), steps[row["error_step"] - 1].rstrip()
        assert [m["role"] for m in pair["prompt"]][-2:] == ["user", "assistant"]
        assert pair["prompt"][-1]["content"] == before == pair["initial_reason_steps"]
        assert pair["chosen"] == [{"role": "assistant", "content": row["intervention"].strip()}]
        assert pair["rejected"] == [{"role": "assistant", "content": wrong}] and wrong and not wrong[-1].isspace()
        assert pair["full_chosen"] == before + row["intervention"].strip() and pair["full_rejected"] == before + wrong
        assert (pair["chosen_successes"], pair["rejected_successes"]) == (row["successes"], row["baseline_successes"])
        assert pair["chosen_success_rate"] == row["success_rate"]
        assert pair["rejected_success_rate"] == row["baseline_successes"] / row["baseline_continuations"]
        assert pair["lift"] > 0 and pair["lift_p"] == row["lift_p"]
    prm = datasets.load_dataset(str(out), "prm", split="train")
    kept_attempts = {row["attempt_id"] for row in by_id.values() if row["kept"]}
    assert sorted(prm["attempt_id"]) == sorted(kept_attempts)
    for example in prm:
        row = by_id[example["proposal_id"]]
        steps = steps_at(attempts[row["attempt_id"]], row["step_ends"])
        assert example["completions"] == steps[: row["error_step"]]  # in their order, nothing after the error
        assert example["labels"] == [True] * (row["error_step"] - 1) + [False]
    card = (out / "README.md").read_text()
    assert f"| `preference` | {len(pairs)} |" in card and f"| `prm` | {len(prm)} |" in card


def test_a_run_whose_verify_parts_predate_the_top_up_columns_still_exports(tmp_path: Path) -> None:
    """Parts written by an earlier intgen (before `--top-up`'s columns existed) are kept when the settings did not
    change; every reader fills the columns they lack with nulls instead of failing on them."""
    import json

    from intgen.rundir import file_digest

    build(tmp_path / "run", MemoryBackend(script()))
    before = tables(tmp_path / "run")
    run = RunDir(tmp_path / "run")
    new = {"verify": ["top_up_successes", "top_up_continuations", "baseline_top_up_successes",
                      "baseline_top_up_continuations"], "continuations": ["top_up"]}
    for table, columns in new.items():
        for index in range(run.part_count(table)):
            path = run.part_path(table, index)
            pl.read_parquet(path).drop(columns).write_parquet(path)
            marker = run.marker_path("verify", index)
            record = json.loads(marker.read_text())
            record["files"][table] = {"bytes": path.stat().st_size, "sha256": file_digest(path)}
            marker.write_text(json.dumps(record, sort_keys=True))
    run.close()
    again = MemoryBackend(script())
    build(tmp_path / "run", again)
    assert again.sent == []  # the old parts are kept: nothing recomputed
    assert "top_up" not in pl.read_parquet(RunDir(tmp_path / "run").part_path("continuations", 0)).columns
    after = tables(tmp_path / "run")
    for name in after:
        assert after[name].equals(before[name]), name


def test_chained_asks_finish_every_chain_before_a_failure_is_raised(tmp_path: Path) -> None:
    """A chunk's chains are coroutines side by side: a second turn goes out as soon as its own first turn is
    answered, and one chain's failure is raised only once the others are done (their calls are paid for)."""
    import asyncio

    from intgen.backends.base import Completion, Sampling, make_request
    from intgen.cache import CallCache
    from intgen.calls import CallStats
    from intgen.parts import Answerer, Grader
    from intgen.stages import Chained
    from intgen.window import EventLoop, Window

    sent: list[str] = []

    class Streaming:
        kind, model, supports_continuation, reply_settings, window = "stub", "stub", False, {}, 8

        async def answer(self, request):  # noqa: ANN001, ANN202
            text = request.messages[-1][1]
            sent.append(text)
            await asyncio.sleep(0.2 if text == "slow" else 0)
            if text == "bad second":
                raise ValueError("a bad request")
            return [Completion(text, "stop")]

    def ask(text: str) -> object:
        return make_request([{"role": "user", "content": text}], Sampling())

    chains = Chained([ask("bad"), ask("slow")], lambda k, first: [ask(first[0].text + " second")])
    events, cache = EventLoop("test-loop"), CallCache(tmp_path / "cache.sqlite")
    window = Window(Streaming(), loop=events.loop)
    execute = Answerer(None, window.lane((0,)), Grader(), CallStats(), cache=cache)  # type: ignore[arg-type]
    try:
        with pytest.raises(ValueError, match="a bad request"):
            asyncio.run_coroutine_threadsafe(execute(chains), events.loop).result(timeout=10)
        # the fast chain's second turn went out before the slow chain's first was answered; the slow chain ran on
        assert sent == ["bad", "slow", "bad second", "slow second"]
        assert execute.stats.requests_sent == 4
    finally:
        window.close()
        events.close()
        cache.close()
