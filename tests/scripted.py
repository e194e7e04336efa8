"""A scripted OpenAI-compatible server on 127.0.0.1: the pipeline's every path, guaranteed.

SmolLM2's replies differ from one CPU to another, so a test whose premise is "a proposal is accepted" or "verify
sends a continuation" is a coin toss against it. This server speaks the same wire protocol as vLLM
(`/v1/models` with `max_model_len`, `/v1/chat/completions` with `n`, `seed` and `continue_final_message`,
`/v1/completions` with a rendered prompt) and answers from what each request asks:

- a solve request (the problem alone): an attempt in `steps` paragraphs whose step `error_step` adds wrong, so it
  ends in a wrong boxed answer;
- the proposer's first turn (the reference-guided solve): a correct solution;
- the proposer's critique: the JSON (or the release's tag block) naming that step, with an intervention that states
  no number;
- a continuation: the gold answer when its prefix holds the intervention, the wrong one otherwise (the baselines).

The attempt's shape (how many steps, which is wrong) follows `seed`, the request's own `seed` and the choice's
index, so a test run under several seeds walks different shapes. Token counts are characters / 4; a reply longer
than `max_tokens` is cut there with `finish_reason` "length", as a real engine does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
import time
from collections import Counter
from typing import Any

from servers import QuietHandler, reply, serve

INTERVENTION = ("Wait, adding those amounts in one go went wrong. I will add the quantities again one at a time, "
                "writing down each partial total, and then check the result against the question.")
WRONG_STEP = "Adding everything up in one go gives"
FIRST_TURN = "First, solve the problem yourself"
CRITIQUE = re.compile(r"Substep 1 to Substep (\d+)")


def tokens(text: str) -> int:
    return max(1, -(-len(text) // 4))


def cached_tokens(prompt_tokens: int) -> int:
    """The prompt tokens the scripted server says its prefix cache served."""
    return prompt_tokens // 2


def wrong_answer(gold: str, h: int) -> str:
    """A final answer math-verify grades wrong against `gold`."""
    return str(int(gold) + 1 + h % 5) if re.fullmatch(r"-?\d+", gold.strip()) else str(1000003 + h % 5)


class Script:
    """The scripted answers, without a server: `answer(path, body)` replies to one OpenAI-shaped request body.
    `answers` maps each problem's text to its gold answer; with `fixes` False no continuation reaches the answer,
    so nothing is kept; `intervention` is what its proposals say (another text than INTERVENTION never leads to
    the answer); `fix_rate`: the share of an intervention's continuations that reach it (by each sample's hash);
    `kinds` counts the requests by what they asked."""

    def __init__(self, answers: dict[str, str], seed: int = 0, model: str = "scripted", max_model_len: int = 32768,
                 fixes: bool = True, intervention: str = INTERVENTION, fix_rate: float = 1.0) -> None:
        self.answers = sorted(answers.items(), key=lambda item: -len(item[0]))  # the longest match wins
        self.seed, self.model, self.max_model_len, self.fixes = seed, model, max_model_len, fixes
        self.intervention, self.fix_rate = intervention, fix_rate
        self.kinds: Counter[str] = Counter()
        self.lock = threading.Lock()

    # --- what a request asks, and the scripted reply -----------------------------------------------------

    def answer(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        chat = path.endswith("/chat/completions")
        if not chat and not path.endswith("/completions"):
            return 404, {"error": {"message": f"no route {path}"}}
        messages = body.get("messages") or []
        if chat:
            text = "\n".join(str(m.get("content") or "") for m in messages)
            continuing = bool(messages) and messages[-1].get("role") == "assistant"
            prefix = messages[-1].get("content") or "" if continuing else ""
        else:
            text = prefix = str(body.get("prompt") or "")
            continuing = True
        gold = next((answer for problem, answer in self.answers if problem in text), None)
        if gold is None:
            return 400, {"error": {"message": "the scripted server knows no problem in this request",
                                   "type": "BadRequestError"}}
        n = int(body.get("n") or 1)
        last_user = next((str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"), text)
        if continuing:
            kind = "continuation"
        elif CRITIQUE.search(last_user):
            kind = "critique"
        elif FIRST_TURN in last_user:
            kind = "first_turn"
        else:
            kind = "solve"
        with self.lock:
            self.kinds[kind] += 1
        choices, prompt_tokens, completion_tokens = [], tokens(text), 0
        for index in range(n):
            h = int.from_bytes(hashlib.sha256(f"{self.seed}|{body.get('seed')}|{index}|{text}".encode()).digest()[:8])
            content = self.reply_text(kind, gold, h, last_user, prefix, body)
            limit = body.get("max_tokens") or body.get("max_completion_tokens")
            finish = "stop"
            if isinstance(limit, int) and tokens(content) > limit:
                content, finish = content[: 4 * limit], "length"
            completion_tokens += tokens(content)
            if chat:
                choices.append({"index": index, "message": {"role": "assistant", "content": content},
                                "finish_reason": finish})
            else:
                choices.append({"index": index, "text": content, "finish_reason": finish})
        # as vLLM with prefix caching says it: half of every prompt served from its cache
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens,
                 "prompt_tokens_details": {"cached_tokens": cached_tokens(prompt_tokens)}}
        return 200, {"id": f"scripted-{kind}", "object": "chat.completion" if chat else "text_completion",
                     "model": self.model, "choices": choices, "usage": usage}

    def reply_text(self, kind: str, gold: str, h: int, last_user: str, prefix: str, body: dict[str, Any]) -> str:
        wrong = wrong_answer(gold, h)
        if kind == "solve":
            return self.attempt(wrong, h)
        if kind == "first_turn":
            return f"Following the reference solution step by step, the answer is $\\boxed{{{gold}}}$."
        if kind == "critique":
            found = re.search(r"Substep (\d+): " + re.escape(WRONG_STEP), last_user)
            step = int(found.group(1)) if found else 0
            fields = {"verification": f"Substep {step} adds the amounts wrongly; nothing later notices it.",
                      "draft": "Redo the sum one quantity at a time.",
                      "self_check": "Q1 No. Q2 No. Q3 No.",
                      "error_step": step, "intervention": self.intervention if step else ""}
            if body.get("response_format"):
                return json.dumps(fields)
            return (f"{fields['verification']}\n<error_step>{step}</error_step>\n"
                    f"<intervention>{fields['intervention']}</intervention>")
        # a continuation: the intervention leads to the answer, anything else to a wrong one
        if self.fixes and INTERVENTION in prefix and h % 1000 < self.fix_rate * 1000:
            return f"\n\nDoing it that way, the total comes out right.\n\nSo the answer is $\\boxed{{{gold}}}$."
        return f"\n\nContinuing from here.\n\nSo the answer is $\\boxed{{{wrong}}}$."

    @staticmethod
    def attempt(wrong: str, h: int) -> str:
        """3 to 6 steps, one of which (never the first) adds wrong; the last states the wrong answer."""
        count = 3 + h % 4
        error = 2 + (h >> 8) % (count - 1)  # 2..count
        steps = [f"We read the problem carefully and note every quantity it gives us (part {i})."
                 for i in range(1, count + 1)]
        steps[0] = f"Let me work through this problem one quantity at a time (draft {h % 10007})."  # attempts differ
        steps[error - 1] = f"{WRONG_STEP} {wrong}, and we carry that total forward."
        steps.append(f"So the answer is $\\boxed{{{wrong}}}$.")
        return "\n\n".join(steps)


class ScriptedServer(Script):
    """The script (see the module docstring) behind the OpenAI API on 127.0.0.1; `delay` holds every reply that
    long (a kill test needs requests in flight); `in_flight` counts the requests held, continuations (verify's)
    and other chats (sample's and propose's)."""

    def __init__(self, answers: dict[str, str], seed: int = 0, delay: float = 0.0, model: str = "scripted",
                 max_model_len: int = 32768, fixes: bool = True, intervention: str = INTERVENTION,
                 one_at_a_time: bool = False) -> None:
        super().__init__(answers, seed, model, max_model_len, fixes, intervention)
        self.delay = delay
        self.slot = threading.Lock() if one_at_a_time else None  # one slot: the others wait in its queue
        self.in_flight: Counter[str] = Counter()  # requests being answered: continuations and other chats
        server = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    data = [{"id": server.model, "object": "model", "owned_by": "tests",
                             "max_model_len": server.max_model_len}]
                    reply(self, 200, json.dumps({"object": "list", "data": data}).encode())
                else:
                    reply(self, 404, json.dumps({"error": {"message": f"no route {self.path}"}}).encode())

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                messages = body.get("messages") or [{}]
                continued = not self.path.endswith("/chat/completions") or messages[-1].get("role") == "assistant"
                kind = "continuation" if continued else "chat"
                with server.lock:
                    server.in_flight[kind] += 1
                try:
                    with server.slot or contextlib.nullcontext():
                        if server.delay:
                            time.sleep(server.delay)
                        status, answer = server.answer(self.path, body)
                    reply(self, status, json.dumps(answer).encode())
                finally:
                    with server.lock:
                        server.in_flight[kind] -= 1

        self.server, url = serve(Handler)
        self.url = url + "/v1"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def answers_of(*paths: object) -> dict[str, str]:
    """problem text -> gold answer, for every problem of these problem files (as intgen reads them)."""
    from intgen.io import load_problems

    answers: dict[str, str] = {}
    for path in paths:
        frame = load_problems(path)
        answers |= dict(zip(frame["problem"], frame["answer"]))
    return answers


def backend_args(url: str) -> list[str]:
    """The options that point an intgen command at a scripted server (vLLM's chat continuation)."""
    return ["--backend", "openai", "--model", "scripted", "--base-url", url, "--continuation", "chat"]
