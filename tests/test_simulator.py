"""Tests of the vLLM-compatible simulator runtime (gateway/simulator.py), run as a real process.

The simulator stands in for vLLM in every other test, so it is checked here at the HTTP boundary:
response shapes, stream/non-stream agreement, determinism, errors, metrics, sleep mode and the
injected faults; plus one run of its Docker image.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.simulator import parse_config

ROOT = Path(__file__).resolve().parents[1]
MODEL = "sim-model"
ALIAS = "sim-alias"
SIM_IMAGE = "llm-gateway-simulator:test"
SHA_LABEL = "org.llm-gateway.simulator-sha256"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:port."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class SimProcess:
    """A simulator subprocess whose output goes to a log file (a pipe could fill and block it)."""

    def __init__(self, log_dir: Path, args: list[str], model_args: list[str] | None = None) -> None:
        self.port = free_port()
        self.log_path = log_dir / f"simulator-{self.port}.log"
        self._log = self.log_path.open("wb")
        model_args = ["--model", MODEL] if model_args is None else model_args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.simulator", *model_args,
             "--host", "127.0.0.1", "--port", str(self.port), *args],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT)

    @property
    def url(self) -> str:
        """Base URL of the simulator."""
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        """Everything the process printed so far."""
        return self.log_path.read_text()

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Block until GET /health answers 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"simulator exited {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        raise AssertionError(f"simulator not healthy after {timeout}s:\n{self.output()}")

    def stop(self) -> None:
        """Terminate the process (if still running) and close the log."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProcess]:
    """One shared simulator for the tests that do not change its state."""
    process = SimProcess(tmp_path_factory.mktemp("sim"),
                         ["--served-model-name", MODEL, ALIAS, "--unknown-vllm-flag", "7"])
    try:
        process.wait_healthy()
        yield process
    finally:
        process.stop()


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Any]:
    """Start dedicated simulators (for fault injection); all are stopped after the test."""
    started: list[SimProcess] = []

    def _launch(*args: str, model_args: list[str] | None = None,
                wait: bool = True) -> SimProcess:
        process = SimProcess(tmp_path, list(args), model_args)
        started.append(process)
        if wait:
            process.wait_healthy()
        return process

    yield _launch
    for process in started:
        process.stop()


@pytest.fixture
async def http() -> Any:
    """A client session for one test."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def post(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    """POST a JSON body; return status and decoded JSON."""
    async with http.post(url, json=body) as response:
        return response.status, await response.json(content_type=None)


async def stream(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[Any]:
    """POST a streaming request; return the decoded SSE events ("[DONE]" stays a string)."""
    events: list[Any] = []
    async with http.post(url, json={**body, "stream": True}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        raw = await response.text()
    assert raw.endswith("\n\n")
    for block in raw.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def chat_body(**extra: Any) -> dict[str, Any]:
    """A small chat request."""
    return {"model": MODEL, "messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Say something nice"}],
            **extra}


# ---------------------------------------------------------------------------------------------
# Basic endpoints
# ---------------------------------------------------------------------------------------------


async def test_health_and_models(sim: SimProcess, http: aiohttp.ClientSession) -> None:
    async with http.get(sim.url + "/health") as response:
        assert response.status == 200
        assert await response.read() == b""
    async with http.get(sim.url + "/no/such/route") as response:
        assert response.status == 404
        assert await response.json() == {"detail": "Not Found"}  # FastAPI's shape
    async with http.get(sim.url + "/v1/models") as response:
        assert response.status == 200
        models = await response.json()
    assert models["object"] == "list"
    assert [card["id"] for card in models["data"]] == [MODEL, ALIAS]
    for card in models["data"]:
        assert card["object"] == "model"
        assert card["owned_by"] == "vllm"
        assert card["root"] == MODEL
        assert card["parent"] is None
        assert card["max_model_len"] == 2048
        assert isinstance(card["created"], int)
    # The unknown option was ignored, and said so once.
    assert sim.output().count("ignoring unrecognised arguments: --unknown-vllm-flag 7") == 1


async def test_completion_shape_and_stream_agree(sim: SimProcess,
                                                 http: aiohttp.ClientSession) -> None:
    body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 7}
    status, result = await post(http, sim.url + "/v1/completions", body)
    assert status == 200
    assert result["object"] == "text_completion"
    assert result["id"].startswith("cmpl-")
    assert result["model"] == MODEL
    [choice] = result["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["finish_reason"] == "length" and choice["stop_reason"] is None
    assert len(choice["text"].split()) == 7
    assert result["usage"] == {"prompt_tokens": 4, "completion_tokens": 7, "total_tokens": 11,
                               "prompt_tokens_details": None, "completion_tokens_details": None}

    events = await stream(http, sim.url + "/v1/completions",
                          {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    token_chunks = events[:-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 4, "completion_tokens": 7,
                                    "total_tokens": 11}
    assert len(token_chunks) == 7  # one token per chunk
    for chunk in token_chunks:
        assert chunk["object"] == "text_completion"
        assert "usage" not in chunk  # vLLM serializes chunks with exclude_unset
    assert "".join(c["choices"][0]["text"] for c in token_chunks) == choice["text"]
    assert [c["choices"][0]["finish_reason"] for c in token_chunks] == [None] * 6 + ["length"]
    assert len({c["id"] for c in events[:-1]}) == 1


async def test_chat_shape_and_stream_agree(sim: SimProcess, http: aiohttp.ClientSession) -> None:
    body = chat_body(max_completion_tokens=5)
    status, result = await post(http, sim.url + "/v1/chat/completions", body)
    assert status == 200
    assert result["object"] == "chat.completion"
    assert result["id"].startswith("chatcmpl-")
    [choice] = result["choices"]
    assert choice["message"]["role"] == "assistant"
    content = choice["message"]["content"]
    assert len(content.split()) == 5 and content == content.strip()
    assert choice["finish_reason"] == "length"
    # Whitespace words plus a fixed overhead per message and for the reply primer.
    prompt_tokens = result["usage"]["prompt_tokens"]
    assert prompt_tokens == 2 + 3 + 2 * 4 + 3
    assert result["usage"]["completion_tokens"] == 5
    assert result["usage"]["total_tokens"] == prompt_tokens + 5

    events = await stream(http, sim.url + "/v1/chat/completions",
                          {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    first, *tokens, finish, usage_chunk = events[:-1]
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None}]
    assert all("usage" not in chunk for chunk in [first, *tokens, finish])
    assert finish["choices"][0]["finish_reason"] == "length"
    streamed = "".join(c["choices"][0]["delta"]["content"] for c in [*tokens, finish])
    assert streamed == content
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 5
    assert usage_chunk["usage"]["prompt_tokens"] == prompt_tokens

    # Without include_usage there is no usage chunk.
    plain = await stream(http, sim.url + "/v1/chat/completions", body)
    assert plain[-1] == "[DONE]"
    assert all(event["choices"] for event in plain[:-1])
    assert all("usage" not in event for event in plain[:-1])


async def test_served_alias_is_echoed(sim: SimProcess, http: aiohttp.ClientSession) -> None:
    status, result = await post(http, sim.url + "/v1/chat/completions",
                                {**chat_body(max_tokens=2), "model": ALIAS})
    assert status == 200
    assert result["model"] == ALIAS


async def test_max_tokens_and_default_length(sim: SimProcess, http: aiohttp.ClientSession) -> None:
    status, result = await post(http, sim.url + "/v1/chat/completions", chat_body())
    assert status == 200
    # No max_tokens: --sim-output-tokens (16) tokens, then a natural (EOS) stop.
    assert result["usage"]["completion_tokens"] == 16
    assert result["choices"][0]["finish_reason"] == "stop"
    status, result = await post(http, sim.url + "/v1/completions",
                                {"model": MODEL, "prompt": "hi", "max_tokens": 40})
    assert result["usage"]["completion_tokens"] == 40
    assert result["choices"][0]["finish_reason"] == "length"
    # The shorter output is a prefix of the longer one: tokens do not depend on the limit.
    status, short = await post(http, sim.url + "/v1/completions",
                               {"model": MODEL, "prompt": "hi", "max_tokens": 3})
    assert result["choices"][0]["text"].startswith(short["choices"][0]["text"])


async def test_stop_strings_truncate(sim: SimProcess, http: aiohttp.ClientSession) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 12, "seed": 3}
    _, full = await post(http, sim.url + "/v1/completions", body)
    words = full["choices"][0]["text"].split()
    stop_word = words[5]
    expected = full["choices"][0]["text"][:full["choices"][0]["text"].index(" " + stop_word)]

    for stop in (" " + stop_word, [" not-a-word", " " + stop_word]):
        _, result = await post(http, sim.url + "/v1/completions", {**body, "stop": stop})
        [choice] = result["choices"]
        assert choice["text"] == expected
        assert choice["finish_reason"] == "stop"
        assert choice["stop_reason"] == " " + stop_word
        assert result["usage"]["completion_tokens"] == words.index(stop_word) + 1

    events = await stream(http, sim.url + "/v1/completions",
                          {**body, "stop": " " + stop_word,
                           "stream_options": {"include_usage": True}})
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == expected
    assert events[-3]["choices"][0]["finish_reason"] == "stop"
    assert events[-2]["usage"]["completion_tokens"] == words.index(stop_word) + 1


async def test_n_choices(sim: SimProcess, http: aiohttp.ClientSession) -> None:
    status, result = await post(http, sim.url + "/v1/chat/completions",
                                chat_body(n=3, max_tokens=4, temperature=0.8))
    assert status == 200
    assert [c["index"] for c in result["choices"]] == [0, 1, 2]
    assert len({c["message"]["content"] for c in result["choices"]}) == 3  # sampled: differ
    assert result["usage"]["completion_tokens"] == 12

    events = await stream(http, sim.url + "/v1/chat/completions",
                          chat_body(n=3, max_tokens=4, temperature=0.8))
    for choice in result["choices"]:
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]
                       if e["choices"][0]["index"] == choice["index"])
        assert text == choice["message"]["content"]

    _, greedy = await post(http, sim.url + "/v1/chat/completions",
                           chat_body(n=2, max_tokens=4, temperature=0))
    assert greedy["choices"][0]["message"] == greedy["choices"][1]["message"]


async def test_seed_determinism(sim: SimProcess, http: aiohttp.ClientSession) -> None:
    async def text(**extra: Any) -> str:
        _, result = await post(http, sim.url + "/v1/chat/completions",
                               chat_body(max_tokens=20, **extra))
        return str(result["choices"][0]["message"]["content"])

    assert await text(seed=1) == await text(seed=1)
    assert await text(seed=1) != await text(seed=2)
    assert await text() == await text()  # deterministic without a seed too
    _, other = await post(http, sim.url + "/v1/chat/completions",
                          {**chat_body(max_tokens=20),
                           "messages": [{"role": "user", "content": "Something else"}]})
    assert other["choices"][0]["message"]["content"] != await text()


async def test_completion_logprobs(sim: SimProcess, http: aiohttp.ClientSession) -> None:
    body = {"model": MODEL, "prompt": "Count with me", "max_tokens": 6, "logprobs": 2}
    _, result = await post(http, sim.url + "/v1/completions", body)
    [choice] = result["choices"]
    logprobs = choice["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(logprobs["tokens"]) == 6
    assert "".join(logprobs["tokens"]) == choice["text"]
    offsets = [sum(len(t) for t in logprobs["tokens"][:i]) for i in range(6)]
    assert logprobs["text_offset"] == offsets
    for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"],
                                   logprobs["top_logprobs"], strict=False):
        assert logprob <= 0
        assert top[token] == logprob
        assert 1 <= len(top) <= 3
        assert max(top.values()) == logprob

    events = await stream(http, sim.url + "/v1/completions", body)
    streamed = [e["choices"][0]["logprobs"] for e in events[:-1]]
    assert [s["tokens"][0] for s in streamed] == logprobs["tokens"]
    assert [s["text_offset"][0] for s in streamed] == logprobs["text_offset"]
    assert [s["token_logprobs"][0] for s in streamed] == logprobs["token_logprobs"]


async def test_chat_logprobs(sim: SimProcess, http: aiohttp.ClientSession) -> None:
    body = chat_body(max_tokens=4, logprobs=True, top_logprobs=3)
    _, result = await post(http, sim.url + "/v1/chat/completions", body)
    [choice] = result["choices"]
    content = choice["logprobs"]["content"]
    assert len(content) == 4
    assert "".join(entry["token"] for entry in content) == choice["message"]["content"]
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        for top in entry["top_logprobs"]:
            assert set(top) == {"token", "logprob", "bytes"}
            assert top["logprob"] <= entry["logprob"]

    events = await stream(http, sim.url + "/v1/chat/completions", body)
    streamed = [entry for e in events[1:-1] for entry in e["choices"][0]["logprobs"]["content"]]
    assert streamed == content

    _, plain = await post(http, sim.url + "/v1/chat/completions", chat_body(max_tokens=2))
    assert plain["choices"][0]["logprobs"] is None


async def test_json_response_format(sim: SimProcess, http: aiohttp.ClientSession) -> None:
    _, result = await post(http, sim.url + "/v1/chat/completions",
                           chat_body(response_format={"type": "json_object"}))
    content = result["choices"][0]["message"]["content"]
    assert isinstance(json.loads(content), dict)
    assert result["choices"][0]["finish_reason"] == "stop"

    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "age": {"type": "integer"}}}
    _, result = await post(http, sim.url + "/v1/chat/completions",
                           chat_body(response_format={"type": "json_schema", "json_schema": {
                               "name": "person", "schema": schema}}))
    value = json.loads(result["choices"][0]["message"]["content"])
    assert isinstance(value["name"], str) and isinstance(value["age"], int)


async def test_errors(sim: SimProcess, http: aiohttp.ClientSession) -> None:
    status, body = await post(http, sim.url + "/v1/chat/completions",
                              {**chat_body(), "model": "nope"})
    assert status == 404
    assert body == {"error": {"message": f"The model `nope` does not exist. Valid aliases: {MODEL}, {ALIAS}.",
                              "type": "NotFoundError", "param": "model", "code": 404}}

    bad_bodies: list[tuple[str, Any]] = [
        ("/v1/chat/completions", {"model": MODEL}),  # no messages
        ("/v1/chat/completions", chat_body(max_tokens="ten")),
        ("/v1/chat/completions", chat_body(messages="hello")),
        ("/v1/chat/completions", chat_body(n=0)),
        ("/v1/chat/completions", chat_body(stream_options={"include_usage": True})),
        ("/v1/chat/completions", [1, 2]),
        ("/v1/completions", {"model": MODEL}),  # no prompt
        ("/v1/completions", {"model": MODEL, "prompt": 42}),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": 5}),
        ("/v1/completions", {"model": MODEL, "prompt": "word " * 3000}),  # > max model len
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 5000}),
    ]
    for path, bad in bad_bodies:
        status, body = await post(http, sim.url + path, bad)
        assert status == 400, (path, bad, body)
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["code"] == 400 and body["error"]["message"]

    async with http.post(sim.url + "/v1/completions", data=b"{not json",
                         headers={"Content-Type": "application/json"}) as response:
        assert response.status == 400
        # vLLM answers request-model validation failures with type "Bad Request" and the location.
        error = (await response.json())["error"]
        assert error["type"] == "Bad Request" and error["param"] == "body.0"
    status, body = await post(http, sim.url + "/v1/completions",
                              {"model": MODEL, "prompt": "word " * 3000})
    assert "maximum context length is 2048 tokens" in body["error"]["message"]


async def test_metrics(sim: SimProcess, http: aiohttp.ClientSession) -> None:
    await post(http, sim.url + "/v1/completions",
               {"model": MODEL, "prompt": "one two three", "max_tokens": 2})
    async with http.get(sim.url + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:prompt_tokens", "vllm:generation_tokens",
                 "vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                 "vllm:request_success"):
        assert name in families, name
    assert families["vllm:time_to_first_token_seconds"].type == "histogram"
    assert families["vllm:prompt_tokens"].type == "counter"
    [prompt] = families["vllm:prompt_tokens"].samples
    assert prompt.labels["model_name"] == MODEL
    assert prompt.value >= 3
    [generation] = families["vllm:generation_tokens"].samples
    assert generation.value >= 2
    counts = [s.value for s in families["vllm:e2e_request_latency_seconds"].samples
              if s.name.endswith("_count")]
    assert counts and counts[0] >= 1


# ---------------------------------------------------------------------------------------------
# Sleep mode and fault injection (each on its own process)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_sleep_and_wake(launch: Any, http: aiohttp.ClientSession) -> None:
    sim = launch("--sim-sleep-delay", "0.1", "--sim-wake-delay", "0.1")
    async with http.get(sim.url + "/is_sleeping") as response:
        assert await response.json() == {"is_sleeping": False}
    async with http.post(sim.url + "/sleep?level=1") as response:
        assert response.status == 200
    async with http.get(sim.url + "/is_sleeping") as response:
        assert await response.json() == {"is_sleeping": True}

    request = asyncio.ensure_future(post(http, sim.url + "/v1/chat/completions",
                                         chat_body(max_tokens=3)))
    try:
        # Asleep, the request waits: it cannot finish before the wake-up below.
        waiting = 0.0
        for _ in range(500):
            async with http.get(sim.url + "/metrics") as response:
                metrics = await response.text()
            families = {f.name: f for f in text_string_to_metric_families(metrics)}
            waiting = families["vllm:num_requests_waiting"].samples[0].value
            if waiting:
                break
            await asyncio.sleep(0.02)
        assert waiting == 1
        assert not request.done()
        async with http.post(sim.url + "/wake_up") as response:
            assert response.status == 200
        status, result = await asyncio.wait_for(request, 10)
    finally:
        request.cancel()
    assert status == 200
    assert result["usage"]["completion_tokens"] == 3
    async with http.get(sim.url + "/is_sleeping") as response:
        assert await response.json() == {"is_sleeping": False}


@pytest.mark.slow
async def test_client_disconnect_aborts(launch: Any, http: aiohttp.ClientSession) -> None:
    sim = launch("--sim-itl", "0.05")
    async with http.post(sim.url + "/v1/completions",
                         json={"model": MODEL, "prompt": "x", "max_tokens": 100,
                               "stream": True}) as response:
        first = await response.content.readline()
        assert first.startswith(b"data: ")
        response.close()  # hang up mid-stream
    for _ in range(200):
        if "aborted: client disconnected" in sim.output():
            break
        await asyncio.sleep(0.05)
    assert "aborted: client disconnected" in sim.output()
    async with http.get(sim.url + "/metrics") as metrics_response:
        families = {f.name: f for f in text_string_to_metric_families(await metrics_response.text())}
    assert families["vllm:num_requests_running"].samples[0].value == 0
    # As in vLLM 0.32 (tests_vllm checked it), an abort by the client counts in no finished_reason.
    assert all(s.value == 0 for s in families["vllm:request_success"].samples
               if s.labels.get("finished_reason") == "abort")
    status, _ = await post(http, sim.url + "/v1/completions",
                           {"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert status == 200


async def test_crash_after(launch: Any, http: aiohttp.ClientSession) -> None:
    sim = launch("--sim-crash-after", "1")
    status, _ = await post(http, sim.url + "/v1/chat/completions", chat_body(max_tokens=4))
    assert status == 200
    received = b""
    with pytest.raises(aiohttp.ClientError):
        async with http.post(sim.url + "/v1/chat/completions",
                             json=chat_body(max_tokens=10, stream=True)) as response:
            async for data in response.content.iter_any():
                received += data
    # About half the chunks arrived, then the connection died without [DONE].
    assert received.count(b"data: ") >= 2
    assert b"[DONE]" not in received
    assert await asyncio.to_thread(sim.proc.wait, 10) == 1
    assert "simulated crash" in sim.output().splitlines()[-1]


@pytest.mark.slow
async def test_exit_at_start(launch: Any) -> None:
    sim = launch("--sim-exit-at-start", "3", wait=False)
    assert await asyncio.to_thread(sim.proc.wait, 15) == 3
    assert "exiting with status 3" in sim.output()
    assert not port_open(sim.port)


@pytest.mark.slow
async def test_start_delay(launch: Any) -> None:
    sim = launch("--sim-start-delay", "3", wait=False)
    deadline = time.monotonic() + 15
    while "loading weights" not in sim.output():
        assert time.monotonic() < deadline and sim.proc.poll() is None, sim.output()
        await asyncio.sleep(0.02)
    # The process is running and "loading": nothing listens yet.
    assert not port_open(sim.port)
    await asyncio.to_thread(sim.wait_healthy)
    assert port_open(sim.port)


async def test_fail_every(launch: Any, http: aiohttp.ClientSession) -> None:
    sim = launch("--sim-fail-every", "2")
    statuses = []
    for _ in range(4):
        status, body = await post(http, sim.url + "/v1/completions",
                                  {"model": MODEL, "prompt": "x", "max_tokens": 1})
        statuses.append(status)
        if status == 500:
            assert body["error"]["type"] == "InternalServerError"
            assert body["error"]["code"] == 500
    assert statuses == [200, 500, 200, 500]


@pytest.mark.slow
async def test_hang_after_and_sglang_arguments(launch: Any, http: aiohttp.ClientSession) -> None:
    # An SGLang command line given as arguments: the launcher words are ignored.
    sim = launch("--sim-hang-after", "1", "--tp", "1", model_args=[
        "python3", "-m", "sglang.launch_server", "--model-path", "org/sglang-model"])
    assert "ignoring unrecognised arguments: python3 -m sglang.launch_server --tp 1" \
        in sim.output()
    body = {"model": "org/sglang-model", "prompt": "x", "max_tokens": 1}
    status, _ = await post(http, sim.url + "/v1/completions", body)
    assert status == 200
    hung = asyncio.ensure_future(post(http, sim.url + "/v1/completions", body))
    done, _ = await asyncio.wait({hung}, timeout=0.5)
    assert not done  # never answers...
    hung.cancel()
    async with http.get(sim.url + "/health") as response:
        assert response.status == 200  # ...while the server stays up


def test_parse_config_spellings() -> None:
    config = parse_config(["serve", "org/m", "--max-model-len", "4096", "--enforce-eager"])
    assert config.model == "org/m" and config.served_model_names == ["org/m"]
    assert config.max_model_len == 4096
    assert config.ignored == ["serve", "org/m", "--enforce-eager"]
    config = parse_config(["org/x", "--served-model-name", "x", "--dtype", "auto"])
    assert config.model == "org/x" and config.served_model_names == ["x"]
    config = parse_config(["--model", "m", "--sim-max-model-len", "99", "--sim-ttft", "0.5"])
    assert config.max_model_len == 99 and config.ttft == 0.5
    with pytest.raises(SystemExit):
        parse_config(["--model", "m", "--sim-ttft", "-1"])


# ---------------------------------------------------------------------------------------------
# The Docker image
# ---------------------------------------------------------------------------------------------


def ensure_simulator_image() -> None:
    """Build the image with the project script unless it already holds this simulator.py and sim_engine.py."""
    sha = hashlib.sha256((ROOT / "gateway" / "simulator.py").read_bytes()
                         + (ROOT / "gateway" / "sim_engine.py").read_bytes()).hexdigest()
    inspect = subprocess.run(
        ["docker", "image", "inspect", "-f", f'{{{{ index .Config.Labels "{SHA_LABEL}" }}}}',
         SIM_IMAGE], capture_output=True, text=True, check=False)
    if inspect.returncode == 0 and inspect.stdout.strip() == sha:
        return
    subprocess.run(["bash", str(ROOT / "scripts" / "build-test-images.sh")], check=True,
                   stdin=subprocess.DEVNULL, timeout=1800)


@pytest.mark.docker
async def test_docker_image_serves_completions(http: aiohttp.ClientSession) -> None:
    await asyncio.to_thread(ensure_simulator_image)
    port = free_port()
    name = f"llm-gateway-simulator-test-{port}"
    # Host networking works whether or not dockerd manages a bridge (--bridge=none fallback).
    run = await asyncio.create_subprocess_exec(
        "docker", "run", "-d", "--rm", "--name", name, "--network", "host", SIM_IMAGE,
        "--model", "docker-model", "--host", "127.0.0.1", "--port", str(port),
        "--gpu-memory-utilization", "0.9",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await run.communicate()
    assert run.returncode == 0, err.decode()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                async with http.get(url + "/health") as response:
                    if response.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, "simulator container never became healthy"
            await asyncio.sleep(0.1)
        status, result = await post(http, url + "/v1/completions",
                                    {"model": "docker-model", "prompt": "hello", "max_tokens": 3})
        assert status == 200
        assert result["usage"]["completion_tokens"] == 3
        assert len(result["choices"][0]["text"].split()) == 3
        logs = await asyncio.create_subprocess_exec(
            "docker", "logs", name, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        log_text = (await logs.communicate())[0].decode()
        assert '"POST /v1/completions" 200' in log_text
        assert "ignoring unrecognised arguments: --gpu-memory-utilization 0.9" in log_text
    finally:
        remove = await asyncio.create_subprocess_exec(
            "docker", "rm", "-f", name, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        await remove.wait()
