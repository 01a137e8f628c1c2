"""RuntimeSupervisor with the process backend (the simulator as a subprocess) and the external backend."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import orjson
import pytest

from gateway import metrics
from gateway.actors.supervisor import RuntimeSnapshot, RuntimeState, RuntimeSupervisor, RuntimeUnavailable
from gateway.backends import make_backend
from gateway.backends.external import ExternalBackend
from gateway.backends.process import ProcessBackend
from gateway.settings import Settings
from tests.conftest import REALTIME_MODEL, free_port, start_simulator
from tests.polling import wait_for_state
from tests.runtimes import alive, process_pid

pytestmark = pytest.mark.slow  # runtime processes started, crashed and restarted

Factory = Callable[..., RuntimeSupervisor]


def sample(name: str, **labels: str) -> float:
    """Current value of a metric sample (0 when never touched)."""
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def models_served(base_url: str) -> list[str]:
    """Ids that the runtime at `base_url` lists under /v1/models."""
    async with aiohttp.ClientSession() as session, session.get(base_url + "/v1/models") as resp:
        body = orjson.loads(await resp.read())
    return [m["id"] for m in body["data"]]


async def test_start_reaches_ready_with_the_realtime_model(proc_settings: Callable[..., Settings],
                                                           supervisors: Factory) -> None:
    settings = proc_settings(runtime_expected_start_seconds=42)
    sup = supervisors(settings)
    assert sup.snapshot.state is RuntimeState.STOPPED
    before = time.time()
    await sup.start()
    snap = await wait_for_state(sup, lambda s: s.state is not RuntimeState.STOPPED)
    # start() does not wait for readiness; the ETA comes from the expected start time at first.
    assert snap.state is RuntimeState.STARTING
    assert snap.model == REALTIME_MODEL
    assert snap.ready_eta is not None and before + 42 <= snap.ready_eta <= time.time() + 42
    assert 30 <= snap.retry_after() <= 42

    snap = await sup.wait_ready(30)
    assert snap.ready and snap.state is RuntimeState.READY
    assert snap.model == REALTIME_MODEL
    assert snap.base_url is not None and snap.base_url.startswith("http://127.0.0.1:")
    assert snap.since >= before and snap.restarts == 0 and snap.last_error is None and snap.ready_eta is None
    assert await models_served(snap.base_url) == [REALTIME_MODEL]
    assert sup.snapshot is snap  # a plain read, stable while nothing changes
    assert sample("llm_gateway_runtime_state", state="ready") == 1
    assert sample("llm_gateway_runtime_state", state="starting") == 0
    # ensure_model of the served model returns at once.
    assert await sup.ensure_model(REALTIME_MODEL, timeout=1) is snap


async def test_crash_writes_a_failure_log_and_restarts(proc_settings: Callable[..., Settings],
                                                       supervisors: Factory, tmp_path: Path) -> None:
    settings = proc_settings(runtime_args="--sim-crash-after 1")
    sup = supervisors(settings)
    await sup.start()
    first = await sup.wait_ready(30)
    crashes = sample("llm_gateway_runtime_crashes_total", reason="exit")
    restarts = sample("llm_gateway_runtime_restarts_total")

    async with aiohttp.ClientSession() as session:
        body = {"model": REALTIME_MODEL, "prompt": "hello", "max_tokens": 4}
        async with session.post(first.base_url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
        with pytest.raises(aiohttp.ClientError):
            async with session.post(first.base_url + "/v1/completions", json=body) as resp:
                await resp.read()

    failed = await wait_for_state(sup, lambda s: s.state is RuntimeState.FAILED)
    assert failed.model == REALTIME_MODEL
    assert failed.last_error is not None and "exited with code 1" in failed.last_error
    assert failed.ready_eta is not None and failed.ready_eta > failed.since
    assert sample("llm_gateway_runtime_crashes_total", reason="exit") == crashes + 1
    log_path = Path(failed.last_crash_log or "")
    assert log_path.parent == tmp_path / "runtime_failures"
    safe_model = REALTIME_MODEL.replace("/", "_")
    assert log_path.name.endswith(f"Z-{safe_model}.log") and log_path.name[8] == "T"
    text = log_path.read_text()
    assert "exited with code 1" in text
    assert "/v1/completions" in text  # the runtime's own output lines made it into the file

    again = await sup.wait_ready(30)
    assert again.restarts == 1
    assert again.base_url != first.base_url or again.since > failed.since
    assert again.last_crash_log == str(log_path)
    assert sample("llm_gateway_runtime_restarts_total") == restarts + 1
    assert await models_served(again.base_url) == [REALTIME_MODEL]


async def test_exit_at_start_fails_then_retries_with_backoff(proc_settings: Callable[..., Settings],
                                                            supervisors: Factory) -> None:
    sup = supervisors(proc_settings(runtime_args="--sim-exit-at-start 3"))
    start_failed = sample("llm_gateway_runtime_crashes_total", reason="start_failed")
    await sup.start()
    with pytest.raises(RuntimeUnavailable, match="code 3"):
        await sup.ensure_model(REALTIME_MODEL, timeout=30)

    failures: list[RuntimeSnapshot] = []
    snap = sup.snapshot
    while True:
        if snap.state is RuntimeState.FAILED and (not failures or snap.since != failures[-1].since):
            failures.append(snap)
            if len(failures) == 3:
                break
        snap = await sup.wait_changed(30, since=snap)
    for failed in failures:
        assert failed.last_error is not None and "exited with code 3 while starting" in failed.last_error
        assert failed.last_crash_log is not None and Path(failed.last_crash_log).is_file()
    # ready_eta of a failure is the next attempt: 1 s, then 2 s, then 4 s after the failure.
    delays = [round(f.ready_eta - f.since) for f in failures if f.ready_eta is not None]
    # (If the first failure came before ensure_model looked, it raised on the second one.)
    assert delays in ([1, 2, 4], [2, 4, 8])
    assert failures[-1].restarts >= 2
    assert sample("llm_gateway_runtime_crashes_total", reason="start_failed") >= start_failed + 3


async def test_readiness_timeout_is_a_failed_start(proc_settings: Callable[..., Settings],
                                                   supervisors: Factory) -> None:
    sup = supervisors(proc_settings(runtime_args="--sim-start-delay 30", runtime_start_timeout=1))
    await sup.start()
    await asyncio.sleep(0.2)
    pid = process_pid(sup)
    failed = await wait_for_state(sup, lambda s: s.state is RuntimeState.FAILED)
    assert failed.last_error is not None and "within 1 s" in failed.last_error
    # The runtime that never became ready was stopped.
    for _ in range(100):
        if not alive(pid):
            break
        await asyncio.sleep(0.05)
    assert not alive(pid)


async def test_ensure_model_swaps_and_shares_one_swap(proc_settings: Callable[..., Settings],
                                                      supervisors: Factory) -> None:
    sup = supervisors(proc_settings())
    await sup.start()
    first = await sup.wait_ready(30)
    old_pid = process_pid(sup)
    swaps = sample("llm_gateway_runtime_swaps_total")

    seen: list[RuntimeState] = []

    async def watch() -> None:
        snap = sup.snapshot
        while True:
            snap = await sup.wait_changed(since=snap)
            seen.append(snap.state)

    watcher = asyncio.create_task(watch())
    try:
        a, b = await asyncio.gather(sup.ensure_model("other/model-b", timeout=30),
                                    sup.ensure_model("other/model-b", timeout=30))
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher
    assert a is b
    assert a.ready and a.model == "other/model-b"
    assert a.base_url != first.base_url or not alive(old_pid)
    assert not alive(old_pid)
    assert await models_served(a.base_url or "") == ["other/model-b"]
    assert RuntimeState.SWAPPING in seen and seen[-1] is RuntimeState.READY
    assert sample("llm_gateway_runtime_swaps_total") == swaps + 1
    assert await sup.ensure_model("other/model-b") is a

    back = await sup.ensure_model(REALTIME_MODEL, timeout=30)
    assert back.model == REALTIME_MODEL and back.ready


async def test_ensure_model_gives_up_when_superseded(proc_settings: Callable[..., Settings],
                                                     supervisors: Factory) -> None:
    sup = supervisors(proc_settings(runtime_args="--sim-start-delay 0.5"))
    await sup.start()
    first = asyncio.create_task(sup.ensure_model("model-a", timeout=30))
    await asyncio.sleep(0.1)
    second = await sup.ensure_model("model-b", timeout=30)
    assert second.model == "model-b" and second.ready
    with pytest.raises(RuntimeUnavailable, match="model-b was asked for"):
        await first


async def test_ensure_model_timeout_raises(proc_settings: Callable[..., Settings], supervisors: Factory) -> None:
    sup = supervisors(proc_settings(runtime_args="--sim-start-delay 30"))
    await sup.start()
    with pytest.raises(RuntimeUnavailable, match="not ready after 0.3 s"):
        await sup.ensure_model("slow-model", timeout=0.3)
    with pytest.raises(RuntimeUnavailable):
        await sup.wait_ready(0.2)


async def test_restart_replaces_the_process(proc_settings: Callable[..., Settings], supervisors: Factory) -> None:
    sup = supervisors(proc_settings())
    await sup.start()
    await sup.wait_ready(30)
    old_pid = process_pid(sup)
    await sup.restart()
    assert sup.snapshot.state is not RuntimeState.READY  # restart() returns once it has begun
    snap = await sup.wait_ready(30)
    assert snap.model == REALTIME_MODEL
    assert process_pid(sup) != old_pid and not alive(old_pid)
    assert snap.restarts == 0  # asked for, not a crash


async def test_stop_leaves_no_process(proc_settings: Callable[..., Settings], supervisors: Factory,
                                      tmp_path: Path) -> None:
    sup = supervisors(proc_settings())
    await sup.start()
    await sup.wait_ready(30)
    pid = process_pid(sup)
    pid_file = tmp_path / "runtime.pid"
    assert orjson.loads(pid_file.read_bytes())["pid"] == pid
    await sup.stop()
    assert not alive(pid)
    assert not pid_file.exists()
    assert sup.snapshot.state is RuntimeState.STOPPED and sup.snapshot.model is None
    assert sample("llm_gateway_runtime_state", state="stopped") == 1
    with pytest.raises(RuntimeUnavailable):
        await sup.ensure_model(REALTIME_MODEL, timeout=1)


async def test_stop_kills_a_runtime_that_ignores_sigterm(proc_settings: Callable[..., Settings],
                                                         supervisors: Factory, tmp_path: Path) -> None:
    # A runtime that ignores SIGTERM is killed after RUNTIME_STOP_TIMEOUT.
    wrapper = tmp_path / "stubborn.py"
    wrapper.write_text(textwrap.dedent("""
        import signal, sys
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        from gateway.simulator import main
        sys.exit(main(sys.argv[1:]))
    """))
    settings = proc_settings(runtime_command=f"{sys.executable} {wrapper}", runtime_stop_timeout=0.5)
    sup = supervisors(settings)
    await sup.start()
    await sup.wait_ready(30)
    pid = process_pid(sup)
    await sup.stop()
    assert not alive(pid)


async def test_request_start_after_stop_runtime(proc_settings: Callable[..., Settings],
                                                supervisors: Factory) -> None:
    sup = supervisors(proc_settings())
    await sup.start()
    await sup.wait_ready(30)
    pid = process_pid(sup)
    await sup.stop_runtime()
    snap = await wait_for_state(sup, lambda s: s.state is RuntimeState.STOPPED)
    assert snap.model is None and not snap.ready
    for _ in range(100):
        if not alive(pid):
            break
        await asyncio.sleep(0.05)
    assert not alive(pid)
    sup.request_start()
    sup.request_start()  # repeated calls (one per waiting request) are harmless
    snap = await sup.wait_ready(30)
    assert snap.model == REALTIME_MODEL


async def test_leftover_process_of_a_killed_gateway_is_replaced(proc_settings: Callable[..., Settings],
                                                                 supervisors: Factory, tmp_path: Path) -> None:
    pid_file = tmp_path / "runtime.pid"
    # A "gateway" that starts its runtime and is then killed -9: the runtime survives in its own session.
    script = textwrap.dedent(f"""
        import asyncio, os, signal, urllib.request, time
        from gateway.backends.process import ProcessBackend
        from gateway.settings import Settings

        async def main():
            backend = ProcessBackend(Settings(_env_file=None, runtime_pid_file={str(pid_file)!r}))
            url = await backend.start("leftover-model")
            for _ in range(300):
                try:
                    urllib.request.urlopen(url + "/health", timeout=1)
                    break
                except OSError:
                    time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)

        asyncio.run(main())
    """)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, cwd=str(Path(__file__).parent.parent))
    assert await proc.wait() == -signal.SIGKILL
    leftover = orjson.loads(pid_file.read_bytes())
    old_pid = int(leftover["pid"])
    assert alive(old_pid) and leftover["model"] == "leftover-model"
    try:
        sup = supervisors(proc_settings())
        await sup.start()
        snap = await sup.wait_ready(30)
        assert snap.model == REALTIME_MODEL
        assert not alive(old_pid)
        assert process_pid(sup) != old_pid
        assert orjson.loads(pid_file.read_bytes())["pid"] == process_pid(sup)
    finally:
        if alive(old_pid):
            os.killpg(old_pid, signal.SIGKILL)


async def test_sglang_flavour_with_the_process_backend(proc_settings: Callable[..., Settings],
                                                       supervisors: Factory) -> None:
    sup = supervisors(proc_settings(runtime_type="sglang"))
    await sup.start()
    snap = await sup.wait_ready(30)
    assert await models_served(snap.base_url or "") == [REALTIME_MODEL]
    assert isinstance(sup.backend, ProcessBackend)
    assert "--model-path" in Path(f"/proc/{process_pid(sup)}/cmdline").read_bytes().decode().split("\0")


async def test_unwritable_failure_dir_does_not_stop_restarts(proc_settings: Callable[..., Settings],
                                                             supervisors: Factory, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    sup = supervisors(proc_settings(runtime_args="--sim-exit-at-start 2",
                                    runtime_failure_dir=str(blocker / "failures")))
    await sup.start()
    failed = await wait_for_state(sup, lambda s: s.state is RuntimeState.FAILED)
    assert failed.last_crash_log is None and "code 2" in (failed.last_error or "")
    again = await wait_for_state(sup, lambda s: s.state is RuntimeState.FAILED and s.since > failed.since)
    assert again.restarts == 1


# --- external backend: a runtime the operator runs; the gateway only probes it


async def test_external_runtime_is_probed_not_managed(make_settings: Callable[..., Settings],
                                                      supervisors: Factory) -> None:
    port = free_port()
    proc, url = start_simulator(REALTIME_MODEL, port=port)
    try:
        settings = make_settings(runtime_backend="external", runtime_url=url)
        backend = make_backend(settings)
        assert isinstance(backend, ExternalBackend) and not backend.can_swap
        backend.probe_interval = 0.1
        sup = supervisors(settings, backend=backend)
        await sup.start()
        snap = await sup.wait_ready(30)
        assert snap.base_url == url and snap.model == REALTIME_MODEL
        with pytest.raises(RuntimeUnavailable, match="external"):
            await sup.ensure_model("another/model", timeout=5)
        assert sup.snapshot.ready  # asking for another model changed nothing

        proc.terminate()
        proc.wait(10)
        failed = await wait_for_state(sup, lambda s: s.state is RuntimeState.FAILED, timeout=30)
        assert "stopped answering" in (failed.last_error or "")
        assert failed.last_crash_log is not None and "external" in Path(failed.last_crash_log).read_text()

        proc, _ = start_simulator(REALTIME_MODEL, port=port)
        snap = await sup.wait_ready(30)
        assert snap.base_url == url and snap.restarts >= 1
        await sup.stop()
        # Stopping the gateway leaves the external runtime alone.
        assert proc.poll() is None
        assert await models_served(url) == [REALTIME_MODEL]
    finally:
        proc.terminate()
        proc.wait(10)


async def test_external_runtime_serving_another_model_fails_clearly(make_settings: Callable[..., Settings],
                                                                    supervisors: Factory) -> None:
    proc, url = start_simulator("someone/elses-model")
    try:
        sup = supervisors(make_settings(runtime_backend="external", runtime_url=url))
        await sup.start()
        failed = await wait_for_state(sup, lambda s: s.state is RuntimeState.FAILED)
        assert failed.last_error is not None
        assert "serves someone/elses-model" in failed.last_error and REALTIME_MODEL in failed.last_error
    finally:
        proc.terminate()
        proc.wait(10)



async def test_a_hung_ready_runtime_is_restarted_with_a_crash_log(proc_settings: Callable[..., Settings],
                                                                  supervisors: Factory) -> None:
    # A runtime that is alive but answers nothing (here: stopped with SIGSTOP; in the wild, an `n` of
    # a hundred million) must not stay "ready": the liveness probe turns it into a restart.
    sup = supervisors(proc_settings(runtime_liveness_interval=0.3, runtime_liveness_timeout=0.5,
                                    runtime_liveness_failures=2, runtime_stop_timeout=1))
    await sup.start()
    await sup.wait_ready(30)
    pid = process_pid(sup)
    os.kill(pid, signal.SIGSTOP)
    try:
        failed = await wait_for_state(sup, lambda s: s.state is RuntimeState.FAILED, timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert "RUNTIME_LIVENESS" in (failed.last_error or "")
    log_text = Path(failed.last_crash_log or "").read_text()
    assert "reason: unhealthy" in log_text
    again = await sup.wait_ready(30)
    assert process_pid(sup) != pid and again.ready
async def test_runtime_cpus_pins_the_runtime_process(proc_settings: Callable[..., Settings],
                                                     supervisors: Factory) -> None:
    import json
    import os

    cpu = min(os.sched_getaffinity(0))
    settings = proc_settings(runtime_cpus=str(cpu))
    assert settings.runtime_cpu_set == {cpu}
    sup = supervisors(settings)
    await sup.start()
    await sup.wait_ready(30)
    pid = json.loads(Path(settings.runtime_pid_file).read_text())["pid"]
    assert os.sched_getaffinity(pid) == {cpu}  # the runtime (and what it starts) stays on RUNTIME_CPUS
    assert os.sched_getaffinity(0) != {cpu} or len(os.sched_getaffinity(0)) == 1  # the gateway is not pinned


def test_runtime_cpus_must_be_a_cpu_list(make_settings: Callable[..., Settings]) -> None:
    from pydantic import ValidationError

    assert make_settings(runtime_cpus="0,2-3").runtime_cpu_set == {0, 2, 3}
    assert make_settings().runtime_cpu_set == set()
    with pytest.raises(ValidationError, match="CPU list"):
        make_settings(runtime_cpus="cores 1 to 3")
