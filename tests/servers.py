"""Real local servers for the tests: llama.cpp's OpenAI-compatible server, a fault-injecting recording
proxy in front of it, and a server speaking the Gemini REST shape (Google is out of reach here)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smollm2_gguf() -> Path:
    from intgen.backends.local import default_gguf

    return default_gguf()


class QuietHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive (as real servers speak it), no access log on stderr."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass


class LoopbackServer(ThreadingHTTPServer):
    request_queue_size = 1024  # a client with hundreds of requests in flight connects at once (the default is 5)
    daemon_threads = True


def serve(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, str]:
    """Start `handler` on a free loopback port in a daemon thread; returns the server and its base URL."""
    server = LoopbackServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def reply(handler: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str] | None = None) -> None:
    handler.send_response(status)
    for name, value in {"content-type": "application/json", **(headers or {})}.items():
        handler.send_header(name, value)
    handler.send_header("content-length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


class LlamaServer:
    """`python -m llama_cpp.server` with the SmolLM2 GGUF on a free loopback port; stopped by PID."""

    def __init__(self, log_path: Path, n_ctx: int = 4096) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log = log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf()), "--host", "127.0.0.1",
             "--port", str(self.port), "--n_ctx", str(n_ctx), "--model_alias", "smollm2"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.process.returncode}; see {log_path}")
            try:
                urllib.request.urlopen(self.url + "/models", timeout=1).read()
                return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"llama_cpp.server did not start in 120 s; see {log_path}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


class Proxy:
    """An HTTP proxy on a free loopback port that records every request it forwards upstream and can
    answer some requests itself with faults: 429 with Retry-After, 503, or a dropped connection.

    `faults` is consumed in order, one entry per incoming request ("429", "500", "503", "drop", "hang", or
    None to forward); `fault_every` answers every N-th request with a fault instead; `fail_if(path, body)`
    picks a fault (or None) from what a request asks. `answered` counts the answers forwarded back.
    `max_tokens_limit` plays a vLLM server with a small context: a request asking for more completion tokens gets
    vLLM's 400."""

    PROMPT_TOKENS = 100  # what the played vLLM says the prompt holds

    def __init__(self, upstream: str, faults: list[str | None] | None = None, fault_every: int = 0,
                 max_tokens_limit: int | None = None,
                 fail_if: Callable[[str, dict[str, Any]], str | None] | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.faults = list(faults or [])
        self.fault_every = fault_every
        self.max_tokens_limit = max_tokens_limit
        self.fail_if = fail_if
        self.answered = 0
        self.answered_paths: list[str] = []
        self.forwarded: list[tuple[str, dict[str, Any]]] = []  # (path, body) that reached the server
        self.received = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                self._handle(b"")

            def do_POST(self) -> None:
                self._handle(self.rfile.read(int(self.headers.get("content-length", 0))))

            def _handle(self, body: bytes) -> None:
                with proxy.lock:
                    proxy.received += 1
                    fault = proxy.faults.pop(0) if proxy.faults else None
                    if proxy.fault_every and proxy.received % proxy.fault_every == 0:
                        fault = "429" if (proxy.received // proxy.fault_every) % 2 else "503"
                    if fault is None and proxy.fail_if is not None and self.command == "POST":
                        fault = proxy.fail_if(self.path, json.loads(body or b"{}"))
                if fault == "hang":  # accept, then never answer
                    time.sleep(3600)
                    return
                if fault == "drop":
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if fault in ("429", "500", "503"):
                    payload = json.dumps({"error": {"message": f"injected {fault}", "type": "injected"}}).encode()
                    reply(self, int(fault), payload, {"Retry-After": "1"} if fault == "429" else None)
                    return
                asked = json.loads(body or b"{}").get("max_tokens") if self.command == "POST" else None
                if proxy.max_tokens_limit is not None and isinstance(asked, int) and asked > proxy.max_tokens_limit:
                    prompt, context = Proxy.PROMPT_TOKENS, Proxy.PROMPT_TOKENS + proxy.max_tokens_limit
                    message = (f"This model's maximum context length is {context} tokens. However, you requested "
                               f"{prompt + asked} tokens ({prompt} in the messages, {asked} in the completion). "
                               "Please reduce the length of the messages or completion.")
                    reply(self, 400, json.dumps({"object": "error", "message": message, "type": "BadRequestError",
                                                 "param": None, "code": 400}).encode())
                    return
                with proxy.lock:
                    proxy.in_flight += 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                    if self.command == "POST":
                        proxy.forwarded.append((self.path, json.loads(body or b"{}")))
                try:
                    request = urllib.request.Request(
                        proxy.upstream + self.path.removeprefix("/v1"), data=body or None, method=self.command,
                        headers={"content-type": "application/json"},
                    )
                    try:
                        with urllib.request.urlopen(request, timeout=600) as upstream:
                            status, data = upstream.status, upstream.read()
                    except urllib.error.HTTPError as exc:
                        status, data = exc.code, exc.read()
                finally:
                    with proxy.lock:
                        proxy.in_flight -= 1
                reply(self, status, data)
                with proxy.lock:
                    proxy.answered += 1
                    proxy.answered_paths.append(self.path)

        self.server, url = serve(Handler)
        self.url = url + "/v1"

    def posts(self, suffix: str = "") -> list[dict[str, Any]]:
        return [body for path, body in self.forwarded if path.endswith(suffix)]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class JsonServer:
    """A tiny HTTP server whose POST answers come from `respond(path, body) -> (status, json)`; records requests."""

    def __init__(self, respond: Callable[[str, dict[str, Any]], tuple[int, dict[str, Any]]]) -> None:
        self.requests: list[tuple[str, dict[str, Any], dict[str, str]]] = []
        server = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                server.requests.append((self.path, body, dict(self.headers)))
                status, answer = respond(self.path, body)
                reply(self, status, json.dumps(answer).encode())

        self.server, self.url = serve(Handler)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class HubServer:
    """A local server speaking the Hugging Face Hub API calls that `intgen push` makes: create a repo,
    create a branch, preupload (every file "regular"), commit (ndjson with base64 files). Files land in
    `self.repos[repo_id][revision][path]`. `fail_first` answers the first request to each named endpoint
    with a 503, to exercise retries."""

    def __init__(self, fail_first: tuple[str, ...] = ()) -> None:
        import base64

        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}
        self.calls: list[tuple[str, str]] = []  # (endpoint name, path)
        self.authorizations: list[str | None] = []
        self.private: dict[str, bool] = {}
        pending_failures = set(fail_first)
        server = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                path = self.path.split("?")[0]
                server.authorizations.append(self.headers.get("authorization"))
                if path == "/api/validate-yaml":
                    server.calls.append(("validate-yaml", path))
                    status, answer = server.validate_card(json.loads(body))
                    reply(self, status, json.dumps(answer).encode())
                    return
                if path == "/api/repos/create":
                    name = "create"
                elif "/preupload/" in path:
                    name = "preupload"
                elif "/commit/" in path:
                    name = "commit"
                elif "/branch/" in path:
                    name = "branch"
                else:
                    reply(self, 404, json.dumps({"error": f"unknown endpoint {path}"}).encode())
                    return
                server.calls.append((name, path))
                if name in pending_failures:
                    pending_failures.discard(name)
                    reply(self, 503, json.dumps({"error": "injected 503"}).encode())
                    return
                if name == "create":
                    data = json.loads(body)
                    repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
                    server.repos.setdefault(repo_id, {"main": {}})
                    server.private[repo_id] = data.get("visibility") == "private" or data.get("private") is True
                    reply(self, 200, json.dumps({"url": f"http://{self.headers['host']}/datasets/{repo_id}",
                                                 "name": repo_id}).encode())
                    return
                prefix, _, revision = path.removeprefix("/api/datasets/").rpartition(f"/{name}/")
                repo_id = prefix
                if name == "branch":
                    server.repos.setdefault(repo_id, {"main": {}}).setdefault(revision, {})
                    reply(self, 200, b"{}")
                elif name == "preupload":
                    files = json.loads(body)["files"]
                    answer = {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                        for f in files]}
                    reply(self, 200, json.dumps(answer).encode())
                else:
                    target = server.repos.setdefault(repo_id, {"main": {}}).setdefault(revision, {})
                    for line in body.decode().splitlines():
                        entry = json.loads(line)
                        if entry["key"] == "file":
                            target[entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
                    answer = {"commitUrl": f"http://{self.headers['host']}/datasets/{repo_id}/commit/abc123",
                              "commitOid": "abc123"}
                    reply(self, 200, json.dumps(answer).encode())

        self.server, self.url = serve(Handler)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def validate_card(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """What the Hub checks of a dataset card's YAML that this project relies on."""
        import yaml

        content = body.get("content", "")
        if body.get("repoType") != "dataset" or not content.startswith("---\n"):
            return 400, {"errors": [{"message": "expected a dataset card with YAML front matter"}]}
        meta = yaml.safe_load(content.split("---\n")[1])
        configs = meta.get("configs") if isinstance(meta, dict) else None
        if not configs or not all("config_name" in c and c.get("data_files") for c in configs):
            return 400, {"errors": [{"message": "configs must name each config and its data_files"}]}
        return 200, {"warnings": []}
