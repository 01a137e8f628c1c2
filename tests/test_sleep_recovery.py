"""A runtime found asleep without sleep mode or a batch group (put to sleep by hand, or a gateway restarted
mid-group) is woken by the dispatcher through /wake_up: the same process, never left asleep."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.actors.supervisor import RuntimeState
from gateway.bootstrap import create_app
from gateway.http.appkeys import DISPATCHER, SUPERVISOR
from tests.conftest import REALTIME_MODEL, auth, eventually, wait_ready

pytestmark = pytest.mark.slow  # runtime processes put to sleep and woken


async def test_runtime_asleep_without_sleep_mode_is_woken(
        aiohttp_client: Any, make_settings: Callable[..., Any], tmp_path: Path) -> None:
    settings = make_settings(runtime_backend="process", runtime_url="", runtime_sleep_mode=False,
                             runtime_pid_file=str(tmp_path / "runtime.pid"),
                             runtime_args="--sim-sleep-delay 0.2 --sim-wake-delay 0.2")
    client = await aiohttp_client(create_app(settings))
    await wait_ready(client.app, timeout=60)
    supervisor, dispatcher = client.app[SUPERVISOR], client.app[DISPATCHER]
    assert not dispatcher.sleep_mode
    pid = supervisor.backend.pid

    snap = await supervisor.sleep()
    assert snap.state is RuntimeState.SLEEPING
    await eventually(lambda: supervisor.snapshot.ready, timeout=30)
    # Woken, not restarted: the same process, and the dispatcher says why it swapped.
    assert supervisor.backend.pid == pid
    assert supervisor.snapshot.restarts == 0
    assert [s["reason"] for s in dispatcher.swaps] == ["realtime_wanted"]
    assert dispatcher.swaps[0]["error"] is None
    async with client.session.get(supervisor.snapshot.base_url + "/is_sleeping") as resp:
        assert (await resp.json())["is_sleeping"] is False
    resp = await client.post("/v1/completions", json={"model": REALTIME_MODEL, "prompt": "x", "max_tokens": 2},
                             headers=auth("realtime"))
    assert resp.status == 200
