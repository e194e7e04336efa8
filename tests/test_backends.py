"""Backends against real servers: llama.cpp's OpenAI-compatible server (through a recording, fault-injecting
proxy), the in-process llama.cpp engine, and a local server speaking Gemini's REST shape."""

from __future__ import annotations

import json
import time
from dataclasses import fields
from pathlib import Path

import pytest

from intgen.backends.base import ERROR, Sampling, make_request
from intgen.backends.local import LocalBackend
from intgen.backends.openai_http import OpenAIBackend
from intgen.cache import CallCache, sample_keys
from intgen.calls import CallStats, run_requests
from intgen.chat_template import load_chat_template

from servers import JsonServer, Proxy, smollm2_gguf

SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
QUESTION = [{"role": "user", "content": "What is 2+3? Answer briefly."}]
PREFIX = "First, I add the two numbers: 2 + 3 ="


def backend_for(url: str, **options) -> OpenAIBackend:
    settings = {
        "chat_template": load_chat_template(smollm2_gguf()),
        "structured_output": "json_object",
        "continuation": "completions",
        "backoff_initial_s": 0.05,
    } | options
    return OpenAIBackend("smollm2", base_url=url, **settings)


def test_n_samples_are_all_returned_even_when_the_server_gives_one(proxy: Proxy, tmp_path: Path) -> None:
    stats = CallStats()
    request = make_request(QUESTION, Sampling(max_tokens=40, seed=7), n=3)
    [completions] = run_requests(backend_for(proxy.url), [request], CallCache(tmp_path / "c.sqlite"), stats)
    assert len(completions) == 3 and all(c.error is None for c in completions)
    chats = proxy.posts("/chat/completions")
    assert chats[0]["n"] == 3  # n is sent natively first
    assert len(chats) >= 2  # llama.cpp returned fewer choices: the missing ones were asked for again
    assert len({body["seed"] for body in chats}) == len(chats)  # each with its own seed: distinct draws
    assert stats.requests_sent == len(chats)


def test_continuation_goes_through_completions_as_the_same_turn(proxy: Proxy) -> None:
    messages = QUESTION + [{"role": "assistant", "content": PREFIX}]
    [[completion]] = backend_for(proxy.url).generate(
        [make_request(messages, Sampling(max_tokens=20, seed=1), continue_final=True)]
    )
    assert completion.error is None and completion.true_continuation
    [sent] = proxy.posts("/completions")
    prompt = sent["prompt"]
    assert prompt.endswith(PREFIX)
    assert prompt.count("<|im_start|>user") == 1  # no new user turn
    assert prompt.rindex("<|im_start|>assistant\n") < prompt.rindex(PREFIX)
    assert "<|im_end|>" not in prompt[prompt.rindex("<|im_start|>assistant"):]  # the assistant turn is left open


def test_chat_continuation_sends_vllm_options(proxy: Proxy) -> None:
    # vLLM-style servers continue through the chat endpoint; llama.cpp ignores the options, but the wire shape is
    # checked.
    messages = QUESTION + [{"role": "assistant", "content": PREFIX}]
    backend = backend_for(proxy.url, continuation="chat")
    backend.generate([make_request(messages, Sampling(max_tokens=5, seed=1), continue_final=True)])
    [sent] = proxy.posts("/chat/completions")
    assert sent["continue_final_message"] is True and sent["add_generation_prompt"] is False
    assert sent["messages"][-1] == {"role": "assistant", "content": PREFIX}


def test_structured_output_is_enforced_by_the_server(proxy: Proxy) -> None:
    # room for the longest object the grammar lets a small model write, so that it closes
    request = make_request([{"role": "user", "content": "Give 2+3 as JSON."}], Sampling(max_tokens=200, seed=3),
                           json_schema=SCHEMA)
    [[completion]] = backend_for(proxy.url).generate([request])
    assert completion.finish_reason == "stop", completion
    assert isinstance(json.loads(completion.text)["answer"], int)
    assert proxy.posts("/chat/completions")[0]["response_format"] == {"type": "json_object", "schema": SCHEMA}


def test_concurrency_is_bounded(proxy: Proxy) -> None:
    requests = [make_request([{"role": "user", "content": f"Say the number {i}."}], Sampling(max_tokens=8, seed=i))
                for i in range(8)]
    results = backend_for(proxy.url, concurrency=3).generate(requests)
    assert all(len(r) == 1 and r[0].error is None for r in results)
    assert 1 <= proxy.max_in_flight <= 3


def test_cache_hits_never_reach_the_server(proxy: Proxy, tmp_path: Path) -> None:
    cache = CallCache(tmp_path / "cache.sqlite")
    requests = [make_request(QUESTION, Sampling(max_tokens=16, seed=s), n=2) for s in (1, 2)]
    first = run_requests(backend_for(proxy.url), requests, cache, CallStats())
    sent = len(proxy.forwarded)
    stats = CallStats()
    second = run_requests(backend_for(proxy.url), requests, CallCache(tmp_path / "cache.sqlite"), stats)
    assert len(proxy.forwarded) == sent
    assert stats.requests_sent == 0 and stats.cache_hits == 4
    assert [[c.text for c in r] for r in first] == [[c.text for c in r] for r in second]
    assert all(c.cached for r in second for c in r)


def test_cache_keys_never_change() -> None:
    # A changed key silently makes every existing cache miss: users would pay for their calls again.
    request = make_request(QUESTION + [{"role": "assistant", "content": "First,"}],
                           Sampling(max_tokens=40, seed=7, stop=("\n\n",)), n=3, continue_final=True,
                           json_schema={"type": "object"})
    assert sample_keys("openai", "m", request) == [
        "f08fdb859f55f2c26eed1915eb59e0d9e0f960824756166ea0fa9b1418786b9c",
        "de8ac0efb37bc84b63ce803cae0dc05de62cf4ccd8f5b88a378b528e313765ba",
        "9476d3457b7460cdf159eac362c9418916b7036ef3578636c4b06e211f1b7184",
    ]
    assert set(Sampling().to_dict()) == {f.name for f in fields(Sampling)}  # every sampling parameter is in the key


def test_cache_keys_follow_every_backend_setting_that_changes_a_reply() -> None:
    from intgen.backends import BackendConfig

    plain = make_request(QUESTION, Sampling(max_tokens=40, seed=7), n=2)
    schema = make_request(QUESTION, Sampling(max_tokens=40, seed=7), json_schema=SCHEMA)
    continued = make_request(QUESTION + [{"role": "assistant", "content": PREFIX}], Sampling(max_tokens=40),
                             continue_final=True)

    def keys(request, **config):
        settings = BackendConfig(**({"backend": "openai", "model": "m"} | config)).reply_settings()
        return sample_keys(config.get("backend", "openai"), "m", request, settings)

    # the JSON-schema mechanism changes the replies to schema requests, and only those
    assert keys(schema, structured_output="json_object") != keys(schema, structured_output="json_schema")
    assert keys(plain, structured_output="json_object") == keys(plain, structured_output="json_schema")
    # the continuation mechanism and the chat template change continuations, and only those
    assert keys(continued, continuation="completions", chat_template="a.jinja") != keys(continued)
    assert keys(continued, continuation="completions", chat_template="a.jinja") != \
        keys(continued, continuation="completions", chat_template="b.gguf")
    assert keys(plain, continuation="completions", chat_template="a.jinja") == keys(plain)
    # gemini's thinking budget changes every reply; vLLM's engine arguments too, unless they only size the engine
    gemini = {"backend": "gemini"}
    assert keys(plain, **gemini, thinking_budget=0) != keys(plain, **gemini, thinking_budget=1024)
    vllm = {"backend": "vllm"}
    assert keys(plain, **vllm, vllm_args={"dtype": "bfloat16"}) != \
        keys(plain, **vllm, vllm_args={"dtype": "half"})
    assert keys(plain, **vllm, vllm_args={"dtype": "half", "gpu_memory_utilization": 0.5}) == \
        keys(plain, **vllm, vllm_args={"dtype": "half", "gpu_memory_utilization": 0.9})
    # a backend with no such setting keys its calls as before (existing caches stay valid)
    assert keys(plain, backend="local") == sample_keys("local", "m", plain)
    # what make_backend builds carries them
    from intgen.backends import make_backend

    backend = make_backend(BackendConfig("openai", "m", base_url="http://127.0.0.1:9/v1",
                                         structured_output="json_object"))
    assert backend.reply_settings == {"structured_output": "json_object", "continuation": "chat", "chat_template": None}


def test_retries_honour_retry_after_and_survive_503_and_dropped_connections(llama_server) -> None:
    proxy = Proxy(llama_server.url, faults=["429", "503", "drop"])
    try:
        start = time.monotonic()
        [[completion]] = backend_for(proxy.url).generate([make_request(QUESTION, Sampling(max_tokens=8, seed=1))])
        elapsed = time.monotonic() - start
    finally:
        proxy.stop()
    assert completion.error is None
    assert proxy.received == 4 and len(proxy.forwarded) == 1
    assert elapsed >= 1.0  # the 429's Retry-After: 1 was waited out


def test_a_request_that_keeps_failing_becomes_an_error_row_not_a_crash(llama_server, tmp_path: Path) -> None:
    proxy = Proxy(llama_server.url, faults=["503"] * 3)
    cache = CallCache(tmp_path / "cache.sqlite")
    stats = CallStats()
    try:
        [[completion]] = run_requests(
            backend_for(proxy.url, max_tries=3), [make_request(QUESTION, Sampling(max_tokens=8, seed=1))], cache, stats
        )
    finally:
        proxy.stop()
    assert completion.finish_reason == ERROR and completion.error.startswith("http_503")
    assert proxy.received == 3 and not proxy.forwarded  # exactly max_tries tries, then given up
    assert stats.failures == {"http_503": 1}
    assert len(cache) == 0  # failures are not cached: a rerun tries again


@pytest.mark.slow  # a real model (llama.cpp) or server
def test_local_backend_samples_continues_and_follows_a_schema() -> None:
    backend = LocalBackend()
    try:
        samples, [continued], [structured] = backend.generate([
            make_request(QUESTION, Sampling(max_tokens=24, seed=5), n=2),
            make_request(QUESTION + [{"role": "assistant", "content": PREFIX}], Sampling(max_tokens=10, seed=5),
                         continue_final=True),
            make_request([{"role": "user", "content": "2+3 as JSON"}], Sampling(max_tokens=200, seed=5),
                         json_schema=SCHEMA),
        ])
    finally:
        backend.close()
    assert len(samples) == 2 and all(s.error is None for s in samples)
    assert continued.error is None and continued.true_continuation
    assert structured.finish_reason == "stop", structured
    assert isinstance(json.loads(structured.text)["answer"], int)


@pytest.mark.slow  # a real model (llama.cpp) or server
def test_local_backend_reproduces_with_a_seed() -> None:
    backend = LocalBackend()
    try:
        request = make_request(QUESTION, Sampling(max_tokens=16, seed=11))
        assert backend.generate([request])[0][0].text == backend.generate([request])[0][0].text
    finally:
        backend.close()


# --- Gemini, against a local server speaking its REST shape -------------------------------------

def gemini_reply(path: str, body: dict) -> tuple[int, dict]:
    count = body.get("generationConfig", {}).get("candidateCount", 1)
    return 200, {
        "candidates": [
            {"content": {"role": "model", "parts": [{"text": f"answer {i} \\boxed{{5}}"}]}, "finishReason": "STOP",
             "index": i}
            for i in range(count)
        ],
        "usageMetadata": {"promptTokenCount": 11, "candidatesTokenCount": 6 * count, "totalTokenCount": 11 + 6 * count},
    }


@pytest.mark.slow  # a real model (llama.cpp) or server
def test_gemini_backend_speaks_the_rest_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    from intgen.backends.gemini import GeminiBackend

    server = JsonServer(gemini_reply)
    monkeypatch.setenv("GEMINI_API_KEY", "test-key-not-secret")
    try:
        backend = GeminiBackend("gemini-test", base_url=server.url, thinking_budget=0)
        sampled, continued, structured = backend.generate([
            make_request([{"role": "system", "content": "Be brief."}] + QUESTION, Sampling(max_tokens=30, seed=2), n=2),
            make_request(QUESTION + [{"role": "assistant", "content": PREFIX}], Sampling(max_tokens=10),
                         continue_final=True),
            make_request(QUESTION, Sampling(max_tokens=10), json_schema=SCHEMA),
        ])
    finally:
        server.stop()
    assert [c.text for c in sampled] == ["answer 0 \\boxed{5}", "answer 1 \\boxed{5}"]
    assert sampled[0].prompt_tokens == 11 and sum(c.completion_tokens for c in sampled) == 12
    assert continued[0].true_continuation is False  # Gemini cannot continue: said so on the row
    paths = [p for p, _, _ in server.requests]
    assert all(p.endswith("/models/gemini-test:generateContent") for p in paths)
    bodies = [b for _, b, _ in server.requests]  # sent concurrently: find each by its content
    first = next(b for b in bodies if "systemInstruction" in b)
    second = next(b for b in bodies if PREFIX in json.dumps(b))
    third = next(b for b in bodies if "responseMimeType" in b["generationConfig"])
    assert first["systemInstruction"]["parts"][0]["text"] == "Be brief."
    assert first["generationConfig"]["candidateCount"] == 2 and first["generationConfig"]["seed"] == 2
    # the SDK writes this field in snake_case; the REST API takes both spellings
    assert first["generationConfig"]["thinkingConfig"] in ({"thinkingBudget": 0}, {"thinking_budget": 0})
    assert second["contents"][-1]["role"] == "user" and PREFIX in second["contents"][-1]["parts"][0]["text"]
    assert third["generationConfig"]["responseMimeType"] == "application/json"
    assert third["generationConfig"]["responseJsonSchema"] == SCHEMA


@pytest.mark.slow  # a real model (llama.cpp) or server
def test_gemini_retries_on_429(monkeypatch: pytest.MonkeyPatch) -> None:
    from intgen.backends.gemini import GeminiBackend

    calls = {"n": 0}

    def flaky(path: str, body: dict) -> tuple[int, dict]:
        calls["n"] += 1
        if calls["n"] == 1:
            return 429, {"error": {"code": 429, "message": "slow down", "status": "RESOURCE_EXHAUSTED"}}
        return gemini_reply(path, body)

    server = JsonServer(flaky)
    monkeypatch.setenv("GEMINI_API_KEY", "test-key-not-secret")
    try:
        backend = GeminiBackend("gemini-test", base_url=server.url, backoff_initial_s=0.05)
        [[completion]] = backend.generate([make_request(QUESTION, Sampling(max_tokens=10))])
    finally:
        server.stop()
    assert completion.error is None and calls["n"] == 2


def test_all_continuations_arrive_from_a_server_that_ignores_n(proxy: Proxy, tmp_path: Path) -> None:
    # llama.cpp's server returns one choice whatever `n` is: M=8 must still give 8, and no failure
    messages = QUESTION + [{"role": "assistant", "content": PREFIX}]
    request = make_request(messages, Sampling(max_tokens=12, seed=5), n=8, continue_final=True)
    stats = CallStats()
    [completions] = run_requests(backend_for(proxy.url), [request], CallCache(tmp_path / "c.sqlite"), stats)
    assert len(completions) == 8 and all(c.error is None for c in completions) and not stats.failures
    sent = proxy.posts("/completions")
    assert [body["n"] for body in sent] == [8] + [1] * 7  # once seen to ignore n: one sample per request
    assert len({body["seed"] for body in sent}) == 8  # each with its own seed, so they differ


def test_max_tokens_is_cut_to_the_context_the_server_reports(llama_server, tmp_path: Path) -> None:
    proxy = Proxy(llama_server.url, max_tokens_limit=24)  # plays vLLM: 100 prompt + 24 completion tokens fit
    try:
        request = make_request(QUESTION, Sampling(max_tokens=4096, seed=3))
        stats = CallStats()
        [[completion]] = run_requests(backend_for(proxy.url), [request], CallCache(tmp_path / "c.sqlite"), stats)
        assert completion.error is None and not stats.failures
        assert [body["max_tokens"] for body in proxy.posts("/chat/completions")] == [24]  # refused ones never forwarded
    finally:
        proxy.stop()


@pytest.mark.slow  # a real model (llama.cpp) or server
def test_a_prompt_longer_than_the_context_is_too_long_not_a_failure(tmp_path: Path) -> None:
    from intgen.backends.base import TOO_LONG

    from servers import LlamaServer

    server = LlamaServer(tmp_path / "small.log", n_ctx=256)
    try:
        messages = QUESTION + [{"role": "assistant", "content": "I count: " + " ".join(str(i) for i in range(400))}]
        request = make_request(messages, Sampling(max_tokens=16, seed=1), n=2, continue_final=True)
        cache, stats = CallCache(tmp_path / "c.sqlite"), CallStats()
        [completions] = run_requests(backend_for(server.url), [request], cache, stats)
        assert [c.finish_reason for c in completions] == [TOO_LONG, TOO_LONG]
        assert all(c.error is None for c in completions) and not stats.failures
        assert len(cache) == 0  # not cached: a larger context later may serve it
    finally:
        server.stop()


@pytest.mark.parametrize("body, message", [
    (b'{"error": {"message": "This model\'s maximum context length is 2048 tokens", "type": "invalid"}}',
     "This model's maximum context length is 2048 tokens"),  # OpenAI, vLLM, llama.cpp
    (b'{"object": "error", "message": "prompt is too long", "code": 400}', "prompt is too long"),  # older vLLM
    (b'{"error": "model not found"}', "model not found"),
    (b"<html>502 Bad Gateway</html>", "<html>502 Bad Gateway</html>"),  # a proxy in front of the server
])
def test_error_messages_are_read_like_the_openai_client(body: bytes, message: str) -> None:
    from intgen.backends.openai_http import error_message

    assert error_message(body) == message


def test_proxies_come_from_the_environment_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from intgen.backends.openai_http import env_proxy

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
                 "http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert env_proxy("http://gpu1:8000/v1") is None
    monkeypatch.setenv("HTTP_PROXY", "http://proxy:3128")
    monkeypatch.setenv("ALL_PROXY", "http://all:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1,.cluster")
    assert env_proxy("http://gpu1:8000/v1") == "http://proxy:3128"
    assert env_proxy("https://api.openai.com/v1") == "http://all:3128"
    assert env_proxy("http://127.0.0.1:8000/v1") is None and env_proxy("http://node.cluster:8000/v1") is None


# Servers' 400 messages: the context overflows (context, prompt tokens) and those that only share its words.
OVERFLOWS = [
    ("This model's maximum context length is 4096 tokens. However, you requested 5000 tokens (4000 in the "
     "messages, 1000 in the completion). Please reduce the length of the messages or completion.", (4096, 4000)),
    ("Requested tokens (5000) exceed context window of 4096", (4096, 5000)),  # llama-cpp-python
    ("the request exceeds the available context size, try increasing it", (None, None)),  # llama.cpp's server
    ("The input (5000 tokens) is longer than the model's context length (4096 tokens).", (4096, 5000)),  # SGLang
    ("The input token count (1048577) exceeds the maximum number of tokens allowed (1048576).", (1048576, 1048577)),
    ("prompt is too long: 210000 tokens > 200000 maximum", (200000, 210000)),
    ("Daily token quota exceeded for this API key", None),
    ("n=2 exceeds the maximum number of choices", None),
    ("Rate limit exceeded: too many tokens per minute", None),
    ("Invalid 'messages': content too long for a name field", None),
]


@pytest.mark.parametrize(("message", "expected"), OVERFLOWS)
def test_only_a_context_overflow_is_too_long(message: str, expected) -> None:
    from intgen.backends.openai_http import context_overflow

    assert context_overflow(message, None) == expected


@pytest.mark.parametrize(("raw", "reason"), [
    ("stop", "stop"), (None, "stop"), ("eos", "stop"), ("end_turn", "stop"), ("STOP", "stop"),
    ("length", "length"), ("max_tokens", "length"), ("MAX_TOKENS", "length"), ("max_output_tokens", "length"),
    ("content_filter", "content_filter"),  # kept as it is, and warned of
])
def test_servers_words_for_a_finish_are_read_and_an_unknown_one_is_flagged(raw, reason, caplog) -> None:
    from intgen.backends import base

    base._warned_reasons.discard(str(raw))
    with caplog.at_level("WARNING", logger="intgen"):
        assert base.finish_reason(raw) == reason
    assert ("does not know" in caplog.text) == (reason not in ("stop", "length"))


def test_a_finish_reason_error_is_a_bad_reply() -> None:
    from intgen.backends.base import BadReply, finish_reason

    with pytest.raises(BadReply):
        finish_reason("error")


def test_cached_prompt_tokens_are_read_from_the_usage_the_server_reports(scripted) -> None:
    from intgen.config import EXAMPLE_PROBLEMS
    from intgen.io import load_problems

    from scripted import cached_tokens

    problem = load_problems(EXAMPLE_PROBLEMS)["problem"][0]
    backend = OpenAIBackend("scripted", base_url=scripted.url, continuation="chat")
    try:
        [[first, second]] = backend.generate(
            [make_request([{"role": "user", "content": problem}], Sampling(max_tokens=400, seed=1), n=2)])
    finally:
        backend.close()
    # vLLM's usage.prompt_tokens_details.cached_tokens, on the first choice as the prompt tokens are
    assert first.prompt_tokens > 0 and first.cached_prompt_tokens == cached_tokens(first.prompt_tokens) > 0
    assert second.prompt_tokens == second.cached_prompt_tokens == 0


def test_requests_sharing_a_prefix_go_to_one_server_unless_it_holds_more_than_its_share() -> None:
    from collections import Counter

    from intgen.backends.openai_http import Server, ServerPool

    servers = [Server(f"http://127.0.0.1:{8000 + i}/v1", session=None) for i in range(4)]  # type: ignore[arg-type]
    pool = ServerPool(servers)
    attempt = make_request([{"role": "user", "content": "Solve: 2+3"}], Sampling(seed=1))
    continuation = make_request([{"role": "user", "content": "Solve: 2+3"},
                                 {"role": "assistant", "content": "First, 2+3 is"}], continue_final=True)
    assert attempt.affinity() == continuation.affinity()  # the problem's prefix

    def pick(key: str | None = None) -> Server:  # a call picked and over
        server = pool.pick(key)
        if key is not None:
            pool.release(key)
        return server

    home = pick(attempt.affinity())
    assert all(pick(continuation.affinity()) is home for _ in range(5))
    # keys spread over the servers (rendezvous hashing)
    spread = Counter(pick(f"problem {i}").url for i in range(2000))
    assert len(spread) == 4 and min(spread.values()) > 350, spread
    # bounded load: a home server holding more than 1.25 times the mean in flight passes the call on
    home.in_flight = 10
    other = pick(attempt.affinity())
    assert other is not home
    for server in servers:  # every server as busy: the call goes home
        server.in_flight = 2
    assert pick(attempt.affinity()) is home
    # a key's calls in flight hold it where they went: a burst sharing a prefix is not split by the bound
    key = "problem burst"
    first = pool.pick(key)
    first.in_flight += 4  # over 1.25 times the mean, under 2 times
    assert pool.pick(key) is first
    pool.release(key)
    pool.release(key)  # none of the key in flight: placed afresh, and the loaded server passes it on
    assert pool.pick(key) is not first
    pool.release(key)
    first.in_flight -= 4
    # no key: the fewest in flight; a resting server is passed over
    for server, load in zip(servers, (3, 1, 2, 5)):
        server.in_flight = load
    assert pick() is servers[1]
    pool.failed(servers[1])
    assert pick() is servers[2] and pick(attempt.affinity()) is not servers[1]


@pytest.mark.slow  # servers
@pytest.mark.parametrize("status", [401, 404])
def test_a_server_that_refuses_what_the_others_serve_rests_and_its_calls_go_to_them(status: int) -> None:
    """One replica of several serving another model name (404) or holding another key (401): about itself, not the
    request. Its calls are retried on the others, so no row fails (prefix affinity would send the same problems to
    it on every rerun); with that server alone the call fails at once, not retried."""
    def answer(path: str, body: dict) -> tuple[int, dict]:
        reply = {"role": "assistant", "content": "So the answer is 12."}
        return 200, {"choices": [{"index": 0, "message": reply, "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 9, "completion_tokens": 5}}

    refusing = JsonServer(lambda path, body: (status, {"error": {"message": "The model `m` does not exist."}}))
    serving = JsonServer(answer)
    requests = [make_request([{"role": "user", "content": f"What is {k} + 12 - {k}?"}], Sampling(max_tokens=8))
                for k in range(12)]
    try:
        pooled = OpenAIBackend("m", base_url=f"{refusing.url}/v1,{serving.url}/v1", backoff_initial_s=0.01)
        answers = pooled.generate(requests)
        refused = len(refusing.requests)
        alone = OpenAIBackend("m", base_url=f"{refusing.url}/v1", backoff_initial_s=0.01).generate(requests[:1])
    finally:
        refusing.stop()
        serving.stop()
    assert refusing.requests and all(a[0].error is None and a[0].text == "So the answer is 12." for a in answers)
    assert len(serving.requests) == 12
    assert alone[0][0].error.startswith(f"http_{status}") and len(refusing.requests) == refused + 1  # one try


def test_a_window_ask_waits_for_all_its_requests_and_raises_the_first_failure() -> None:
    """One hand-off per ask: a failed request is raised only once the others are answered (their answers reach
    `on_done`, where the cache takes them), and an empty ask is answered at once."""
    import asyncio

    from intgen.backends.base import Completion
    from intgen.window import Window

    class Streaming:  # the streaming side of the backend protocol, no more: what the window needs
        kind, model, supports_continuation, reply_settings, window = "stub", "stub", False, {}, 8

        async def answer(self, request):  # noqa: ANN001, ANN202
            text = request.messages[-1][1]
            await asyncio.sleep(0.2 if text == "slow" else 0)
            if text == "bad":
                raise ValueError("a bad request")
            return [Completion(text, "stop")]

    window, arrived = Window(Streaming()), []
    try:
        asks = [make_request([{"role": "user", "content": text}], Sampling()) for text in ("bad", "slow", "fine")]
        with pytest.raises(ValueError, match="a bad request"):
            window.generate(asks, on_done=lambda index, completions: arrived.append(index))
        assert sorted(arrived) == [1, 2]
        assert window.generate([]) == []
        assert window.generate(asks[1:]) == [[Completion("slow", "stop")], [Completion("fine", "stop")]]
    finally:
        window.close()


def test_a_request_cancelled_once_given_room_hands_the_room_on() -> None:
    """A waiting request cancelled between being given room and taking it (the room goes to it as another
    request ends) gives the room back: the window does not shrink for good."""
    import asyncio

    from intgen.backends.base import Completion
    from intgen.window import Window

    class Streaming:
        kind, model, supports_continuation, reply_settings, window = "stub", "stub", False, {}, 1

        async def answer(self, request):  # noqa: ANN001, ANN202
            await asyncio.sleep(0.01)
            return [Completion(request.messages[-1][1], "stop")]

    def ask(text: str):  # noqa: ANN202
        return make_request([{"role": "user", "content": text}], Sampling())

    async def scenario() -> list[list[Completion]]:
        window = Window(Streaming(), loop=asyncio.get_running_loop())
        # the first request's answer is told after its room went to the second, before the second took it
        first = asyncio.ensure_future(window.agenerate([ask("first")], lambda index, completions: second.cancel()))
        second = asyncio.ensure_future(window.agenerate([ask("second")]))
        await first
        with pytest.raises(asyncio.CancelledError):
            await second
        return await asyncio.wait_for(window.agenerate([ask("third")]), timeout=5)

    assert asyncio.run(scenario()) == [[Completion("third", "stop")]]


@pytest.mark.parametrize("streams", [True, False], ids=["streaming", "in-process engine"])
def test_a_window_awaited_on_a_shared_loop_tells_each_answer_on_that_loop(streams: bool) -> None:
    """The driver's chunks await a window on the loop it shares (no thread of their own): answers come in order,
    `on_done` runs on the loop's thread (not an in-process engine's), and a failure is raised once the others
    are answered."""
    import asyncio
    import threading

    from intgen.backends.base import Completion
    from intgen.window import EventLoop, Window

    def reply(text: str) -> list[Completion]:
        if text == "bad":
            raise ValueError("a bad request")
        return [Completion(text, "stop")]

    class Streaming:
        kind, model, supports_continuation, reply_settings, window = "stub", "stub", False, {}, 8

        async def answer(self, request):  # noqa: ANN001, ANN202
            await asyncio.sleep(0.1 if request.messages[-1][1] == "slow" else 0)
            return reply(request.messages[-1][1])

    class InProcess:
        kind, model, supports_continuation, reply_settings = "stub", "stub", False, {}

        def generate(self, requests, on_done=None):  # noqa: ANN001, ANN202
            return [reply(r.messages[-1][1]) for r in requests]

    events = EventLoop("test-loop")
    window = Window(Streaming() if streams else InProcess(), loop=events.loop)
    told: list[tuple[int, str]] = []

    def on_done(index: int, completions: list) -> None:
        told.append((index, threading.current_thread().name))

    def ask(*texts: str) -> list[list[Completion]]:
        asks = [make_request([{"role": "user", "content": text}], Sampling()) for text in texts]
        return asyncio.run_coroutine_threadsafe(window.agenerate(asks, on_done), events.loop).result(timeout=10)

    try:
        assert ask("slow", "fine") == [[Completion("slow", "stop")], [Completion("fine", "stop")]]
        assert sorted(told) == [(0, "test-loop"), (1, "test-loop")]
        if streams:  # an in-process engine's batch fails whole: its requests are one call
            told.clear()
            with pytest.raises(ValueError, match="a bad request"):
                ask("bad", "slow")
            assert told == [(1, "test-loop")]
        assert ask() == []
    finally:
        window.close()
        events.close()


@pytest.mark.parametrize(("reasons", "expected"), [
    (["stop", "length"], ["stop", "length"]),
    (["stop", "abort"], ["error"]),  # an aborted sample: partial text, the request a failed call
    (["error"], ["error"]),  # vLLM's retryable internal error
    (["repetition"], ["repetition"]),  # not known: kept, neither finished nor truncated
])
def test_vllm_outputs_become_completions_by_their_finish_reason(reasons: list[str], expected: list[str]) -> None:
    """In-process vLLM's RequestOutput (its fields as vLLM names them) read without vLLM installed."""
    from types import SimpleNamespace

    from intgen.backends.vllm_engine import _completions

    output = SimpleNamespace(prompt_token_ids=[1, 2, 3], num_cached_tokens=2, outputs=[
        SimpleNamespace(text=f"partial {k}", finish_reason=reason, token_ids=[7] * (k + 1))
        for k, reason in enumerate(reasons)])
    completions = _completions(output)
    assert [c.finish_reason for c in completions] == expected
    if expected == ["error"]:
        assert completions[0].text == "" and completions[0].error
    else:
        assert completions[0].prompt_tokens == 3 and completions[0].cached_prompt_tokens == 2
        assert [c.completion_tokens for c in completions] == list(range(1, len(reasons) + 1))
