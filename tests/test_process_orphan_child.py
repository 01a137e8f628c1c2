"""A runtime whose leader dies while a child holds its output pipe (vLLM's API server killed, its engine-core
process left behind): the crash is still seen, the whole group is cleaned up and the runtime restarted.

Found with the real vLLM tier (tests_vllm/test_crash.py): on Python 3.11 `Process.wait()` only returns once
every pipe is closed, so the supervisor never noticed that vLLM's API server had been killed.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.actors.supervisor import RuntimeSupervisor
from gateway.settings import Settings
from tests.conftest import eventually
from tests.runtimes import alive, process_pid

pytestmark = pytest.mark.slow  # a runtime process tree killed mid-run

# sh starts a long-lived child that inherits stdout (as vLLM's EngineCore does), then becomes the simulator.
COMMAND = f"sh -c 'sleep 300 & exec \"$0\" -m gateway.simulator \"$@\"' {shlex.quote(sys.executable)}"


def children(pid: int) -> list[int]:
    """Direct children of `pid`."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


async def test_leader_killed_while_a_child_holds_the_pipe(proc_settings: Callable[..., Settings],
                                                          supervisors: Callable[..., RuntimeSupervisor],
                                                          ) -> None:
    sup = supervisors(proc_settings(runtime_command=COMMAND))
    await sup.start()
    first = await sup.wait_ready(30)
    leader = process_pid(sup)
    orphans = children(leader)
    assert orphans, "the wrapper's child did not start"

    os.kill(leader, signal.SIGKILL)
    snap = await eventually(lambda: sup.snapshot.restarts == first.restarts + 1 and sup.snapshot.ready
                            and sup.snapshot, timeout=30)
    assert "killed by signal 9" in (snap.last_error or "")
    assert snap.last_crash_log is not None and Path(snap.last_crash_log).is_file()
    assert process_pid(sup) != leader
    assert not any(alive(pid) for pid in orphans), "the dead leader's child was left running"
