from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from intgen import __version__
from intgen.cli import app
from intgen.config import EXAMPLE_PROBLEMS
from intgen.dataset.export import export_file

from conftest import TEST_SEED
from scripted import ScriptedServer, answers_of, backend_args

runner = CliRunner()


def test_help_and_version() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "build-dataset" in result.output and "problems" in result.output
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"intgen {__version__}"


def test_problems_command_reports_and_saves(tmp_path: Path) -> None:
    source = tmp_path / "p.jsonl"
    source.write_text(
        json.dumps({"problem": "What is 1+1?", "answer": "2"}) + "\n{broken\n"
        + json.dumps({"problem": "3?", "answer": "3"}) + "\n"
    )
    result = runner.invoke(app, ["problems", str(source)])
    assert result.exit_code == 2
    assert "p.jsonl:2: not valid JSON" in result.output
    out = tmp_path / "clean.parquet"
    result = runner.invoke(app, ["problems", str(source), "--skip-bad-rows", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "skipped p.jsonl:2" in result.output
    assert pl.read_parquet(out)["answer"].to_list() == ["2", "3"]


@pytest.mark.slow  # a real model (llama.cpp) or server
def test_build_dataset_on_the_bundled_examples_with_the_local_engine(tmp_path: Path) -> None:
    # The README's main command with its sizes cut down (the full demo is timed in the README).
    run_dir = tmp_path / "demo"
    args = ["build-dataset", "--run-dir", str(run_dir), "--limit", "3", "--samples", "2", "--max-tokens", "96",
            "--proposals", "1", "--propose-max-tokens", "160", "--continuations", "2", "--verify-max-tokens", "64",
            "--seed", str(TEST_SEED), "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "embedded demo" in result.output and "kept" in result.output
    assert f"report: {run_dir / 'report.html'}" in result.output and (run_dir / "report.html").stat().st_size > 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["problems"] is None and config["backend"] == "local" and config["lenient_answers"] is True
    for name in ("sft", "rl", "interventions", "samples"):
        assert export_file(run_dir / "dataset", name).is_file()
    assert pl.read_parquet(export_file(run_dir / "dataset", "samples")).height == 6
    card = (run_dir / "dataset/README.md").read_text()
    assert "configs:" in card
    # whether SmolLM2 gets an intervention kept differs from one CPU to another: the card says which it is
    kept = pl.read_parquet(export_file(run_dir / "dataset", "sft")).height
    assert ("config_name: sft" in card) == (kept > 0) and ("the sft config is empty" in result.output) == (kept == 0)


@pytest.mark.slow  # a real model (llama.cpp) or server
def test_an_empty_sft_config_is_said_not_broken(tmp_path: Path) -> None:
    # every continuation misses the answer: nothing is kept, and the card, the summary and `train sft` say so
    server = ScriptedServer(answers_of(EXAMPLE_PROBLEMS), fixes=False)
    run_dir = tmp_path / "run"
    try:
        result = runner.invoke(app, ["build-dataset", "--run-dir", str(run_dir), "--problems", str(EXAMPLE_PROBLEMS),
                                     "--limit", "2", *backend_args(server.url), "--no-progress", "--no-report"])
    finally:
        server.stop()
    assert result.exit_code == 0, result.output
    assert server.kinds["continuation"] > 0, "the premise: interventions were verified"
    card = (run_dir / "dataset/README.md").read_text()
    assert pl.read_parquet(export_file(run_dir / "dataset", "sft")).height == 0
    # nothing kept: the step-level configs built from kept interventions are empty too
    assert "config_name: sft" not in card
    assert "**Empty:** `sft`, `preference`, `prm` (0 rows; no intervention was kept)" in card
    assert "the sft config is empty" in result.output
    result = runner.invoke(app, ["train", "sft", "--dataset", str(run_dir / "dataset"), "--output-dir",
                                 str(tmp_path / "model")])
    assert result.exit_code == 2 and "the sft config is empty (no intervention was kept)" in result.output


@pytest.mark.slow  # a real model (llama.cpp) or server
def test_stage_commands_one_by_one(tmp_path: Path) -> None:
    from intgen.config import EXAMPLE_PROBLEMS

    run_dir = str(tmp_path / "stages")
    steps = [
        ["sample", "--problems", str(EXAMPLE_PROBLEMS), "--run-dir", run_dir, "--limit", "2", "--samples", "2",
         "--max-tokens", "80", "--seed", str(TEST_SEED), "--no-progress"],
        ["grade", "--run-dir", run_dir, "--lenient-answers", "--no-progress"],
        ["propose", "--run-dir", run_dir, "--proposals", "1", "--propose-max-tokens", "120",
         "--no-progress"],
        ["verify", "--run-dir", run_dir, "--continuations", "1", "--verify-max-tokens", "48", "--min-success", "0",
         "--condition", "intervention", "--condition", "problem-only", "--no-progress"],
        ["export", "--run-dir", run_dir],
    ]
    outputs = []
    for args in steps:
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args[0], result.output)
        outputs.append(result.output)
    assert "graded:" in outputs[1] and "proposals:" in outputs[2] and "kept:" in outputs[3]
    config = json.loads((tmp_path / "stages" / "config.json").read_text())
    assert config["lenient_answers"] is True and config["conditions"] == ["intervention", "problem-only"]
    verify = pl.read_parquet(tmp_path / "stages" / "verify")
    assert set(verify["condition"]) <= {"intervention", "problem-only"}
    assert export_file(tmp_path / "stages" / "dataset", "sft").is_file()
    result = runner.invoke(app, ["verify", "--run-dir", run_dir])  # the saved settings: a finished stage, no work
    assert result.exit_code == 0 and "kept:" in result.output
    result = runner.invoke(app, ["verify", "--run-dir", run_dir, "--continuations", "3"])
    assert result.exit_code == 2 and "stage 'verify' was computed with other settings" in result.output


@pytest.mark.slow  # a real model (llama.cpp) or server
def test_a_retried_upstream_failure_recomputes_the_stages_after_it(tmp_path: Path) -> None:
    from intgen.config import EXAMPLE_PROBLEMS
    from intgen.rundir import RunDir

    run_dir = tmp_path / "run"
    sample = ["sample", "--problems", str(EXAMPLE_PROBLEMS), "--run-dir", str(run_dir), "--limit", "2",
              "--samples", "1", "--max-tokens", "40", "--no-progress"]
    assert runner.invoke(app, sample).exit_code == 0
    assert runner.invoke(app, ["grade", "--run-dir", str(run_dir), "--no-progress"]).exit_code == 0
    # Pretend the first attempt's call had failed: the part now holds an error row, as after a dropped request.
    run = RunDir(run_dir)
    part = pl.read_parquet(run.part_path("samples", 0))
    run.write_part("samples", 0, part.with_columns(
        pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("http_503: injected")).otherwise(pl.col("error"))
        .alias("error")
    ))
    assert runner.invoke(app, sample).exit_code == 0  # retried: the good sample comes from the cache
    assert pl.read_parquet(run_dir / "samples")["error"].null_count() == 2
    result = runner.invoke(app, ["grade", "--run-dir", str(run_dir), "--no-progress"])
    assert result.exit_code == 0, result.output  # not refused: only its input changed
    assert pl.read_parquet(run_dir / "graded")["error"].null_count() == 2


def test_every_command_default_comes_from_run_config() -> None:
    import typer.main

    from intgen.config import DEFAULTS

    command = typer.main.get_command(app)
    checked = 0
    for name in ("build-dataset", "sample", "grade", "propose", "verify"):
        for param in command.commands[name].params:
            field = param.name
            if field in ("run_dir", "force", "progress", "config", "problems", "conditions", "vllm_args",
                         "decontaminate", "report"):
                continue
            default = param.default.value if hasattr(param.default, "value") else param.default
            assert default == getattr(DEFAULTS, field), (name, field, default)
            checked += 1
    assert checked > 60
    assert DEFAULTS.max_tokens == 16384  # `intgen sample` and `build-dataset` agree (they used to differ)


def test_build_dataset_takes_the_problem_options_on_the_command_line(tmp_path: Path) -> None:
    folder = tmp_path / "hard"
    (folder / "data").mkdir(parents=True)
    pl.DataFrame({"question": ["1+1?"], "final": ["2"], "ref": ["One plus one is 2."]}).write_parquet(
        folder / "data" / "train-00000-of-00001.parquet")
    result = runner.invoke(app, ["build-dataset", "--problems", str(folder), "--split", "validation",
                                 "--run-dir", str(tmp_path / "r")])
    assert result.exit_code == 2 and 'split "validation"' in result.output
    result = runner.invoke(app, ["problems", str(folder), "--problem-column", "question", "--answer-column", "final",
                                 "--solution-column", "ref"])
    assert result.exit_code == 0, result.output


def test_engine_arguments_from_the_command_line_and_a_vllm_table(tmp_path: Path) -> None:
    from intgen.cli import _key_values
    from intgen.config import read_config_file, resolve

    assert _key_values(["tensor_parallel_size=2", "dtype=bfloat16", "enforce-eager=true"], "--vllm-arg") == {
        "tensor_parallel_size": 2, "dtype": "bfloat16", "enforce_eager": True}
    config = tmp_path / "run.toml"
    config.write_text('backend = "vllm"\nmodel = "m"\n[vllm]\ngpu_memory_utilization = 0.85\nmax_model_len = 20480\n')
    settings = resolve({}, read_config_file(config))
    assert settings.vllm_args == {"gpu_memory_utilization": 0.85, "max_model_len": 20480}
    assert dict(settings.policy_backend().vllm_args) == settings.vllm_args


@pytest.mark.parametrize(
    "option, value, message",
    [("--samples", "0", "--samples: must be at least 1"),
     ("--continuations", "-1", "--continuations: must be at least 1"),
     ("--proposals", "0", "--proposals: must be at least 1"), ("--limit", "0", "--limit: must be at least 1"),
     ("--batch-size", "0", "--batch-size: must be at least 1"),
     ("--concurrency", "0", "--concurrency: must be at least 1"),
     ("--grade-timeout", "-1", "--grade-timeout: must be at least 0.01"),
     ("--top-p", "1.5", "--top-p: must be between"),
     ("--propose-style", "three-turn", "Invalid value"), ("--structured-output", "xml", "Invalid value"),
     ("--continuation", "magic", "Invalid value"), ("--min-success", "9", "min-success: 9 is more than continuations")],
)
def test_bad_settings_are_one_clear_line(option: str, value: str, message: str, tmp_path: Path) -> None:
    result = runner.invoke(app, ["build-dataset", option, value, "--run-dir", str(tmp_path / "r")])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "r" / "config.json").exists()  # nothing saved


@pytest.mark.parametrize(
    "text, message",
    [('samples = "four"', "samples: expected a whole number, got 'four'"),
     ("samples = 2.5", "samples: expected a whole number, got 2.5"),
     ('conditions = "intervention"', "conditions: expected a list of names"),
     ('conditions = ["intervention", "nope"]', "unknown condition(s) nope"),
     ("samples = ", "not a readable TOML file")],
)
def test_bad_config_files_name_the_file_and_the_setting(text: str, message: str, tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(text + "\n")
    result = runner.invoke(app, ["build-dataset", "--config", str(config), "--run-dir", str(tmp_path / "r")])
    assert result.exit_code == 2 and message in result.output and "run.toml" in result.output, result.output
    result = runner.invoke(app, ["build-dataset", "--config", str(tmp_path / "missing.toml"),
                                 "--run-dir", str(tmp_path / "r")])
    assert result.exit_code == 2 and "missing.toml: no such config file" in result.output


@pytest.mark.slow
def test_a_setting_that_changes_replies_is_refused_and_never_answered_from_the_old_cache(
    scripted_proxy, tmp_path: Path
) -> None:
    from intgen.config import EXAMPLE_PROBLEMS

    run_dir, proxy = tmp_path / "run", scripted_proxy
    base = ["build-dataset", "--problems", str(EXAMPLE_PROBLEMS), "--limit", "2", *backend_args(proxy.url),
            "--samples", "2", "--proposals", "1", "--propose-style", "single-turn", "--continuations", "1",
            "--run-dir", str(run_dir), "--no-progress", "--no-report"]
    first = runner.invoke(app, base + ["--structured-output", "json_object"])
    assert first.exit_code == 0, first.output
    schema_asks = [body for _, body in proxy.forwarded if "response_format" in body]
    assert schema_asks, "the premise: proposals were asked for with llama.cpp's json_object schema"
    sampled = [body for _, body in proxy.forwarded if "response_format" not in body and "continue_final_message"
               not in body and body.get("messages", [{}])[-1].get("role") == "user" and body.get("n") == 2]
    assert sampled, "the premise: the attempts were sampled through the proxy"

    refused = runner.invoke(app, base + ["--structured-output", "none"])
    assert refused.exit_code == 2 and "propose" in refused.output and "structured_output" in refused.output

    before = len(proxy.forwarded)
    forced = runner.invoke(app, base + ["--structured-output", "none", "--force"])
    assert forced.exit_code == 0, forced.output
    new = [body for _, body in proxy.forwarded[before:]]
    assert not any(body in sampled for body in new)  # no reply depends on it: the attempts come from the cache
    critiques = [body for body in new if "Substep 1" in body["messages"][-1]["content"]]
    assert critiques and all("response_format" not in body for body in critiques)  # asked again, without a schema


@pytest.mark.slow  # a real model (llama.cpp) or server
def test_allow_no_reference_reaches_the_propose_stage(tmp_path: Path) -> None:
    # problems with answers but no reference solution: skipped and counted without the option, proposed for with it
    problems = {f"What is {a} + {b}?": str(a + b) for a, b in ((12, 29), (7, 8))}
    source = tmp_path / "bare.jsonl"
    source.write_text("".join(json.dumps({"problem": p, "answer": a}) + "\n" for p, a in problems.items()))
    server = ScriptedServer(problems)  # every attempt wrong: each one is a candidate for proposals
    args = ["build-dataset", "--problems", str(source), *backend_args(server.url), "--samples", "2", "--proposals",
            "1", "--propose-style", "single-turn", "--continuations", "1", "--no-progress", "--no-report"]
    try:
        without = runner.invoke(app, args + ["--run-dir", str(tmp_path / "without")])
        assert without.exit_code == 0, without.output
        skipped = pl.read_parquet(tmp_path / "without" / "proposals")
        assert skipped.height == 4 and (skipped["reject_reason"] == "no_reference").all()
        assert server.kinds["critique"] == 0
        with_option = runner.invoke(app, args + ["--run-dir", str(tmp_path / "with"), "--allow-no-reference"])
        assert with_option.exit_code == 0, with_option.output
    finally:
        server.stop()
    proposed = pl.read_parquet(tmp_path / "with" / "proposals")
    assert proposed.height == 4 and proposed["accepted"].all()  # every one was asked for, and the scripted ones hold
    assert server.kinds["critique"] == 4
    config = json.loads((tmp_path / "with" / "config.json").read_text())
    assert config["allow_no_reference"] is True


@pytest.mark.parametrize(
    "raised, code, line",
    [(KeyError("a bug"), 1, None), (ValueError("a bug's message"), 1, None),
     (PermissionError(13, "Permission denied", "/data/p.jsonl"), 2, "error: /data/p.jsonl: Permission denied"),
     (OSError("no path said"), 1, None)],
)
def test_only_what_the_user_can_fix_is_one_line_a_bug_keeps_its_traceback(
    raised: BaseException, code: int, line: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import intgen.pipeline

    def broken(*args: object, **kwargs: object) -> None:
        raise raised

    monkeypatch.setattr(intgen.pipeline, "build_dataset", broken)
    result = runner.invoke(app, ["build-dataset", "--run-dir", str(tmp_path / "r"), "--no-report"])
    assert result.exit_code == code, result.output
    if line is None:
        assert result.exception is raised  # not blamed on the user: the traceback is kept
    else:
        assert line in result.output and "Traceback" not in result.output


def test_a_user_error_from_deep_inside_is_one_line_exit_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["build-dataset", "--run-dir", str(tmp_path / "r"), "--problems", str(EXAMPLE_PROBLEMS),
                                 "--backend", "openai"])
    assert result.exit_code == 2 and "the openai backend needs --model" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
