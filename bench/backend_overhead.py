"""Overhead of intgen's `openai` backend over the raw `openai` async client, in one run.

    python bench/backend_overhead.py [--requests 64] [--concurrency 8] [--max-tokens 16] [--rounds 3]

Starts llama.cpp's OpenAI-compatible server (SmolLM2-135M-Instruct) on a free loopback port, sends the
same chat requests through both clients at the same concurrency (alternating, `--rounds` times each),
and prints the best time of each and the ratio (ours / raw; 1.00 means no overhead).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from intgen.backends.base import Sampling, make_request  # noqa: E402
from intgen.backends.openai_http import OpenAIBackend  # noqa: E402

from servers import LlamaServer  # noqa: E402


def prompts(count: int) -> list[str]:
    return [f"What is {i} + {i + 1}? Answer with the number only." for i in range(count)]


async def raw_client(url: str, questions: list[str], concurrency: int, max_tokens: int) -> list[str]:
    client = openai.AsyncOpenAI(base_url=url, api_key="EMPTY", max_retries=0)
    limit = asyncio.Semaphore(concurrency)

    async def one(question: str) -> str:
        async with limit:
            response = await client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
                temperature=0.7, top_p=0.8, seed=0, n=1, extra_body={"top_k": 20},
            )
            return response.choices[0].message.content or ""

    try:
        return list(await asyncio.gather(*(one(q) for q in questions)))
    finally:
        await client.close()


def ours(url: str, questions: list[str], concurrency: int, max_tokens: int) -> list[str]:
    backend = OpenAIBackend("smollm2", base_url=url, concurrency=concurrency)
    sampling = Sampling(temperature=0.7, top_p=0.8, top_k=20, max_tokens=max_tokens, seed=0)
    requests = [make_request([{"role": "user", "content": q}], sampling) for q in questions]
    return [r[0].text for r in backend.generate(requests)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    questions = prompts(args.requests)
    server = LlamaServer(Path(tempfile.mkdtemp()) / "server.log")
    try:
        asyncio.run(raw_client(server.url, questions[:4], args.concurrency, args.max_tokens))  # warm-up
        raw_times, our_times = [], []
        for _ in range(args.rounds):
            start = time.perf_counter()
            raw_out = asyncio.run(raw_client(server.url, questions, args.concurrency, args.max_tokens))
            raw_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            our_out = ours(server.url, questions, args.concurrency, args.max_tokens)
            our_times.append(time.perf_counter() - start)
            assert len(raw_out) == len(our_out) == args.requests
    finally:
        server.stop()
    raw, mine = min(raw_times), min(our_times)
    print(f"{args.requests} chat requests, concurrency {args.concurrency}, max_tokens {args.max_tokens}, "
          f"best of {args.rounds}")
    print(f"raw openai.AsyncOpenAI : {raw:.3f} s")
    print(f"intgen openai backend  : {mine:.3f} s")
    print(f"ratio (intgen / raw)   : {mine / raw:.3f}")


if __name__ == "__main__":
    main()
