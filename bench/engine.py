"""How busy intgen keeps a GPU server: the pipeline against simulated continuous-batching engines.

    python bench/engine.py [--problems 256] [--rate 7000] [--slots 128 256] [--servers 1 2 4] [--build-args "..."]

Each engine is its own process behind the OpenAI API on 127.0.0.1, as vLLM or SGLang would be: it decodes up to
`slots` sequences at once (one per choice of a request); a sequence holds its slot for its prefill (the prompt
tokens its prefix cache does not hold, at `--prefill-rate` tokens a second) and then its decode (its completion
tokens at `--rate` tokens a second); what does not fit waits in the engine's queue. Completion lengths follow
the paper's (lognormal: attempts ~7k tokens capped at 16k, proposer turns ~2k, continuations ~5k), drawn from a
hash of the request so that a rerun draws the same. The prefix cache keeps the prompt's 64-token blocks (a chain
of hashes, least recently used dropped past `--cache-blocks`) and reports `usage.prompt_tokens_details.
cached_tokens`, as vLLM does. The replies' text is the test suite's script (tests/scripted.py: attempts wrong
at a known step, proposals that name it, continuations that reach the answer after the intervention), so every
stage has work.

For each setting it runs `intgen build-dataset` on `--problems` GSM8K problems (K=4, P=2, M=8, otherwise the
defaults) and prints, from the engines' own records: the busy share (the sequences' work in slot-seconds, their
prefill and decode time, / (slots x the time from the first request to the last answer), summed over the engines;
the engine's own wake-up lag lengthens that time and is never counted as work, so the share errs low); the packed
share (the same sequences packed into the slots with no gap, each taking the next free slot in the order they
started: no client delay, no stage waiting on another, only the final drain that a scheduler not knowing lengths in
advance is left with); the wall time against the ideal (all slot-seconds packed into the slots), the prefix-cache
hit rate (cached prompt tokens / prompt tokens; then by kind of request), each engine's last answer and busy
seconds, and the share of the first engine's slots in use over each tenth of its time, in all and by kind of
request.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import heapq
import json
import math
import shlex
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import jsonserver

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the script the test suite answers with

BLOCK_CHARS = 256  # one cache block: 64 tokens at 4 characters a token
# (median tokens, sigma) of each kind of completion: the paper's lengths
LENGTHS = {"solve": (7000, 0.45), "first_turn": (2000, 0.4), "critique": (2000, 0.4), "continuation": (5000, 0.45)}


def tokens(text: str) -> int:
    return max(1, len(text) // 4)


def drawn_length(kind: str, key: str, cap: int) -> int:
    """A completion length for this kind, drawn from a hash of the request (the same on every run)."""
    median, sigma = LENGTHS[kind]
    digest = hashlib.sha256(key.encode()).digest()
    u1, u2 = (int.from_bytes(digest[i:i + 8], "big") / 2**64 for i in (0, 8))
    normal = math.sqrt(-2 * math.log(max(u1, 1e-12))) * math.cos(2 * math.pi * u2)
    return max(16, min(cap, round(median * math.exp(sigma * normal))))


class Engine:
    """Slots, a prefix cache and the record of what ran when."""

    def __init__(self, slots: int, rate: float, prefill_rate: float, cache_blocks: int) -> None:
        self.slots = asyncio.Semaphore(slots)
        self.rate, self.prefill_rate, self.cache_blocks = rate, prefill_rate, cache_blocks
        self.cache: OrderedDict[str, None] = OrderedDict()
        self.busy = 0.0  # slot-seconds of work: each sequence's own prefill and decode time, not the time its sleep
        # took (the loop's wake-up lag would count as busy; a sequence that ends late makes the span longer instead)
        self.size = slots
        self.spans: list[tuple[float, float, str, float]] = []  # (start, end, kind, work) of every sequence
        self.first: float | None = None
        self.last = 0.0
        self.prompt_tokens = self.cached_tokens = self.sequences = 0
        self.tokens_by_kind: dict[str, list[int]] = {kind: [0, 0] for kind in LENGTHS}  # [prompt, cached]

    def cached_prefix(self, prompt: str) -> int:
        """Tokens of `prompt` its cache holds (whole leading blocks), and the prompt's blocks into the cache."""
        chain, cached, hit = hashlib.sha256(), 0, True
        for start in range(0, len(prompt), BLOCK_CHARS):
            block = prompt[start:start + BLOCK_CHARS]
            chain.update(block.encode())
            key = chain.hexdigest()
            if hit and key in self.cache and len(block) == BLOCK_CHARS:
                cached += tokens(block)
                self.cache.move_to_end(key)
            else:
                hit = False
                self.cache[key] = None
        while len(self.cache) > self.cache_blocks:
            self.cache.popitem(last=False)
        return cached

    async def run(self, prompt_tokens: int, cached: int, completion: int, kind: str = "") -> None:
        async with self.slots:
            started = time.monotonic()
            self.first = started if self.first is None else self.first
            work = (prompt_tokens - cached) / self.prefill_rate + completion / self.rate
            await asyncio.sleep(work)
            ended = time.monotonic()
            self.busy += work
            self.spans.append((started, ended, kind, work))
            self.last = max(self.last, ended)

    def occupancy(self, buckets: int = 10, kind: str | None = None) -> list[float]:
        """The share of slots in use (by sequences of `kind`, or any) over each tenth of the time from the first
        request to the last answer."""
        if self.first is None or self.last <= self.first:
            return []
        width = (self.last - self.first) / buckets
        used = [0.0] * buckets
        for start, end, of, _ in self.spans:
            if kind is not None and of != kind:
                continue
            for b in range(int((start - self.first) / width), min(buckets, int((end - self.first) / width) + 1)):
                low, high = self.first + b * width, self.first + (b + 1) * width
                used[b] += max(0.0, min(end, high) - max(start, low))
        return [round(u / (width * self.size), 2) for u in used]

    def packed_span(self) -> float:
        """The time its sequences would take packed into the slots with no gap, each taken as a slot frees in the
        order they started: what a scheduler that cannot know lengths in advance reaches on the same work."""
        ends = [0.0] * self.size
        for _, _, _, work in sorted(self.spans):
            heapq.heappush(ends, heapq.heappop(ends) + work)
        return max(ends)

    def stats(self) -> dict:
        return {"packed_span": self.packed_span(), "busy": self.busy, "first": self.first, "last": self.last,
                "held": sum(end - start for start, end, _, _ in self.spans),
                "prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens, "sequences": self.sequences,
                "occupancy": self.occupancy(),
                "by_kind": {kind: self.occupancy(kind=kind) for kind in LENGTHS}, "tokens_by_kind": self.tokens_by_kind}


async def reply(engine: Engine, script, body: dict) -> dict:
    status, answer = script.answer("/v1/chat/completions", body)
    if status != 200:
        return answer
    kind = answer["id"].removeprefix("scripted-")
    prompt = "\n".join(str(m.get("content") or "") for m in body.get("messages") or [])
    prompt_tokens = tokens(prompt)
    cached = engine.cached_prefix(prompt)
    cap = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16384)
    lengths = [drawn_length(kind, f"{prompt}|{body.get('seed')}|{i}", cap) for i in range(len(answer["choices"]))]
    engine.prompt_tokens += prompt_tokens
    engine.cached_tokens += cached
    engine.tokens_by_kind[kind][0] += prompt_tokens
    engine.tokens_by_kind[kind][1] += cached
    engine.sequences += len(lengths)
    # each choice is one sequence; the first pays the prefill, the others share its cached prefix
    await asyncio.gather(*(engine.run(prompt_tokens, cached if i == 0 else prompt_tokens, length, kind)
                           for i, length in enumerate(lengths)))
    answer["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": sum(lengths),
                       "total_tokens": prompt_tokens + sum(lengths), "prompt_tokens_details": {"cached_tokens": cached}}
    return answer


async def serve(port: int, slots: int, rate: float, prefill_rate: float, cache_blocks: int, problems: str) -> None:
    from scripted import Script, answers_of

    script = Script(answers_of(problems))
    engine = Engine(slots, rate, prefill_rate, cache_blocks)

    async def answer(path: str, body: dict) -> dict:
        if path.endswith("/models"):
            return {"object": "list", "data": [{"id": "scripted", "object": "model", "max_model_len": 32768}]}
        if path.endswith("/stats"):
            return engine.stats()
        return await reply(engine, script, body)

    await jsonserver.serve_json(port, answer, backlog=4096)


def start_engine(args: argparse.Namespace, slots: int, problems: Path) -> tuple[subprocess.Popen, str]:
    return jsonserver.start([sys.executable, __file__, "--engine-slots", str(slots), "--rate", str(args.rate),
                  "--prefill-rate", str(args.prefill_rate), "--cache-blocks", str(args.cache_blocks),
                  "--problem-file", str(problems)])


def stats_of(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url + "/stats", timeout=10) as response:
        return json.loads(response.read())


def measure(args: argparse.Namespace, slots: int, servers: int, problems: Path, folder: Path,
            extra: list[str]) -> dict:
    engines = [start_engine(args, slots, problems) for _ in range(servers)]
    try:
        run_dir = folder / f"run-{slots}x{servers}-{len(extra)}"
        command = [sys.executable, "-c", "from intgen.cli import app; app()", "build-dataset", "--problems",
                   str(problems), "--run-dir", str(run_dir), "--backend", "openai", "--model", "scripted",
                   "--continuation", "chat",
                   "--samples", "4", "--proposals", "2", "--continuations", "8", "--no-progress", "--no-report",
                   *[arg for _, url in engines for arg in ("--base-url", url)], *extra]
        started = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.monotonic() - started
        if done.returncode != 0:
            raise SystemExit(f"build-dataset failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        stats = [stats_of(url) for _, url in engines]
        kept = json.loads((run_dir / "analysis.json").read_text())["funnel"]["kept"]
    finally:
        for process, _ in engines:
            process.terminate()
            process.wait()
    first = min(s["first"] for s in stats)
    last = max(s["last"] for s in stats)
    busy = sum(s["busy"] for s in stats)
    capacity = slots * servers
    return {"slots": slots, "servers": servers, "settings": " ".join(extra) or "defaults",
            "busy_share": busy / (capacity * (last - first)), "engine_wall_s": last - first,
            "packed_share": busy / (capacity * max(s["packed_span"] for s in stats)),
            "ideal_s": busy / capacity, "command_wall_s": wall,
            "prefix_hit_rate": sum(s["cached_tokens"] for s in stats) / max(1, sum(s["prompt_tokens"] for s in stats)),
            "sequences": sum(s["sequences"] for s in stats), "kept": kept,
            "hits_by_kind": {kind: (sum(s["tokens_by_kind"][kind][1] for s in stats),
                                    sum(s["tokens_by_kind"][kind][0] for s in stats)) for kind in LENGTHS},
            "ends": [round(s["last"] - first, 1) for s in stats],
            "busies": [round(s["busy"] / slots, 1) for s in stats],
            "lag": sum(s["held"] for s in stats) / max(busy, 1e-9),  # slot time held per second of work
            "occupancy": stats[0]["occupancy"], "by_kind": stats[0]["by_kind"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=256, help="GSM8K test problems (the shipped set)")
    parser.add_argument("--rate", type=float, default=7000.0, help="decode tokens a second, per sequence")
    parser.add_argument("--prefill-rate", type=float, default=200000.0, help="prefill tokens a second, per sequence")
    parser.add_argument("--cache-blocks", type=int, default=200000, help="prefix-cache capacity in 64-token blocks")
    parser.add_argument("--slots", type=int, nargs="*", default=[128, 256], help="engine slots, one server each")
    parser.add_argument("--servers", type=int, nargs="+", default=[1, 2, 4],
                        help="servers side by side (128 slots in all, split among them)")
    parser.add_argument("--build-args", default="", help="more options for every build-dataset run, e.g. "
                        "'--concurrency 64' (a window of twice the slots of four 32-slot servers)")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--engine-slots", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--problem-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.engine_slots, args.rate, args.prefill_rate, args.cache_blocks,
                          args.problem_file))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        problems = folder / "gsm8k.jsonl"
        lines = (REPO / "intgen/evalsets/gsm8k/test.jsonl").read_text(encoding="utf-8").splitlines()
        problems.write_text("\n".join(lines[: args.problems]) + "\n", encoding="utf-8")
        extra = shlex.split(args.build_args)
        for slots in args.slots:
            rows.append(measure(args, slots, 1, problems, folder, extra))
        for servers in args.servers:
            if servers > 1:
                rows.append(measure(args, 128 // servers, servers, problems, folder, extra))
    print(f"{args.problems} GSM8K problems, K=4 P=2 M=8, decode {args.rate:.0f} tokens/s per sequence")
    print(f"{'slots':>6} {'servers':>7} {'settings':<10} {'busy share':>10} {'packed':>6} {'engine wall':>11} "
          f"{'ideal':>7} {'prefix hits':>11} {'sequences':>9} {'kept':>5}")
    for r in rows:
        # three decimals: the acceptance is a threshold (busy >= 0.95; hits within 10% of one server's)
        print(f"{r['slots']:>6} {r['servers']:>7} {r['settings']:<10} {r['busy_share']:>10.3f} "
              f"{r['packed_share']:>6.3f} {r['engine_wall_s']:>10.1f}s {r['ideal_s']:>6.1f}s "
              f"{r['prefix_hit_rate']:>11.3f} {r['sequences']:>9} {r['kept']:>5}")
    print("each server's last answer and its slot-seconds over its slots (s, from the first request):")
    for r in rows:
        print(f"  {r['slots']}x{r['servers']}: ends {r['ends']}  busy {r['busies']}  slot time held per second of "
              f"work {r['lag']:.4f} (the engine's own wake-up lag)")
    print("prefix hits by kind of request (cached / prompt tokens, and the kind's share of all prompt tokens):")
    for r in rows:
        total = max(1, sum(prompt for _, prompt in r["hits_by_kind"].values()))
        shares = (f"{kind} {cached / max(1, prompt):.3f} ({prompt / total:.2f})"
                  for kind, (cached, prompt) in r["hits_by_kind"].items())
        print(f"  {r['slots']}x{r['servers']}: " + "  ".join(shares))
    print("slots in use over each tenth of the first server's time (all kinds; then by kind of request):")
    for r in rows:
        kinds = "  ".join(f"{kind} {' '.join(f'{x:.2f}' for x in shares)}" for kind, shares in r["by_kind"].items())
        print(f"  {r['slots']}x{r['servers']}: {' '.join(f'{x:.2f}' for x in r['occupancy'])}  |  {kinds}")


if __name__ == "__main__":
    main()
