"""Why the openai backend posts with aiohttp: the driver's CPU per request through each HTTP client, in one run.

    python bench/http_clients.py [--requests 4000] [--concurrency 64]

The same chat request (n=4) goes to bench/scale.py's instant server (its own process) through
`openai.AsyncOpenAI.post` (the client intgen used before), the same client on its aiohttp transport, httpx
itself, and aiohttp itself, at the same concurrency. Printed: this process's CPU time (user + system) per
request and requests per second, and each client's CPU relative to aiohttp's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale  # noqa: E402

BODY = {"model": "instant", "n": 4, "temperature": 1.0, "top_p": 1.0, "max_tokens": 64,
        "messages": [{"role": "user", "content": "Problem 1: what is 3 + 3, times 2? " * 10}]}


def cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def send_all(post: Callable[[int], Awaitable[object]], count: int, concurrency: int) -> None:
    limit = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with limit:
            await post(i)

    await asyncio.gather(*(one(i) for i in range(count)))


async def through_openai(url: str, count: int, concurrency: int, aiohttp_transport: bool) -> None:
    import openai

    extra = {"http_client": openai.DefaultAioHttpClient()} if aiohttp_transport else {}
    client = openai.AsyncOpenAI(api_key="EMPTY", base_url=url, max_retries=0, **extra)

    async def post(i: int) -> object:
        return json.loads(await client.post("/chat/completions", body=BODY, cast_to=bytes))

    await send_all(post, count, concurrency)
    await client.close()


async def through_httpx(url: str, count: int, concurrency: int) -> None:
    import httpx2 as httpx  # the httpx the openai client ships with here

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)) as client:
        async def post(i: int) -> object:
            return json.loads((await client.post(url + "/chat/completions", json=BODY)).content)

        await send_all(post, count, concurrency)


async def through_aiohttp(url: str, count: int, concurrency: int) -> None:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def post(i: int) -> object:
            async with session.post(url + "/chat/completions", data=json.dumps(BODY),
                                    headers={"Content-Type": "application/json"}) as response:
                return json.loads(await response.read())

        await send_all(post, count, concurrency)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    count, concurrency = args.requests, args.concurrency
    clients = {
        "openai.AsyncOpenAI (httpx)": lambda url: through_openai(url, count, concurrency, False),
        "openai.AsyncOpenAI (aiohttp transport)": lambda url: through_openai(url, count, concurrency, True),
        "httpx.AsyncClient": lambda url: through_httpx(url, count, concurrency),
        "aiohttp.ClientSession (intgen)": lambda url: through_aiohttp(url, count, concurrency),
    }
    server, url = scale.start_server(0.0)
    measured: dict[str, float] = {}
    try:
        for name, run in clients.items():
            cpu, started = cpu_now(), time.monotonic()
            asyncio.run(run(url))
            measured[name] = (cpu_now() - cpu) / count
            print(f"{name}: {measured[name] * 1000:.2f} ms CPU per request, "
                  f"{count / (time.monotonic() - started):.0f} requests/s", flush=True)
    finally:
        server.terminate()
    base = measured["aiohttp.ClientSession (intgen)"]
    print("CPU per request relative to aiohttp: " + ", ".join(f"{n} {v / base:.1f}x" for n, v in measured.items()))


if __name__ == "__main__":
    main()
