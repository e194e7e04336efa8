"""How far one driver goes: the pipeline against an OpenAI-compatible server that answers at once.

    python bench/scale.py [--sample-sizes 10000 100000] [--sizes 960 9600] [--delay 0.5] [--ray-problems 4000]
                          [--concurrency 256] [--batch-size 128] [--chunks-in-flight 32] [--against DIR]

1. The sample stage (issue 12's measure). `--sample-sizes` problems, one request of n=4 each, in a fresh child
   process against the instant server (its own process). The child reports its own CPU time (user + system) for
   the stage, the requests sent and its peak RSS. The driver's CPU per request is the difference between the two
   sizes (start-up and imports cancel out); peak RSS of the larger over the smaller shows whether memory grows
   with the problems.
2. The whole pipeline. For each of `--sizes` (problems; each costs 1 sample request of n=4, 4 proposal
   requests of n=4 and 4 verify requests of n=4, one per attempt: 9 requests), the model stages and grading,
   measured the same way. Verify's CPU includes handing its continuations to the grading workers and reading their
   verdicts.
3. Ray executor. The sample stage for `--ray-problems` problems against the server answering after
   `--delay` seconds, with 1 and with 2 actors (on a local Ray cluster): requests per second of each.

Grading itself runs in worker processes (not the driver) and is not part of the driver's CPU time.

`--against DIR` (a checkout of another commit: `git worktree add /tmp/old ca25c2d`): 1. and 2. are measured for
that code too, with its own bench/scale.py and its own defaults, each size right after this code's, in the same
run: this VM's speed varies between runs, so only figures measured side by side compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jsonserver

STEPS = "First, I add the two numbers ({n}).\n\nThen I multiply the sum by three.\n\nSo the answer is \\boxed{{7}}."
PROPOSAL = {"verification": "Substep 2 multiplies instead of dividing.", "error_step": 2,
            "intervention": "Instead, divide the sum by three, since the total is shared ({n})."}


# --- the instant server ---------------------------------------------------------------------------

# the run's shape, set by main's options and handed to each child in its environment
CONCURRENCY = int(os.environ.get("SCALE_CONCURRENCY", 256))
BATCH_SIZE = int(os.environ.get("SCALE_BATCH_SIZE", 128))
CHUNKS_IN_FLIGHT = int(os.environ.get("SCALE_CHUNKS_IN_FLIGHT", 32))

COUNTER = iter(range(10**12))  # every reply differs: identical attempts would make identical (deduplicated) requests


def reply_for(body: dict) -> dict:
    n = int(body.get("n") or 1)
    if "prompt" in body:  # /v1/completions
        choices = [{"index": i, "text": " " + STEPS.format(n=next(COUNTER)), "finish_reason": "stop"} for i in range(n)]
        return {"id": "c", "object": "text_completion", "created": 0, "model": body.get("model"), "choices": choices,
                "usage": {"prompt_tokens": 100, "completion_tokens": 30 * n, "total_tokens": 100 + 30 * n}}
    def text() -> str:
        if body.get("response_format"):
            return json.dumps(PROPOSAL | {"intervention": PROPOSAL["intervention"].format(n=next(COUNTER))})
        return STEPS.format(n=next(COUNTER))

    choices = [{"index": i, "message": {"role": "assistant", "content": text()}, "finish_reason": "stop"}
               for i in range(n)]
    return {"id": "c", "object": "chat.completion", "created": 0, "model": body.get("model"), "choices": choices,
            "usage": {"prompt_tokens": 100, "completion_tokens": 30 * n, "total_tokens": 100 + 30 * n}}


async def serve(port: int, delay: float) -> None:
    async def answer(path: str, body: dict) -> dict:
        if delay:
            await asyncio.sleep(delay)
        return reply_for(body)

    await jsonserver.serve_json(port, answer)


def start_server(delay: float) -> tuple[subprocess.Popen, str]:
    return jsonserver.start([sys.executable, __file__, "--delay", str(delay)], tries=200)


# --- one measured run (a child process) -----------------------------------------------------------

def problems_file(folder: Path, count: int) -> Path:
    path = folder / f"problems-{count}.jsonl"
    with path.open("w") as out:
        for i in range(count):
            out.write(json.dumps({"problem": f"Problem {i}: what is {i} + 3, times 2?", "answer": str(2 * i + 6),
                                  "solution": f"{i} + 3 = {i + 3}.\n\nTimes 2 is {2 * i + 6}."}) + "\n")
    return path


def measured_run(count: int, url: str, executor: str, actors: int, stages: str) -> dict:
    from intgen.config import resolve
    from intgen.pipeline import load_config_problems, open_engine, run_named_stage, sample_problems
    from intgen.plan import STAGES
    from intgen.rundir import RunDir

    folder = Path(tempfile.mkdtemp(prefix="intgen-scale-"))
    settings = resolve({
        "problems": str(problems_file(folder, count)), "backend": "openai", "model": "instant", "base_url": url,
        "samples": 4, "max_tokens": 64, "proposals": 4, "propose_style": "single-turn", "continuations": 4,
        "verify_max_tokens": 64, "min_success": 0, "batch_size": BATCH_SIZE, "chunks_in_flight": CHUNKS_IN_FLIGHT,
        "concurrency": CONCURRENCY, "executor": executor,
        "ray_actors": actors, "ray_actor_cpus": 0.5,
    }, {})
    run = RunDir(folder / "run")
    problems = load_config_problems(settings).frame
    cpu = 0.0
    sent = 0
    started = time.monotonic()
    with open_engine(settings, settings.policy_backend()) as engine:
        for name in stages.split(","):
            before = resource.getrusage(resource.RUSAGE_SELF)
            if name == "sample":
                entry = sample_problems(run, settings, engine, problems, progress=False)
            else:
                entry = run_named_stage(run, settings, name, None if name == "grade" else engine, progress=False)
            after = resource.getrusage(resource.RUSAGE_SELF)
            if name != "grade":  # the driver's own work for model calls (grading runs in worker processes)
                cpu += (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
                sent += entry["last_run"]["requests_sent"]
    run.close()
    del STAGES
    return {"problems": count, "requests": sent, "cpu_s": cpu, "wall_s": time.monotonic() - started,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child(args: list[str], code: Path | None = None) -> dict:
    """One measured run in a fresh process: this code, or (`code`) another checkout's, with its own script."""
    script = Path(__file__) if code is None else code / "bench" / "scale.py"
    env = os.environ | ({"PYTHONPATH": str(code)} if code is not None else {})
    result = subprocess.run([sys.executable, str(script), "--child", *args], capture_output=True, text=True,
                            check=True, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def paired(sizes: list[int], url: str, stages: str, against: Path | None) -> tuple[list[dict], list[dict]]:
    """Each size for this code and (with `against`) for the other, one right after the other."""
    ours, theirs = [], []
    for n in sizes:
        ours.append(child([str(n), url, "local", "1", stages]))
        if against is not None:
            theirs.append(child([str(n), url, "local", "1", stages], against))
    return ours, theirs


def report(what: str, small: dict, large: dict) -> None:
    for run in (small, large):
        print(f"{what}, local executor, {run['problems']} problems: {run['requests']} requests "
              f"in {run['wall_s']:.1f} s ({run['requests'] / run['wall_s']:.0f} requests/s end to end); "
              f"driver CPU {run['cpu_s']:.1f} s for the model stages; peak RSS {run['peak_rss_mb']:.0f} MB", flush=True)
    per_request = (large["cpu_s"] - small["cpu_s"]) / (large["requests"] - small["requests"])
    # per problem too: the same samples (4 attempts, 16 proposals, 16 continuations), whatever the requests' n
    per_problem = (large["cpu_s"] - small["cpu_s"]) / (large["problems"] - small["problems"])
    print(f"{what}: driver CPU per request (difference of the two sizes) {per_request * 1000:.2f} ms, per problem "
          f"{per_problem * 1000:.2f} ms; peak RSS {large['peak_rss_mb'] / small['peak_rss_mb']:.2f}x at "
          f"{large['problems'] / small['problems']:.0f}x the problems", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample-sizes", type=int, nargs=2, default=[10_000, 100_000])
    parser.add_argument("--sizes", type=int, nargs=2, default=[960, 9600])
    # 64 requests of n=4 in flight (the window counts samples) and 32 chunks of 16 problems: 512 problems in
    # flight, as many as one part of 512 was before parts ran side by side; both --sizes are above that bound
    parser.add_argument("--concurrency", type=int, default=256, help="samples in flight (the window)")
    parser.add_argument("--batch-size", type=int, default=128, help="problems per part")
    parser.add_argument("--chunks-in-flight", type=int, default=32)
    parser.add_argument("--delay", type=float, default=0.5)
    parser.add_argument("--ray-problems", type=int, default=4000)
    parser.add_argument("--against", type=Path, help="another checkout, measured side by side (1. and 2.)")
    parser.add_argument("--serve", type=int)
    parser.add_argument("--child", nargs=5)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.delay))
        return
    if args.child:
        count, url, executor, actors, stages = args.child
        print(json.dumps(measured_run(int(count), url, executor, int(actors), stages)))
        return

    os.environ |= {"SCALE_CONCURRENCY": str(args.concurrency), "SCALE_BATCH_SIZE": str(args.batch_size),
                   "SCALE_CHUNKS_IN_FLIGHT": str(args.chunks_in_flight)}
    server, url = start_server(0.0)
    try:
        for what, sizes, stages in (("sample stage", args.sample_sizes, "sample"),
                                    ("whole pipeline", args.sizes, "sample,grade,propose,verify")):
            ours, theirs = paired(sizes, url, stages, args.against)
            report(what, *ours)
            if theirs:
                report(f"{what} [{args.against}]", *theirs)
    finally:
        server.terminate()

    server, url = start_server(args.delay)
    try:
        for actors in (1, 2):
            run = child([str(args.ray_problems), url, "ray", str(actors), "sample"])
            print(f"ray executor, {actors} actor(s), server answering after {args.delay * 1000:.0f} ms: "
                  f"{run['requests']} sample requests in {run['wall_s']:.1f} s "
                  f"({run['requests'] / run['wall_s']:.0f}/s)",
                  flush=True)
    finally:
        server.terminate()


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    main()
