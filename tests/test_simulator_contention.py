"""The simulator's contention model (gateway/sim_engine.py), step by step and through the running simulator.

The engine's scheduling is checked with a manual clock, so every figure is simulated time: FCFS and
priority order as vLLM's v1 scheduler has them, max_num_seqs, the chunked-prefill token budget, the KV
cache with preemption of the lowest priority, and a step time that grows with the batch. End to end, the
simulator process started with the contention flags shows the effect over HTTP: concurrent load raises
the TTFT it reports, a priority-0 request overtakes queued priority-10 ones, and /metrics gauges report
the engine's running and waiting sequences. Assertions are on order and on the simulator's own figures,
never on this machine's speed.
"""

from __future__ import annotations

import asyncio
import math
import subprocess
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.sim_engine import PROFILES, Engine, EngineProfile, ManualClock, Sequence, run_step
from gateway.simulator import parse_config
from tests.conftest import start_simulator
from tests.polling import eventually

pytestmark = pytest.mark.slow  # drives the contention simulator under load

MODEL = "contention-model"


def profile(**changes: Any) -> EngineProfile:
    """A small engine whose step costs are round numbers: 10 ms + 1 ms per sequence + 0.1 ms per prefill token."""
    base = EngineProfile(max_num_seqs=8, max_num_batched_tokens=64, kv_cache_tokens=1024, block_size=16,
                         policy="fcfs", step_base=0.010, step_per_seq=0.001, step_per_prefill_token=0.0001,
                         step_per_context_token=0.0)
    return base.with_overrides(**changes)


def make(p: EngineProfile) -> tuple[Engine, ManualClock]:
    clock = ManualClock()
    return Engine(p, clock=clock), clock


def run_until_idle(engine: Engine, clock: ManualClock, limit: int = 10_000) -> list[Sequence]:
    """Run steps until nothing is left; return sequences in the order they finished."""
    order: list[Sequence] = []
    for _ in range(limit):
        if not engine.has_work():
            return order
        order += run_step(engine, clock).finished
    raise AssertionError("engine did not go idle")


# --------------------------------------------------------------------------------------------
# The engine, step by step
# --------------------------------------------------------------------------------------------


def test_fcfs_serves_in_arrival_order_whatever_the_priority() -> None:
    engine, clock = make(profile(max_num_seqs=1))
    low = Sequence(8, 3, priority=10, request_id="low")
    high = Sequence(8, 3, priority=0, request_id="high")
    engine.add(low)
    clock.advance(0.001)
    engine.add(high)
    assert [s.request_id for s in run_until_idle(engine, clock)] == ["low", "high"]


def test_priority_policy_serves_lower_value_first_and_ties_by_arrival() -> None:
    engine, clock = make(profile(max_num_seqs=1, policy="priority"))
    for name, prio in (("b10-first", 10), ("b10-second", 10), ("rt", 0), ("b5", 5)):
        engine.add(Sequence(8, 2, priority=prio, request_id=name))
        clock.advance(0.001)
    order = [s.request_id for s in run_until_idle(engine, clock)]
    assert order == ["rt", "b5", "b10-first", "b10-second"]


def test_max_num_seqs_bounds_the_running_batch() -> None:
    engine, clock = make(profile(max_num_seqs=2))
    for _ in range(5):
        engine.add(Sequence(4, 10))
    run_step(engine, clock)
    assert (engine.num_running, engine.num_waiting) == (2, 3)
    run_step(engine, clock)
    assert (engine.num_running, engine.num_waiting) == (2, 3)


def test_a_full_batch_keeps_even_priority_zero_waiting() -> None:
    # vLLM v1 preempts only to find KV blocks for running requests; a waiting request never evicts one.
    engine, clock = make(profile(max_num_seqs=2, policy="priority"))
    batch = [Sequence(4, 5, priority=10) for _ in range(2)]
    for seq in batch:
        engine.add(seq)
    run_step(engine, clock)
    realtime = Sequence(4, 5, priority=0)
    engine.add(realtime)
    run_step(engine, clock)
    assert realtime.output_tokens == 0 and engine.num_waiting == 1 and engine.num_preemptions == 0
    run_until_idle(engine, clock)
    assert realtime.first_token_time is not None
    assert realtime.first_token_time > max(s.last_token_time or 0 for s in batch) - 1e-9


def test_chunked_prefill_spreads_a_long_prompt_over_the_token_budget() -> None:
    engine, clock = make(profile(max_num_batched_tokens=64))
    seq = Sequence(150, 4)
    engine.add(seq)
    steps = [run_step(engine, clock) for _ in range(3)]
    assert [s.step.scheduled[seq] for s in steps] == [64, 64, 22]
    assert [len(s.emitted) for s in steps] == [0, 0, 1]  # the first token comes with the last chunk
    assert seq.output_tokens == 1 and seq.first_token_time == pytest.approx(sum(s.step.duration for s in steps))


def test_running_decodes_are_scheduled_before_new_prefills_share_the_budget() -> None:
    engine, clock = make(profile(max_num_batched_tokens=64))
    decoding = [Sequence(4, 50) for _ in range(3)]
    for seq in decoding:
        engine.add(seq)
    run_step(engine, clock)  # their prefills
    newcomer = Sequence(200, 2)
    engine.add(newcomer)
    out = run_step(engine, clock)
    assert [out.step.scheduled[s] for s in decoding] == [1, 1, 1]
    assert out.step.scheduled[newcomer] == 61  # what the decodes left of 64
    assert out.step.num_tokens == 64


def test_step_time_grows_with_sequences_and_prefill_tokens() -> None:
    p = profile(max_num_batched_tokens=4096)
    engine, clock = make(p)
    first = Sequence(100, 10)
    engine.add(first)
    prefill = run_step(engine, clock).step
    assert prefill.duration == pytest.approx(0.010 + 0.001 * 1 + 0.0001 * 100)
    decode_one = run_step(engine, clock).step
    assert decode_one.duration == pytest.approx(0.010 + 0.001)
    for _ in range(5):
        engine.add(Sequence(4, 10))
    run_step(engine, clock)
    decode_six = run_step(engine, clock).step
    assert len(decode_six.scheduled) == 6
    assert decode_six.duration == pytest.approx(0.010 + 0.006)
    assert decode_six.duration > decode_one.duration
    # The attention term grows with the context each sequence attends to.
    with_context = p.with_overrides(step_per_context_token=0.00001)
    assert with_context.step_time(1, 0, 1000) - with_context.step_time(1, 0, 0) == pytest.approx(0.01)


def fill_cache(policy: str) -> tuple[Engine, ManualClock, Sequence, Sequence]:
    """6 blocks of 16 tokens: a first sequence (15-token prompt) and a second one (80 tokens) fill them all.

    The first needs a second block for its 17th token, one step later.
    """
    engine, clock = make(profile(kv_cache_tokens=96, max_num_batched_tokens=256, policy=policy))
    first = Sequence(15, 40, priority=10 if policy == "priority" else 0, request_id="first")
    engine.add(first)
    run_step(engine, clock)
    clock.advance(0.001)
    second = Sequence(80, 10, priority=0, request_id="second")
    engine.add(second)
    run_step(engine, clock)
    assert engine.free_blocks == 0 and first.blocks == 1 and second.blocks == 5
    return engine, clock, first, second


def test_kv_full_preempts_the_lowest_priority_and_recomputes_it_later() -> None:
    engine, clock, batch, realtime = fill_cache("priority")
    out = run_step(engine, clock)  # batch needs a block for its 17th token: nothing is free
    assert out.step.preempted == [batch], "the lower priority goes, although it runs first"
    # As in vLLM, the running pass stops at the request it could not schedule.
    assert not out.step.scheduled and out.step.duration == 0
    assert batch.num_preemptions == 1 and batch.num_computed == 0 and batch.blocks == 0
    assert engine.num_waiting == 1 and engine.num_preemptions == 1
    assert realtime in run_step(engine, clock).step.scheduled
    order = [s.request_id for s in run_until_idle(engine, clock)]
    assert order == ["second", "first"]
    assert batch.output_tokens == 40, "resumed after recomputing its prompt and output"
    assert engine.free_blocks == engine.profile.num_blocks


def test_kv_full_under_fcfs_preempts_the_newest_running() -> None:
    engine, clock, old, new = fill_cache("fcfs")
    out = run_step(engine, clock)
    assert out.step.preempted == [new]
    assert out.step.scheduled == {old: 1}
    assert [s.request_id for s in run_until_idle(engine, clock)] == ["first", "second"]
    assert new.num_preemptions == 1


def test_no_admission_in_a_step_that_preempted() -> None:
    engine, clock, _, new = fill_cache("fcfs")
    tiny = Sequence(1, 1, priority=0)
    engine.add(tiny)
    out = run_step(engine, clock)
    assert out.step.preempted and tiny not in out.step.scheduled
    # FCFS puts the preempted sequence back at the head: the small one waits behind it, as in vLLM.
    assert list(engine.waiting) == [new, tiny]
    assert tiny not in run_step(engine, clock).step.scheduled


def test_abort_frees_the_kv_blocks() -> None:
    engine, clock = make(profile())
    seq = Sequence(100, 50)
    engine.add(seq)
    run_step(engine, clock)
    assert engine.kv_cache_usage > 0
    engine.abort(seq)
    assert engine.kv_cache_usage == 0 and not engine.has_work()


def test_a_sequence_that_can_never_fit_is_refused() -> None:
    engine, _ = make(profile(kv_cache_tokens=64))
    with pytest.raises(ValueError):
        engine.add(Sequence(60, 10))


def test_load_raises_ttft_in_simulated_time() -> None:
    engine, clock = make(PROFILES["gpu-like"])
    alone = Sequence(512, 64)
    engine.add(alone)
    run_until_idle(engine, clock)
    assert alone.first_token_time is not None and alone.arrival_time is not None
    ttft_alone = alone.first_token_time - alone.arrival_time
    start = clock.now
    crowd = [Sequence(512, 64) for _ in range(200)]
    for seq in crowd:
        engine.add(seq)
    run_until_idle(engine, clock)
    ttfts = sorted((s.first_token_time or 0) - start for s in crowd)
    assert ttfts[len(ttfts) // 2] > 5 * ttft_alone
    itl_crowd = max(s.last_gap for s in crowd)
    assert itl_crowd > alone.last_gap


def test_flags_are_off_by_default_and_select_a_profile() -> None:
    assert parse_config(["--model", "m"]).engine is None
    assert parse_config(["--model", "m", "--max-num-seqs", "4"]).engine is None
    on = parse_config(["--model", "m", "--sim-profile", "gpu-like", "--scheduling-policy", "priority",
                       "--max-num-seqs", "4", "--max-num-batched-tokens", "512", "--sim-step-base-ms", "2"])
    assert on.engine is not None
    assert (on.engine.policy, on.engine.max_num_seqs, on.engine.max_num_batched_tokens) == ("priority", 4, 512)
    assert on.engine.step_base == pytest.approx(0.002)
    assert on.engine.kv_cache_tokens == PROFILES["gpu-like"].kv_cache_tokens
    assert parse_config(["--model", "m", "--sim-contention"]).engine == PROFILES["gpu-like"]
    with pytest.raises(SystemExit):
        parse_config(["--model", "m", "--sim-contention", "--sim-kv-cache-tokens", "100"])


# --------------------------------------------------------------------------------------------
# End to end, through the simulator process
# --------------------------------------------------------------------------------------------


def launch(*args: str) -> tuple[subprocess.Popen[bytes], str]:
    return start_simulator(MODEL, "--sim-contention", *args)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


@pytest.fixture
def sims() -> Iterator[Any]:
    started: list[subprocess.Popen[bytes]] = []

    def _launch(*args: str) -> str:
        proc, url = launch(*args)
        started.append(proc)
        return url

    yield _launch
    for proc in started:
        stop(proc)


async def metrics(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """The simulator's /metrics as {sample name: value} (labels dropped: one engine, one model)."""
    async with http.get(url + "/metrics") as response:
        text = await response.text()
    return {s.name + (f"|{s.labels['le']}" if "le" in s.labels else ""): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def complete(http: aiohttp.ClientSession, url: str, prompt_tokens: int, max_tokens: int,
                   priority: int | None = None, stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "prompt": [7] * prompt_tokens, "max_tokens": max_tokens,
                            "stream": stream}
    if priority is not None:
        body["priority"] = priority
    async with http.post(url + "/v1/completions", json=body) as response:
        assert response.status == 200, await response.text()
        if stream:
            return {"text": await response.text()}
        result: dict[str, Any] = await response.json()
        return result


@pytest.mark.slow
async def test_concurrent_load_raises_the_ttft_the_simulator_reports(
        sims: Any, http: aiohttp.ClientSession) -> None:
    # 20 ms a step + 1 ms a prefill token, 200 tokens a step: alone ~120 ms; 20 at once queue for ~1.2 s.
    url = sims("--max-num-batched-tokens", "200", "--sim-step-base-ms", "20", "--sim-step-per-seq-ms", "0",
               "--sim-step-per-prefill-token-ms", "1", "--sim-step-per-context-token-ms", "0")
    await complete(http, url, 100, 4, stream=True)
    alone = await metrics(http, url)
    ttft_alone = alone["vllm:time_to_first_token_seconds_sum"] / alone["vllm:time_to_first_token_seconds_count"]
    await asyncio.gather(*(complete(http, url, 100, 4, stream=True) for _ in range(20)))
    loaded = await metrics(http, url)
    count = loaded["vllm:time_to_first_token_seconds_count"] - alone["vllm:time_to_first_token_seconds_count"]
    mean = (loaded["vllm:time_to_first_token_seconds_sum"] - alone["vllm:time_to_first_token_seconds_sum"]) / count
    assert count == 20
    assert mean > 3 * ttft_alone, (mean, ttft_alone)
    assert loaded["vllm:inter_token_latency_seconds_count"] == 21 * 3


async def test_priority_zero_overtakes_a_queue_of_priority_ten(sims: Any, http: aiohttp.ClientSession) -> None:
    url = sims("--scheduling-policy", "priority", "--max-num-seqs", "1", "--sim-step-base-ms", "5")
    finished: list[str] = []

    async def job(name: str, priority: int) -> None:
        await complete(http, url, 8, 20, priority=priority)
        finished.append(name)

    batch = [asyncio.create_task(job(f"batch{i}", 10)) for i in range(6)]
    await eventually(lambda: _gauge(http, url, "vllm:num_requests_waiting", lambda v: v >= 4), timeout=30)
    done_before = len(finished)
    await job("realtime", 0)
    await asyncio.gather(*batch)
    # Only the batch request running when it arrived may finish before it; the queued ones wait.
    assert finished.index("realtime") <= done_before + 1, finished
    assert len(finished) - finished.index("realtime") - 1 >= 2, finished


async def test_fcfs_keeps_arrival_order_and_accepts_a_priority(sims: Any, http: aiohttp.ClientSession) -> None:
    url = sims("--max-num-seqs", "1", "--sim-step-base-ms", "5")
    finished: list[str] = []

    async def job(name: str, priority: int) -> None:
        await complete(http, url, 8, 20, priority=priority)
        finished.append(name)

    batch = [asyncio.create_task(job(f"batch{i}", 10)) for i in range(4)]
    await eventually(lambda: _gauge(http, url, "vllm:num_requests_waiting", lambda v: v >= 3), timeout=30)
    await job("realtime", 0)
    await asyncio.gather(*batch)
    assert finished[-1] == "realtime"


async def _gauge(http: aiohttp.ClientSession, url: str, name: str, check: Any) -> bool:
    return bool(check((await metrics(http, url))[name]))


async def test_metrics_gauges_report_running_waiting_and_kv(sims: Any, http: aiohttp.ClientSession) -> None:
    url = sims("--max-num-seqs", "2", "--sim-step-base-ms", "20", "--sim-kv-cache-tokens", "4096")
    tasks = [asyncio.create_task(complete(http, url, 100, 500, stream=True)) for _ in range(5)]
    try:
        async def settled() -> bool:
            m = await metrics(http, url)
            return m["vllm:num_requests_running"] == 2 and m["vllm:num_requests_waiting"] == 3
        await eventually(settled, timeout=30)
        m = await metrics(http, url)
        # Two sequences of at least 101 tokens each hold at least 2 x 7 blocks of 16 out of 256.
        assert m["vllm:kv_cache_usage_perc"] >= 14 / 256
        assert m["vllm:kv_cache_usage_perc"] <= 2 * math.ceil(600 / 16) / 256
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def drained() -> bool:
        m = await metrics(http, url)
        return m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0 \
            and m["vllm:kv_cache_usage_perc"] == 0
    await eventually(drained, timeout=30)  # disconnected clients are aborted, their KV freed


async def test_header_priority_overrides_the_body_and_bad_priority_is_a_400(
        sims: Any, http: aiohttp.ClientSession) -> None:
    url = sims("--scheduling-policy", "priority")
    async with http.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "priority": "high"}) as r:
        assert r.status == 400
        assert (await r.json())["error"]["param"] == "body.priority"
    async with http.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
                         headers={"X-Vllm-Priority": "-5"}) as r:
        assert r.status == 200
