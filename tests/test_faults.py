"""What intgen survives: kills late in a stage, outages, servers that never answer, a full disk, two processes
on one run directory, and bad input of every kind. Faults are injected by a recording proxy on 127.0.0.1 in
front of the real llama.cpp server (or by the file system itself); each test names the promise it checks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from intgen.cache import CallCache
from intgen.cli import EXIT_FAILURES, app
from intgen.config import EXAMPLE_PROBLEMS
from intgen.dataset.export import export_file

from conftest import TEST_SEED
from servers import JsonServer, Proxy, smollm2_gguf

runner = CliRunner()
pytestmark = pytest.mark.slow


def openai(url: str) -> list[str]:
    return ["--backend", "openai", "--model", "smollm2", "--base-url", url, "--structured-output", "json_object"]


def sample_args(run_dir: Path, url: str, *extra: str) -> list[str]:
    return ["sample", "--problems", str(EXAMPLE_PROBLEMS), "--run-dir", str(run_dir), *openai(url),
            "--max-tokens", "12", "--samples", "2", "--seed", str(TEST_SEED), "--no-progress", *extra]


def build_args(run_dir: Path, url: str, *extra: str) -> list[str]:
    """The whole pipeline on 2 problems, meant for the scripted server (every stage then sends requests: attempts
    wrong, proposals accepted, continuations sent), with raw completions for the continuations."""
    return ["build-dataset", "--problems", str(EXAMPLE_PROBLEMS), "--limit", "2", "--run-dir", str(run_dir),
            "--backend", "openai", "--model", "scripted", "--base-url", url, "--structured-output", "json_object",
            "--continuation", "completions", "--chat-template", str(smollm2_gguf()),
            "--samples", "2", "--max-tokens", "400", "--proposals", "2", "--propose-max-tokens", "300",
            "--continuations", "2", "--verify-max-tokens", "100", "--seed", str(TEST_SEED), "--no-progress", *extra]


def intgen(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "intgen", *args], capture_output=True, text=True, timeout=timeout)


def wait_for(condition, timeout: float = 300, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# --- paid work is kept -------------------------------------------------------------------------------

def test_a_kill_late_in_a_stage_loses_no_answered_call(llama_server, tmp_path: Path) -> None:
    # one part of 20 problems x 2 samples; llama.cpp answers one sample per request: M = 40 calls
    proxy = Proxy(llama_server.url)
    run_dir, calls, killed_after = tmp_path / "run", 40, 22
    try:
        process = subprocess.Popen([sys.executable, "-m", "intgen",
                                    *sample_args(run_dir, proxy.url, "--concurrency", "2")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: proxy.answered >= killed_after or process.poll() is not None, what="22 answers")
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        answered = proxy.answered
        assert answered < calls, "the stage finished before it could be killed"
        in_flight = 2  # --concurrency
        assert len(CallCache(run_dir / "cache.sqlite")) >= answered - in_flight  # in the cache as they arrived
        before = len(proxy.forwarded)
        result = runner.invoke(app, sample_args(run_dir, proxy.url, "--concurrency", "2"))
        assert result.exit_code == 0, result.output
        assert len(proxy.forwarded) - before <= calls - answered + in_flight
        attempts = pl.read_parquet(run_dir / "samples")
        assert attempts.height == 40 and attempts["error"].null_count() == 40
    finally:
        proxy.stop()


def test_an_outage_then_recovery_needs_no_force(scripted, tmp_path: Path) -> None:
    # the server answers 500 for a while (each request tried once): the run ends with failures (exit 3);
    # the rerun against the recovered server retries them and every later stage follows, without --force
    down = Proxy(scripted.url, faults=["500"] * 6)
    run_dir = tmp_path / "run"
    try:
        first = runner.invoke(app, build_args(run_dir, down.url, "--max-tries", "1"))
    finally:
        down.stop()
    assert first.exit_code == EXIT_FAILURES, first.output
    assert "http_500" in first.output and "Run the same command again to retry" in first.output
    up = Proxy(scripted.url)
    try:
        second = runner.invoke(app, build_args(run_dir, up.url, "--max-tries", "1"))
    finally:
        up.stop()
    assert second.exit_code == 0, second.output
    assert "other settings" not in second.output
    assert pl.read_parquet(run_dir / "samples")["error"].null_count() == 4
    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert all(manifest[s]["status"] == "done" for s in ("sample", "grade", "propose", "verify"))
    assert manifest["verify"]["kept"] == 4  # every stage ran on the recovered inputs: one kept per attempt


def is_first_turn(path: str, body: dict) -> str | None:
    messages = body.get("messages") or []
    return "500" if len(messages) == 1 and "First, solve the problem yourself" in messages[0]["content"] else None


def test_a_failed_first_turn_is_retried_and_verify_follows_its_input(scripted, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    failing = Proxy(scripted.url, fail_if=is_first_turn)
    try:
        first = runner.invoke(app, build_args(run_dir, failing.url, "--max-tries", "1"))
    finally:
        failing.stop()
    assert first.exit_code == EXIT_FAILURES, first.output
    proposals = pl.read_parquet(run_dir / "proposals")
    assert proposals.height == 8, "the premise: all 4 attempts wrong, 2 proposals each"
    assert (proposals["reject_reason"] == "call_failed").all() and proposals["error"].null_count() == 0
    up = Proxy(scripted.url)
    try:
        second = runner.invoke(app, build_args(run_dir, up.url))
        assert second.exit_code == 0, second.output
        proposals = pl.read_parquet(run_dir / "proposals")
        assert proposals["error"].null_count() == proposals.height and "call_failed" not in proposals["reject_reason"]
        # deleting a stage's table: it is recomputed (from the cache) and the next stage follows it
        for folder in (run_dir / "proposals", run_dir / "markers" / "proposals"):
            for path in folder.iterdir():
                path.unlink()
        sent = len(up.forwarded)
        third = runner.invoke(app, build_args(run_dir, up.url))
        assert third.exit_code == 0, third.output
        assert len(up.forwarded) == sent  # nothing paid twice
    finally:
        up.stop()
    accepted = pl.read_parquet(run_dir / "proposals").filter("accepted").sort("proposal_index")
    assert accepted.height == 8, "the premise: the scripted proposals are accepted"
    verified = set(pl.read_parquet(run_dir / "verify")["proposal_id"])
    assert verified == set(accepted.group_by("attempt_id").first()["proposal_id"])  # the first of each attempt


def test_a_second_process_on_a_run_directory_is_refused_at_once(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom intgen.rundir import RunDir\n"
         "held = RunDir(sys.argv[1]).locked(); held.__enter__(); print('held', flush=True); time.sleep(600)",
         str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        result = runner.invoke(app, ["sample", "--problems", str(EXAMPLE_PROBLEMS), "--run-dir", str(run_dir),
                                     "--limit", "1", "--samples", "1", "--max-tokens", "8", "--no-progress"])
        assert result.exit_code == 2 and time.monotonic() - started < 30
        assert f"in use by pid {holder.pid} on {socket.gethostname()} since" in result.output
    finally:
        holder.kill()  # a stale lock: its process is gone
        holder.wait()
    result = runner.invoke(app, ["sample", "--problems", str(EXAMPLE_PROBLEMS), "--run-dir", str(run_dir),
                                 "--limit", "1", "--samples", "1", "--max-tokens", "8", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert str(os.getpid()) in (run_dir / ".lock").read_text()  # taken over


def test_a_full_disk_is_one_line_and_leaves_nothing_behind(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        filler = disk / "filler"
        filler.write_bytes(b"x" * 1_990_000)  # a few pages left: the run fills them
        run_dir = disk / "run"
        args = ["sample", "--problems", str(EXAMPLE_PROBLEMS), "--run-dir", str(run_dir), "--samples", "2",
                "--max-tokens", "48", "--no-progress"]
        result = intgen(*args)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert str(disk) in line and ("no space left" in line or "disk is full" in line), line
        filler.unlink()
        result = intgen(*args)
        assert result.returncode == 0, result.stderr
        assert not list(run_dir.rglob("*.tmp"))
        assert pl.read_parquet(run_dir / "samples").height == 40
    finally:
        subprocess.run(["umount", "-l", str(disk)])


# --- no failure is silent ----------------------------------------------------------------------------

def test_a_server_down_for_every_request_exits_with_failures_not_zero(tmp_path: Path) -> None:
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/v1"
    result = runner.invoke(app, build_args(tmp_path / "run", url, "--max-tries", "1"))
    assert result.exit_code == EXIT_FAILURES, result.output
    assert "sample: connection 4" in result.output and "was given up" in result.output
    assert "Run the same command again to retry them" in result.output


def test_a_server_that_never_answers_is_given_up_in_bounded_time(tmp_path: Path) -> None:
    silent = Proxy("http://127.0.0.1:9", faults=["hang"] * 100)
    started = time.monotonic()
    try:
        result = runner.invoke(app, sample_args(tmp_path / "run", silent.url, "--limit", "2", "--request-timeout", "1",
                                                "--max-tries", "2"))
    finally:
        silent.stop()
    assert result.exit_code == EXIT_FAILURES, result.output
    assert time.monotonic() - started < 60
    assert "connection" in result.output and "was given up" in result.output


def test_a_request_waiting_in_a_busy_servers_queue_is_not_timed_out(tmp_path: Path) -> None:
    # One slot answering every 0.3 s, 6 requests in flight: the last waits 1.8 s in the server's queue, far past the
    # 0.5 s timeout, while the server keeps answering the others. Only a server that answers nothing is stalled.
    from scripted import ScriptedServer, answers_of

    server = ScriptedServer(answers_of(EXAMPLE_PROBLEMS), delay=0.3, one_at_a_time=True)
    try:
        result = runner.invoke(app, sample_args(tmp_path / "run", server.url, "--limit", "6", "--concurrency", "16",
                                                "--request-timeout", "0.5", "--max-tries", "1"))
    finally:
        server.stop()
    assert result.exit_code == 0, result.output
    attempts = pl.read_parquet(tmp_path / "run" / "samples")
    assert attempts.height == 12 and attempts["error"].null_count() == 12


def is_continuation(path: str, body: dict) -> str | None:
    return "503" if path.endswith("/completions") and not path.endswith("/chat/completions") else None


def test_a_server_dying_in_verify_counts_nothing_as_verified(scripted, tmp_path: Path) -> None:
    proxy = Proxy(scripted.url, fail_if=is_continuation)
    try:
        result = runner.invoke(app, build_args(tmp_path / "run", proxy.url, "--max-tries", "1"))
    finally:
        proxy.stop()
    assert result.exit_code == EXIT_FAILURES, result.output
    analysis = json.loads((tmp_path / "run" / "analysis.json").read_text())["funnel"]
    assert analysis["accepted"] == 8, "the premise: there was something to verify"
    assert analysis["verified"] == 0 and analysis["kept"] == 0
    assert analysis["failed"]["verify"]["http_503"] == 4  # one request (n=2) per attempt's first proposal


def chat_reply(content: object = "So the answer is $\\boxed{12}$.", finish: object = "stop",
               usage: dict | None = None, message: object = ...) -> dict:
    """A chat completion as a server sends it, with any field made wrong."""
    message = {"role": "assistant", "content": content} if message is ... else message
    return {"id": "x", "object": "chat.completion", "model": "m", "usage": usage or {"prompt_tokens": 9,
            "completion_tokens": 7}, "choices": [{"index": 0, "message": message, "finish_reason": finish}]}


def one_sample(run_dir: Path, url: str) -> list[str]:
    return ["sample", "--problems", str(EXAMPLE_PROBLEMS), "--limit", "1", "--samples", "1", "--run-dir",
            str(run_dir), "--backend", "openai", "--model", "m", "--base-url", url, "--max-tries", "2",
            "--no-progress"]


@pytest.mark.parametrize(("status", "reply", "kind"), [
    (200, chat_reply(finish="error"), "bad_response"),  # OpenRouter's mid-generation failure
    (200, chat_reply(message=None), "bad_response"),
    (200, chat_reply(content=None), "bad_response"),
    (200, {"object": "error", "message": "internal"}, "bad_response"),  # no choices at all
    (400, {"error": {"message": "Daily token quota exceeded for this API key"}}, "http_400"),
    (400, {"error": {"message": "n=2 exceeds the maximum number of choices"}}, "http_400"),
], ids=["finish-error", "message-null", "content-null", "no-choices", "quota", "n-limit"])
def test_a_reply_that_is_no_answer_is_a_failed_call_retried_on_the_rerun(status, reply, kind, tmp_path: Path) -> None:
    answers = {"bad": True}
    server = JsonServer(lambda path, body: (status, reply) if answers["bad"] else (200, chat_reply()))
    try:
        first = runner.invoke(app, one_sample(tmp_path / "run", server.url + "/v1"))
        assert first.exit_code == EXIT_FAILURES, first.output
        assert f"sample: {kind} 1" in first.output and "Run the same command again to retry" in first.output
        assert pl.read_parquet(tmp_path / "run" / "samples")["error"].str.starts_with(kind).all()
        assert len(CallCache(tmp_path / "run" / "cache.sqlite")) == 0  # nothing of it was cached
        answers["bad"] = False
        second = runner.invoke(app, one_sample(tmp_path / "run", server.url + "/v1"))
    finally:
        server.stop()
    assert second.exit_code == 0, second.output
    samples = pl.read_parquet(tmp_path / "run" / "samples")
    assert samples["error"].is_null().all() and samples["text"].to_list() == ["So the answer is $\\boxed{12}$."]


def test_odd_but_real_replies_are_answers(tmp_path: Path) -> None:
    # content as a list of parts, an emoji cut between two tokens (a lone surrogate), negative usage, and
    # Anthropic-style "max_tokens" as the finish reason: the run goes on, nothing is lost or negative
    replies = iter([
        chat_reply(content=[{"type": "text", "text": "So the answer "}, {"type": "text", "text": "is 12."}]),
        chat_reply(content="Thinking \ud83d", usage={"prompt_tokens": -5, "completion_tokens": -1}),
        chat_reply(content="So the answer is", finish="max_tokens"),
    ])
    server = JsonServer(lambda path, body: (200, next(replies)))
    try:
        result = runner.invoke(app, one_sample(tmp_path / "run", server.url + "/v1")[:-1] + [
            "--samples", "3", "--concurrency", "1", "--no-progress"])
    finally:
        server.stop()
    assert result.exit_code == 0, result.output
    samples = pl.read_parquet(tmp_path / "run" / "samples").sort("attempt_id")
    assert samples["text"].to_list() == ["So the answer is 12.", "Thinking \ufffd", "So the answer is"]
    assert samples["finish_reason"].to_list() == ["stop", "stop", "length"]
    assert samples["completion_tokens"].min() >= 0 and samples["prompt_tokens"].min() >= 0
    assert len(CallCache(tmp_path / "run" / "cache.sqlite")) == 3


def test_eval_leaves_failed_calls_out_of_its_metrics_and_exits_3(tmp_path: Path) -> None:
    # a server that answers every problem right, except that one problem's calls fail with 500
    problems = tmp_path / "two.jsonl"
    problems.write_text('{"problem": "What is 7 + 5?", "answer": "12"}\n{"problem": "What is 9 - 4?", "answer": "5"}\n')
    failing = {"on": True}

    def respond(path: str, body: dict) -> tuple[int, dict]:
        asked = body["messages"][-1]["content"]
        if "7 + 5" in asked and failing["on"]:
            return 500, {"error": {"message": "injected 500"}}
        return 200, chat_reply(content=f"So the answer is $\\boxed{{{12 if '7 + 5' in asked else 5}}}$.")

    server = JsonServer(respond)
    url = server.url + "/v1"

    def evaluate(run_dir: Path) -> object:
        return runner.invoke(app, ["eval", "--problems", str(problems), "--backend", "openai", "--model", "m",
                                   "--base-url", url, "--samples", "4", "--max-tokens", "64", "--max-tries", "1",
                                   "--run-dir", str(run_dir), "--no-progress"])
    try:
        first = evaluate(tmp_path / "failed")
        failing["on"] = False
        second = evaluate(tmp_path / "answered")
    finally:
        server.stop()
    assert first.exit_code == EXIT_FAILURES, first.output
    assert "Run the same command again to retry" in first.output and "http_500 4" in first.output
    report = json.loads((tmp_path / "failed" / "eval.json").read_text())
    assert report["failed_calls"] == {"http_500": 4} and len(report["unanswered_problems"]) == 1
    assert report["problems"] == 1 and report["avg@4"] == report["pass@4"] == report["maj@4"] == 1.0  # not 50%
    assert second.exit_code == 0, second.output
    compared = runner.invoke(app, ["eval", "compare", str(tmp_path / "answered"), str(tmp_path / "failed")])
    assert compared.exit_code == 0, compared.output
    text = " ".join(compared.output.split())
    assert "1 shared problems" in text and "+0.00 pts" in text and "solved by answered, not by failed" not in text
    assert "failed did not answer 1 problem(s), left out of the comparison" in text


def test_a_corrected_answer_is_followed_by_grading_and_the_dataset(tmp_path: Path) -> None:
    # the gold answers were mistyped as 580; the model answers 579 (right). Fixing the file re-grades the attempts
    # (from the cache: nothing is sampled again), and the rl config carries the corrected ground truth.
    problems = tmp_path / "problems.jsonl"

    def write(answer: str) -> None:
        problems.write_text("".join(json.dumps({"problem": f"What is {a} + {579 - a}?", "answer": answer,
                                                "solution": f"{a} + {579 - a} = 579."}) + "\n" for a in (500, 79)))

    server = JsonServer(lambda path, body: (200, chat_reply(content="So the answer is $\\boxed{579}$.")))
    args = ["build-dataset", "--problems", str(problems), "--run-dir", str(tmp_path / "run"), "--backend", "openai",
            "--model", "m", "--base-url", server.url + "/v1", "--samples", "2", "--proposals", "1",
            "--continuations", "1", "--no-progress", "--no-report"]

    def graded() -> list[bool | None]:
        return pl.read_parquet(tmp_path / "run" / "graded")["correct"].to_list()

    def ground_truth() -> set[str]:
        rl = pl.read_parquet(export_file(tmp_path / "run" / "dataset", "rl"))
        return {row["ground_truth"] for row in rl["reward_model"]}
    try:
        write("580")
        assert runner.invoke(app, args).exit_code == 0  # (the proposals, not JSON, are rejected)
        assert graded() == [False] * 4 and ground_truth() == {"580"}
        sent = len(server.requests)
        write("579")
        for extra in ([], ["--force"]):
            result = runner.invoke(app, args + extra)
            assert result.exit_code == 0, result.output
            assert graded() == [True] * 4 and ground_truth() == {"579"}
            assert set(pl.read_parquet(tmp_path / "run" / "problems")["answer"]) == {"579"}
            assert len(server.requests) == sent  # the attempts came from the cache
    finally:
        server.stop()


def test_export_report_and_push_refuse_a_stage_that_no_longer_follows_its_input(scripted, tmp_path: Path) -> None:
    # a finished run (4 kept), then the proposals made again by another proposer whose interventions never lead
    # to the answer: until verify runs again, nothing may publish the old verdicts under the new texts
    from scripted import ScriptedServer, answers_of, backend_args

    run = tmp_path / "run"
    build = ["build-dataset", "--problems", str(EXAMPLE_PROBLEMS), "--limit", "2", "--run-dir", str(run),
             *backend_args(scripted.url), "--samples", "2", "--proposals", "1", "--continuations", "2", "--no-progress"]
    first = runner.invoke(app, build)
    assert first.exit_code == 0, first.output
    assert pl.read_parquet(export_file(run / "dataset", "sft")).height == 4  # the premise
    other = ScriptedServer(answers_of(EXAMPLE_PROBLEMS), intervention="Maybe try a different approach to the sum, "
                           "and look again at how the quantities combine before going on.")
    try:
        again = runner.invoke(app, ["propose", "--run-dir", str(run), "--force", "--proposer-model", "other",
                                    "--proposer-base-url", other.url, "--no-progress"])
    finally:
        other.stop()
    assert again.exit_code == 0, again.output
    assert other.kinds["critique"] == 4, "the premise: the new proposer was asked (another model: no cache hit)"
    stale = "the 'verify' stage is out of date"
    for args in (["export", "--run-dir", str(run)], ["report", str(run)], ["push", str(run), "me/data"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and stale in " ".join(result.output.split()), (args, result.output)
        assert f"run `intgen verify --run-dir {run}`" in " ".join(result.output.split())
    verified = runner.invoke(app, ["verify", "--run-dir", str(run), "--no-progress"])
    assert verified.exit_code == 0, verified.output
    exported = runner.invoke(app, ["export", "--run-dir", str(run)])
    assert exported.exit_code == 0, exported.output
    assert pl.read_parquet(export_file(run / "dataset", "sft")).height == 0  # the truth: the new ones fail
    assert runner.invoke(app, ["report", str(run)]).exit_code == 0


def test_push_refuses_a_dataset_exported_before_the_stages_changed(scripted, tmp_path: Path) -> None:
    from scripted import backend_args

    run = tmp_path / "run"
    build = ["build-dataset", "--problems", str(EXAMPLE_PROBLEMS), "--limit", "1", "--run-dir", str(run),
             *backend_args(scripted.url), "--samples", "1", "--proposals", "1", "--continuations", "1", "--no-progress"]
    assert runner.invoke(app, build).exit_code == 0
    verified = runner.invoke(app, ["verify", "--run-dir", str(run), "--force", "--continuations", "2", "--no-progress"])
    assert verified.exit_code == 0, verified.output  # verify ran again, after the export
    result = runner.invoke(app, ["push", str(run), "me/data"])
    assert result.exit_code == 2 and "the dataset was exported before the stages last changed" in " ".join(
        result.output.split()), result.output


def test_push_to_an_unreachable_hub_is_one_line_and_keeps_the_card(tmp_path: Path) -> None:
    from intgen.rundir import RunDir

    result = runner.invoke(app, ["build-dataset", "--run-dir", str(tmp_path / "run"), "--limit", "1", "--samples", "1",
                                 "--max-tokens", "24", "--proposals", "1", "--propose-max-tokens", "32",
                                 "--continuations", "1", "--verify-max-tokens", "16", "--seed", str(TEST_SEED),
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    card = tmp_path / "run" / "dataset" / "README.md"
    before = card.read_text()
    (tmp_path / "run" / "dataset" / ".stray.parquet.tmp").write_text("left by a kill")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    result = runner.invoke(app, ["push", str(tmp_path / "run"), "me/data", "--endpoint", endpoint],
                           env={"HF_TOKEN": "hf_x"})
    assert result.exit_code == 2, result.output
    [line] = [line for line in result.output.splitlines() if line.strip()]
    assert line.startswith("error:") and endpoint in line and "cannot reach" in line
    assert card.read_text() == before  # not rewritten for a repo that does not exist
    from intgen.hub import dataset_files

    assert all(not p.name.endswith(".tmp") for p in dataset_files(RunDir(tmp_path / "run").path / "dataset"))


def test_progress_is_a_line_every_so_often_when_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    from intgen.driver import StageProgress

    with StageProgress("propose", parts=2, enabled=True, every=0.0) as progress:
        progress.expect(0, 10)
        progress.advance(4)
        progress.advance(6)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("propose: 0/20 done (1/2 parts started")  # the second part is estimated like the first
    assert any(line.startswith("propose: 4/20 done") and "left" in line for line in lines)
    assert lines[-1].startswith("propose: 10/20 done")


# --- no input is a traceback -------------------------------------------------------------------------

BAD_FILES = [
    ("garbage.jsonl", bytes(range(128, 256)) * 40, "not UTF-8 text"),
    ("control.jsonl", bytes(range(0, 128)) * 4, "not valid JSON"),
    ("latin1.csv", "problem,answer\nCombien font 2+2 ? Réponse,4\n".encode("latin-1"), "not UTF-8 text"),
    ("garbage.parquet", b"PAR1 this is not parquet", "not a readable parquet file"),
    ("lists.jsonl", b'{"problem": ["a", "list"], "answer": "1"}\n', "column 'problem' holds a list, not text"),
    ("objects.jsonl", b'{"problem": "1+1?", "answer": {"value": 2}}\n', "column 'answer' holds an object"),
    ("twice.csv", b"problem,answer,answer\n1+1?,2,3\n", "the header names 'answer' more than once"),
    ("twice.jsonl", b'{"problem": "1+1?", "answer": "2", "answer": "3"}\n', "the key 'answer' appears twice"),
    ("surrogate.jsonl", b'{"problem": "1+1? \\ud800", "answer": "2"}\n', "surrogate.jsonl:1: column 'problem' holds a "
     "lone surrogate (U+D800)"),  # valid JSON, but no text
]


@pytest.mark.parametrize("name, content, message", BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_problem_files_are_one_clear_line(name: str, content: bytes, message: str, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    for extra in ([], ["--skip-bad-rows"]):
        result = runner.invoke(app, ["problems", str(path), *extra])
        assert result.exit_code == 2, result.output
        assert message in result.output and name in result.output and "Traceback" not in result.output


def test_a_lone_surrogate_row_is_skipped_and_a_missing_out_folder_is_named(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"problem": "What is 1+1? \\udc00", "answer": "2"}\n'
                     b'{"problem": "What is 2+2?", "answer": "4"}\n')
    result = runner.invoke(app, ["problems", str(path), "--skip-bad-rows", "--out", str(tmp_path / "ok.jsonl")])
    assert result.exit_code == 0 and "skipped mixed.jsonl:1" in result.output, result.output
    assert len((tmp_path / "ok.jsonl").read_text().splitlines()) == 1
    out = tmp_path / "missing" / "dir" / "x.parquet"
    result = runner.invoke(app, ["problems", str(path), "--skip-bad-rows", "--out", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{out}: cannot write it: the folder {out.parent} does not exist" in " ".join(result.output.split())


def test_a_truncated_parquet_and_a_bom_and_a_typo(tmp_path: Path) -> None:
    good = tmp_path / "good.parquet"
    pl.DataFrame({"problem": ["1+1?"] * 50, "answer": ["2"] * 50}).write_parquet(good)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[:-40])
    result = runner.invoke(app, ["problems", str(cut)])
    assert result.exit_code == 2 and "cut.parquet: not a readable parquet file" in result.output
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufeffproblem,answer\n1+1?,2\n".encode("utf-8"))
    assert runner.invoke(app, ["problems", str(bom)]).exit_code == 0  # the BOM is not part of the column name
    started = time.monotonic()
    result = runner.invoke(app, ["problems", str(tmp_path / "typo.jsnl")])
    assert result.exit_code == 2 and "typo.jsnl: no such file" in result.output
    assert time.monotonic() - started < 5  # not tried as a Hub dataset id


def test_a_broken_price_table_names_the_file(tmp_path: Path) -> None:
    from intgen.pipeline import load_price

    broken = tmp_path / "prices.toml"
    broken.write_text("[model\ninput = 1")
    with pytest.raises(ValueError, match="prices.toml: not a readable price table"):
        load_price(broken, "m")
    broken.write_text('["m"]\ninput = 1.0\n')
    with pytest.raises(ValueError, match="prices.toml: the price of 'm' needs numbers `input` and `output`"):
        load_price(broken, "m")


def test_corrupt_run_files_are_named_and_a_truncated_part_is_recomputed(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["sample", "--problems", str(EXAMPLE_PROBLEMS), "--run-dir", str(run_dir), "--limit", "2", "--samples", "1",
            "--max-tokens", "8", "--no-progress"]
    assert runner.invoke(app, args).exit_code == 0
    part = run_dir / "samples" / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[:-30])  # a part cut short (a full disk, a bad copy)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "this run sent 0 requests" in result.output  # recomputed from the cache
    assert pl.read_parquet(part).height == 2
    (run_dir / "config.json").write_text("{not json")
    result = runner.invoke(app, ["grade", "--run-dir", str(run_dir)])
    assert result.exit_code == 2 and "config.json: unreadable" in result.output
    (run_dir / "config.json").unlink()
    (run_dir / "manifest.json").write_text("[1, 2")
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "manifest.json: unreadable" in result.output


def test_a_run_directory_that_is_a_file_or_read_only(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    args = ["sample", "--problems", str(EXAMPLE_PROBLEMS), "--limit", "1", "--samples", "1", "--max-tokens", "8",
            "--no-progress", "--run-dir"]
    result = runner.invoke(app, [*args, str(a_file)])
    assert result.exit_code == 2 and "file: not a directory" in result.output
    if os.geteuid() != 0:  # root writes anywhere
        read_only = tmp_path / "ro"
        read_only.mkdir(mode=0o555)
        result = runner.invoke(app, [*args, str(read_only / "run")])
        assert result.exit_code == 2 and "not writable" in result.output


@pytest.mark.parametrize(
    "blocked, args, extra",
    [("llama_cpp", ["build-dataset", "--limit", "1"], "local"),
     ("trl", ["train", "sft", "--dataset", "x"], "train"),
     ("llama_cpp", ["sample", "--problems", str(EXAMPLE_PROBLEMS), "--backend", "openai", "--model", "m",
                    "--continuation", "completions", "--chat-template", "model.gguf", "--run-dir", "r"], "local")],
)
def test_a_missing_extra_is_named(blocked: str, args: list[str], extra: str, tmp_path: Path) -> None:
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"  # as on a base install without the extra
            "from intgen.cli import app; app()")
    result = subprocess.run([sys.executable, "-c", code, *args, *([] if args[0] == "train" else ["--no-progress"])],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr
    assert f"pip install 'intgen[{extra}]'" in result.stderr and "Traceback" not in result.stderr
