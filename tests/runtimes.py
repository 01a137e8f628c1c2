"""Helpers about runtimes that several test modules use: the simulator image, processes, containers."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import aiodocker

from gateway.actors.supervisor import RuntimeSupervisor
from gateway.backends.process import ProcessBackend

SIMULATOR_IMAGE = "llm-gateway-simulator:test"


def image_exists(image: str = SIMULATOR_IMAGE) -> bool:
    """True when the local Docker Engine has `image`."""
    return subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0


def alive(pid: int) -> bool:
    """True while `pid` runs (zombies count as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def process_pid(sup: RuntimeSupervisor) -> int:
    """Pid of the runtime the supervisor's process backend runs."""
    assert isinstance(sup.backend, ProcessBackend)
    pid = sup.backend.pid
    assert pid is not None
    return pid


async def inspect(name: str) -> dict[str, Any] | None:
    """`docker inspect` of a container, None when it does not exist."""
    async with aiodocker.Docker() as docker:
        try:
            result: dict[str, Any] = await (await docker.containers.get(name)).show()
            return result
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return None
            raise
