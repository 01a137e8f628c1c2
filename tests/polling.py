"""Waiting helpers shared by the fast suite (tests/) and the real-vLLM tier (tests_vllm/)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from gateway.actors.supervisor import RuntimeSnapshot, RuntimeSupervisor


async def eventually(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll an (async or sync) check until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def wait_for_state(sup: RuntimeSupervisor, check: Callable[[RuntimeSnapshot], bool],
                         timeout: float = 30.0) -> RuntimeSnapshot:
    """Wait (through wait_changed) until the snapshot satisfies `check`."""
    deadline = time.monotonic() + timeout
    snap = sup.snapshot
    while not check(snap):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"state not reached within {timeout} s; last snapshot {snap}")
        snap = await sup.wait_changed(left, since=snap)
    return snap


class ManualClock:
    """Monotonic seconds that move only when a test (or a fake waiting on them) says so: the injectable
    `clock` of the dispatcher, the supervisor and RealtimeActivity in unit tests."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        self.now += seconds
