"""The pipeline end to end: invariants, resume after SIGKILL, config handling.

Each invariant is checked on two runs: one against the scripted server (tests/scripted.py), whose path through
the pipeline is guaranteed (attempts wrong at a known step, proposals accepted, interventions kept, all four
verify conditions), and one against the real llama.cpp server with SmolLM2, where only what holds whatever the
model writes is asserted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import polars as pl
import pytest
from typer.testing import CliRunner

from intgen.cli import app
from intgen.dataset.export import export_file
from intgen.steps import join_steps, split_steps

from conftest import TEST_SEED
from report_checks import check_dataset_report
from scripted import ScriptedServer, answers_of
from servers import Proxy, smollm2_gguf

runner = CliRunner()
pytestmark = pytest.mark.slow
CONDITIONS = ["--condition", "intervention", "--condition", "original-step", "--condition", "resample-step",
              "--condition", "problem-only"]


def pipeline_args(problems: Path, run_dir: Path, url: str, model: str = "smollm2") -> list[str]:
    """Raw completions with SmolLM2's chat template for the continuations (llama.cpp has no continue_final_message;
    the scripted server reads the rendered prompt the same way)."""
    return [
        "build-dataset", "--problems", str(problems), "--run-dir", str(run_dir),
        "--backend", "openai", "--model", model, "--base-url", url,
        "--structured-output", "json_object", "--continuation", "completions", "--chat-template", str(smollm2_gguf()),
        "--concurrency", "4", "--samples", "2", "--max-tokens", "256", "--proposals", "3",
        "--propose-max-tokens", "200", "--continuations", "2", "--verify-max-tokens", "120", "--min-success", "0",
        "--lenient-answers", "--seed", str(TEST_SEED), "--no-progress", *CONDITIONS,
    ]


def read_config(run_dir: Path, name: str) -> pl.DataFrame:
    return pl.read_parquet(export_file(run_dir / "dataset", name))


def build(problems: Path, run_dir: Path, upstream: str, model: str) -> tuple[Path, int, str, str]:
    proxy = Proxy(upstream)
    try:
        result = runner.invoke(app, pipeline_args(problems, run_dir, proxy.url, model))
        assert result.exit_code == 0, result.output
        return run_dir, len(proxy.forwarded), upstream, model
    finally:
        proxy.stop()


@pytest.fixture(scope="module")
def finished_run(scripted, gsm8k: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str, str]:
    """(run folder, requests sent, server, model) of a run on the scripted server."""
    run = build(gsm8k, tmp_path_factory.mktemp("run") / "scripted", scripted.url, "scripted")
    assert read_config(run[0], "sft").height == 8, "the premise: every attempt's intervention is kept"
    return run


@pytest.fixture(scope="module", params=["scripted", "smollm2"])
def any_run(request: pytest.FixtureRequest, gsm8k: Path, tmp_path_factory: pytest.TempPathFactory):
    """The scripted run, then a run on the real llama.cpp server: for what holds whatever the model writes."""
    if request.param == "scripted":
        return request.getfixturevalue("finished_run")
    llama_server = request.getfixturevalue("llama_server")
    return build(gsm8k, tmp_path_factory.mktemp("run") / "smollm2", llama_server.url, "smollm2")


def test_sft_rows_are_the_attempts_own_prefix_plus_the_intervention(finished_run: tuple[Path, int, str, str]) -> None:
    run_dir = finished_run[0]
    sft = read_config(run_dir, "sft")
    assert sft.height > 0
    attempts = dict(pl.read_parquet(run_dir / "samples").select("attempt_id", "text").iter_rows())
    for row in sft.iter_rows(named=True):
        steps = split_steps(attempts[row["attempt_id"]])
        t = row["error_step"]
        completion = row["completion"][0]["content"]
        assert row["completion"][0]["role"] == "assistant" and row["prompt"][-1]["role"] == "user"
        assert completion.startswith(join_steps(steps[: t - 1]))  # the attempt's own steps before the error
        assert completion.endswith(row["intervention"])
        assert completion == join_steps(steps[: t - 1]) + row["intervention"]  # and nothing after: no suffix


def test_ids_chain_and_manifest_counts_match_the_tables(any_run: tuple[Path, int, str, str]) -> None:
    run_dir = any_run[0]
    problems = set(pl.read_parquet(run_dir / "problems")["problem_id"])
    samples = pl.read_parquet(run_dir / "samples")
    proposals = pl.read_parquet(run_dir / "proposals")
    every_continuation = pl.read_parquet(run_dir / "continuations")
    continuations = every_continuation.filter(pl.col("condition") == "intervention")
    baselines = every_continuation.filter(pl.col("condition") != "intervention")
    assert all(a.rsplit("/a", 1)[0] in problems for a in samples["attempt_id"])
    attempt_ids = set(samples["attempt_id"])
    assert all(p.rsplit("/p", 1)[0] in attempt_ids for p in proposals["proposal_id"])
    proposal_ids = set(proposals["proposal_id"])
    assert all(c.rsplit("/c", 1)[0] in proposal_ids for c in continuations["continuation_id"])
    assert all(c.startswith(p) for c, p in baselines.select("continuation_id", "problem_id").iter_rows())

    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
    graded = pl.read_parquet(run_dir / "graded")
    assert manifest["sample"]["rows"] == samples.height == 8
    assert manifest["grade"]["incorrect"] == graded.filter(pl.col("correct") == False).height  # noqa: E712
    # every attempt not graded correct is critiqued (the release's set), but one with no text (a failed call)
    critiqued = graded.filter(pl.col("correct").ne_missing(True)
                              & ~pl.col("grade_reason").is_in(["sample_error", "prompt_too_long"])).height
    assert manifest["propose"]["rows"] == proposals.height == 3 * critiqued
    assert manifest["propose"]["accepted"] == proposals["accepted"].sum()
    assert sum(manifest["propose"]["rejected_by_reason"].values()) == proposals.height - proposals["accepted"].sum()
    # one proposal verified per attempt: the first accepted one
    verified_attempts = proposals.filter("accepted")["attempt_id"].n_unique()
    verify = pl.read_parquet(run_dir / "verify")
    assert manifest["verify"]["rows"] == verify.height and manifest["verify"]["verified"] == verified_attempts
    assert manifest["verify"]["not_verified"] == proposals["accepted"].sum() - verified_attempts
    first = proposals.filter("accepted").sort("proposal_index").group_by("attempt_id").first()["proposal_id"]
    assert set(verify.filter(pl.col("condition") == "intervention")["proposal_id"]) == set(first)
    assert manifest["verify"]["continuation_rows"] == every_continuation.height
    assert continuations.height == 2 * verified_attempts
    assert manifest["verify"]["kept"] == read_config(run_dir, "sft").height
    # Table 1 (one matched unit per problem, M continuations each) and the funnel: manifest, analysis.json, card
    analysis = json.loads((run_dir / "analysis.json").read_text())
    units = analysis["table1"].pop("units")
    assert analysis["table1"] == manifest["verify"]["table1"]
    matched = every_continuation.filter("matched")
    assert len(units) == matched["problem_id"].n_unique() == pl.read_parquet(run_dir / "verify").filter(
        "matched")["problem_id"].n_unique()
    assert not baselines.filter(~pl.col("matched")).height  # the baselines are run for the matched units only
    for condition in ("intervention", "original-step", "resample-step", "problem-only"):  # equal budgets
        counted = analysis["table1"]["conditions"][condition]["continuations"] if units else 0
        assert counted == matched.filter(pl.col("condition") == condition).height == 2 * len(units), condition
    funnel = analysis["funnel"]
    assert funnel["intervention_continuations"] == continuations.height
    assert funnel["intervention_correct"] == continuations["correct"].sum()
    assert funnel["problems_with_kept"] == read_config(run_dir, "sft")["problem_id"].n_unique()
    assert funnel["problems_without_reference"] == 0
    card = (run_dir / "dataset" / "README.md").read_text()
    assert "## Intervention vs. the paper's baselines (Table 1)" in card
    assert ("| intervention |" in card) == bool(units)


def test_table1_of_the_scripted_run_is_one_unit_per_problem(finished_run: tuple[Path, int, str, str]) -> None:
    # the scripted server's interventions always lead to the answer and its baselines never do
    analysis = json.loads((finished_run[0] / "analysis.json").read_text())["table1"]
    assert len(analysis["units"]) == 4 and not any(analysis["left_out"].values())
    accuracy = {name: condition["mean_accuracy"] for name, condition in analysis["conditions"].items()}
    assert accuracy == {"intervention": 1.0, "original-step": 0.0, "resample-step": 0.0, "problem-only": 0.0}


def test_dataset_loads_with_datasets(any_run: tuple[Path, int, str, str]) -> None:
    run_dir = any_run[0]
    card = (run_dir / "dataset" / "README.md").read_text()
    for name in ("sft", "rl", "interventions", "samples"):
        rows = read_config(run_dir, name).height
        if rows == 0:  # an empty config (SmolLM2 may keep nothing) is named as such, and not offered to `datasets`
            [empty] = [line for line in card.splitlines() if line.startswith("**Empty:**")]
            assert f"`{name}`" in empty and f"config_name: {name}" not in card
            continue
        assert datasets.load_dataset(str(run_dir / "dataset"), name, split="train").num_rows == rows
    assert datasets.load_dataset(str(run_dir / "dataset"), "rl", split="train").num_rows == 4


def test_the_report_of_the_run_in_chromium(finished_run: tuple[Path, int, str, str], browser) -> None:
    # build-dataset wrote it; every proposal of the interventions table is listed, one is opened by its link
    run_dir = finished_run[0]
    assert (run_dir / "report.html").is_file()
    seen = check_dataset_report(browser, run_dir, read_config(run_dir, "interventions"), screenshot_name="pipeline")
    assert seen["page"].locator("#table1 tbody tr").count() >= 1
    shown = seen["page"].locator("#distributions").inner_text()
    assert "Kept: at least " in shown and "correct continuation(s) (the paper's rule; --keep-rule paper)" in shown
    # the matched units ran the original step: their lift is measured and drawn
    assert "Lift over the intervention's own original-step baseline" in shown and "Fisher exact p" in shown


def test_rerun_sends_nothing(any_run: tuple[Path, int, str, str], gsm8k: Path) -> None:
    run_dir, sent, upstream, model = any_run
    assert sent > 0
    proxy = Proxy(upstream)
    try:
        result = runner.invoke(app, pipeline_args(gsm8k, run_dir, proxy.url, model))
        assert result.exit_code == 0, result.output
        assert proxy.forwarded == []
    finally:
        proxy.stop()


def test_changing_an_earlier_stage_setting_is_refused(finished_run: tuple[Path, int, str, str], gsm8k: Path) -> None:
    run_dir, model = finished_run[0], finished_run[3]
    args = pipeline_args(gsm8k, run_dir, "http://127.0.0.1:9/v1", model)
    args[args.index("--samples") + 1] = "3"
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "stage 'sample' was computed with other settings" in result.output and "--force" in result.output


def test_config_file_values_are_overridden_by_flags(gsm8k: Path, tmp_path: Path) -> None:
    from intgen.config import read_config_file, resolve

    config = tmp_path / "run.toml"
    config.write_text('samples = 8\nproposals = 2\nmin-success = 3\nconditions = ["intervention", "problem-only"]\n')
    settings = resolve({"samples": 5}, read_config_file(config))
    assert (settings.samples, settings.proposals, settings.min_success) == (5, 2, 3)
    assert settings.conditions == ("intervention", "problem-only")
    bad = tmp_path / "bad.toml"
    bad.write_text("sample = 3\n")
    result = runner.invoke(app, ["build-dataset", "--config", str(bad), "--run-dir", str(tmp_path / "r")])
    assert result.exit_code == 2 and "unknown setting(s) sample" in result.output


def test_sigkill_late_in_verify_then_resume(gsm8k: Path, tmp_path: Path) -> None:
    # The scripted server answers a request the same way whatever came before it (llama.cpp's server reuses the
    # previous request's KV cache, so the same seeded request can sample differently after another one), and
    # holds each reply 50 ms, so the kill lands with verify well under way. One request at a time, in order.
    def args(run_dir: Path, url: str) -> list[str]:
        small = pipeline_args(gsm8k, run_dir, url, "scripted") + ["--concurrency", "1"]
        for option, value in (("--proposals", "2"), ("--continuations", "4")):
            small[small.index(option) + 1] = value
        return small

    server = ScriptedServer(answers_of(gsm8k), seed=TEST_SEED, delay=0.05)
    proxy = Proxy(server.url)
    try:
        reference_dir = tmp_path / "reference"
        result = runner.invoke(app, args(reference_dir, proxy.url))
        assert result.exit_code == 0, result.output
        reference_requests, verify_requests = len(proxy.forwarded), server.kinds["continuation"]
        assert verify_requests >= 8  # the premise: 8 interventions and 8 baselines' prefixes to continue

        run_dir = tmp_path / "killed"
        process = subprocess.Popen([sys.executable, "-m", "intgen", *args(run_dir, proxy.url)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 300
        while server.kinds["continuation"] < verify_requests + verify_requests // 2 + 1 and process.poll() is None:
            assert time.monotonic() < deadline, "verify did not get under way"
            time.sleep(0.01)
        assert process.poll() is None, "the run finished before it could be killed"
        os.killpg(process.pid, signal.SIGKILL)  # late in verify: more than half of its calls answered
        process.wait()
        manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
        assert manifest["verify"]["status"] == "running"
        result = runner.invoke(app, args(run_dir, proxy.url))
        assert result.exit_code == 0, result.output
        repeated = len(proxy.forwarded) - 2 * reference_requests
    finally:
        proxy.stop()
        server.stop()
    assert 0 <= repeated <= 1, repeated  # at most the request in flight at the kill (--concurrency 1)
    assert_same_dataset(run_dir, reference_dir)


def assert_same_dataset(run_dir: Path, reference_dir: Path) -> None:
    for name in ("interventions", "sft"):
        resumed, reference = read_config(run_dir, name), read_config(reference_dir, name)
        assert resumed.height > 0 and resumed.equals(reference), (name, resumed.height, reference.height)


def test_sigkill_with_parts_of_two_stages_in_flight_then_resume_equals_a_sequential_run(
        gsm8k: Path, tmp_path: Path) -> None:
    # Parts of two problems each and a window of 64 samples: while some parts' continuations (verify) are held by
    # the server, other parts' attempts or proposals are too. The kill lands then; the rerun repeats at most what
    # was in flight, and the dataset is the one a strictly sequential schedule (one part, one request) makes.
    def args(run_dir: Path, url: str, *schedule: str) -> list[str]:
        return pipeline_args(gsm8k, run_dir, url, "scripted") + ["--batch-size", "2", *schedule]

    server = ScriptedServer(answers_of(gsm8k), seed=TEST_SEED, delay=0.02)
    proxy = Proxy(server.url)
    try:
        sequential = tmp_path / "sequential"
        result = runner.invoke(app, args(sequential, proxy.url, "--concurrency", "1", "--chunks-in-flight", "1"))
        assert result.exit_code == 0, result.output
        assert proxy.max_in_flight == 1
        reference_requests = len(proxy.forwarded)

        server.delay = 0.3
        run_dir = tmp_path / "killed"
        process = subprocess.Popen([sys.executable, "-m", "intgen", *args(run_dir, proxy.url, "--concurrency", "64")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 300
        while not (server.in_flight["continuation"] and server.in_flight["chat"]) and process.poll() is None:
            assert time.monotonic() < deadline, "verify and an earlier stage were never in flight together"
            time.sleep(0.005)
        assert process.poll() is None, "the run finished before it could be killed"
        before = proxy.in_flight
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        in_flight = max(before, proxy.in_flight)
        manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
        assert manifest["verify"]["status"] == "running"
        marked = [m for m in (run_dir / "markers").rglob("part-*.json")]
        for marker in marked:  # a marker never claims a part that was not written whole
            for table, stat in json.loads(marker.read_text())["files"].items():
                assert (run_dir / table / marker.with_suffix(".parquet").name).stat().st_size == stat["bytes"]
        server.delay = 0.0
        rerun = runner.invoke(app, args(run_dir, proxy.url))
        assert rerun.exit_code == 0, rerun.output
        repeated = len(proxy.forwarded) - 2 * reference_requests
    finally:
        proxy.stop()
        server.stop()
    assert in_flight > 1 and 0 <= repeated <= in_flight, (repeated, in_flight)
    assert_same_dataset(run_dir, sequential)


def test_rl_config_loads_through_verls_own_dataset_and_scores_like_its_reward_manager(
    finished_run: tuple[Path, int, str, str], tmp_path: Path
) -> None:
    from transformers import AutoTokenizer
    from verl.utils.dataset import rl_dataset  # the test command installs verl (tests/requirements-nodeps.txt)

    from intgen.backends.local import default_gguf
    from intgen.rewards import compute_score

    run_dir = finished_run[0]
    gguf = default_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = {"prompt_key": "prompt", "max_prompt_length": 2048, "filter_overlong_prompts": True,
              "filter_overlong_prompts_workers": 1, "cache_dir": str(tmp_path / "verl")}
    dataset = rl_dataset.RLHFDataset(data_files=str(export_file(run_dir / "dataset", "rl")), tokenizer=tokenizer,
                                     config=config)
    rl = read_config(run_dir, "rl")
    assert len(dataset) == rl.height == 4
    for index in range(len(dataset)):
        item, row = dataset[index], rl.row(index, named=True)
        assert item["raw_prompt"] == row["prompt"] and item["prompt"][-1]["role"] == "user"
        assert item["reward_model"] == {"style": "rule", "ground_truth": row["answer"]}
        assert item["ability"] == "math" and item["data_source"] == row["source"]
        assert item["extra_info"]["index"] == item["index"] == index
        assert item["extra_info"]["problem_id"] == row["problem_id"]
        # verl's reward managers call the custom function with keywords (reward_loop/reward_manager/naive.py)
        right = compute_score(data_source=item["data_source"], solution_str=f"So it is \\boxed{{{row['answer']}}}.",
                              ground_truth=item["reward_model"]["ground_truth"], extra_info=item["extra_info"])
        wrong = compute_score(data_source=item["data_source"], solution_str="So it is \\boxed{-123456}.",
                              ground_truth=item["reward_model"]["ground_truth"], extra_info=item["extra_info"])
        assert (right, wrong) == (1.0, 0.0)
