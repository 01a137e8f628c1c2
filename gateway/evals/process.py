"""Run a helper program as an asyncio subprocess that never outlives its caller."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Completed:
    """What a finished program returned."""

    returncode: int
    stdout: bytes
    stderr: bytes


async def terminate(proc: asyncio.subprocess.Process, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; waits for the exit either way."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def run_program(argv: Sequence[str], *, stdin: bytes | None = None, timeout: float = 120.0,
                      cwd: str | None = None) -> Completed:
    """Run `argv` to completion, feeding `stdin`; kills it on timeout (TimeoutError) or cancellation."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=cwd)
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except BaseException:
        # Timeout or cancellation: a helper must never be left running behind us.
        await asyncio.shield(terminate(proc, grace=1.0))
        raise
    assert proc.returncode is not None
    return Completed(proc.returncode, stdout, stderr)
