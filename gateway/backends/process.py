"""Process backend: the runtime as a local subprocess (the simulator by default).

The child runs in its own session so the whole process group (vLLM spawns workers) is signalled on
stop. Its stdout and stderr are merged and drained continuously into a ring buffer of lines: a full
pipe would otherwise block the runtime, and the buffer is what crash logs show. A pid file lets a
gateway that was killed -9 be replaced by a new one that kills the leftover runtime first.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections import deque
from pathlib import Path

import orjson
import structlog

from gateway.backends.base import BackendError, ExitInfo, RuntimeBackend
from gateway.flavours import Flavour, flavour_for, runtime_args
from gateway.settings import Settings

_LOG_LINES = 1000
_READ_CHUNK = 65536
_EXIT_POLL_SECONDS = 0.1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the kernel considers free right now (bind to port 0 and read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ProcessBackend(RuntimeBackend):
    """Runs the runtime with asyncio.create_subprocess_exec."""

    kind = "process"

    def __init__(self, settings: Settings, flavour: Flavour | None = None) -> None:
        self.settings = settings
        self.flavour = flavour or flavour_for(settings.runtime_type)
        self.pid_path: Path = settings.runtime_pid_path
        self.log = structlog.get_logger(component="runtime.process")
        self._proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None
        self._lines: deque[str] = deque(maxlen=_LOG_LINES)

    @property
    def pid(self) -> int | None:
        """Pid of the running runtime process, if any."""
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    # --- lifecycle
    async def adopt(self, model: str) -> str | None:
        """A leftover process cannot be adopted (its output pipe died with the old gateway): kill it."""
        await self._kill_leftover()
        return None

    async def remove_leftover(self) -> None:
        """Kill the runtime named by the pid file, if it still runs."""
        await self._kill_leftover()

    async def start(self, model: str) -> str:
        """Spawn the runtime on a loopback port and return its URL."""
        await self.stop()
        await self._kill_leftover()
        port = self.settings.runtime_port or free_port()
        argv = self.flavour.process_cmd(self.settings.runtime_command_list, model, port,
                                        runtime_args(self.settings, self.flavour))
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        if self.settings.host_hf_cache:
            env["HF_HOME"] = self.settings.host_hf_cache
        env.update(self.settings.runtime_env_dict)
        self._lines.clear()
        try:
            cpus = self.settings.runtime_cpu_set
            # RUNTIME_CPUS: set in the child before exec, so every process the runtime starts inherits it.
            pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=pin)
        except OSError as exc:
            raise BackendError(f"cannot run {argv[0]!r}: {exc}") from exc
        self._proc = proc
        self._drain = asyncio.create_task(self._drain_output(proc), name="runtime:drain")
        self._write_pid_file(proc.pid, argv, model)
        self.log.info("runtime_process_started", pid=proc.pid, port=port, model=model)
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after RUNTIME_STOP_TIMEOUT, reap, drop the pid file."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.returncode is None:
                _signal_group(proc.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), self.settings.runtime_stop_timeout)
                except TimeoutError:
                    self.log.warning("runtime_process_kill", pid=proc.pid)
            # Also after a clean exit of the leader: workers left in its group must not linger.
            _signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()
            self.log.info("runtime_process_stopped", pid=proc.pid, returncode=proc.returncode)
        await self._stop_drain()
        self._remove_pid_file()

    async def logs(self, tail: int = 200) -> str:
        """Last `tail` lines the process printed (stdout and stderr interleaved)."""
        lines = list(self._lines)[-tail:] if tail > 0 else []
        return "\n".join(lines)

    async def wait_exit(self) -> ExitInfo:
        """Wait for the process to exit; its output is fully drained before returning."""
        proc = self._proc
        if proc is None:
            return ExitInfo("exit", None, "no runtime process")
        # Not `await proc.wait()`: on Python 3.11 it returns only once every pipe is closed, and when
        # vLLM's API server dies its engine-core processes live on holding the output pipe, so the
        # crash would never be seen. returncode is set as soon as the child watcher reaps the leader;
        # stop() then kills the rest of the process group.
        while proc.returncode is None:
            await asyncio.sleep(_EXIT_POLL_SECONDS)
        code = proc.returncode
        # With the leader gone the runtime is gone: kill what is left of its group now, so that the
        # pipe closes (the drain below ends at once) and memory held by orphaned workers is freed.
        _signal_group(proc.pid, signal.SIGKILL)
        if self._drain is not None:
            # Let the last lines (often the error) reach the buffer before someone reads the logs.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._drain), 2.0)
        return ExitInfo("exit", code)

    async def close(self) -> None:
        """Nothing beyond stop(): the process backend holds no client connections."""
        await self._stop_drain()

    # --- internals
    async def _drain_output(self, proc: asyncio.subprocess.Process) -> None:
        stream = proc.stdout
        assert stream is not None
        partial = b""
        while True:
            chunk = await stream.read(_READ_CHUNK)
            if not chunk:
                break
            *complete, partial = (partial + chunk).split(b"\n")
            for raw in complete:
                self._lines.append(raw.decode("utf-8", "replace").rstrip("\r"))
            if len(partial) > _READ_CHUNK:
                self._lines.append(partial.decode("utf-8", "replace"))
                partial = b""
        if partial:
            self._lines.append(partial.decode("utf-8", "replace"))

    async def _stop_drain(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(drain), 1.0)
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain

    def _write_pid_file(self, pid: int, argv: list[str], model: str) -> None:
        try:
            self.pid_path.parent.mkdir(parents=True, exist_ok=True)
            self.pid_path.write_bytes(orjson.dumps({"pid": pid, "argv": argv, "model": model,
                                                    "started": time.time()}))
        except OSError as exc:
            self.log.error("runtime_pid_file_unwritable", path=str(self.pid_path), error=str(exc))

    def _remove_pid_file(self) -> None:
        with contextlib.suppress(OSError):
            self.pid_path.unlink()

    async def _kill_leftover(self) -> None:
        """Kill the runtime named by the pid file if it is still the same program (pids get reused)."""
        try:
            record = orjson.loads(self.pid_path.read_bytes())
            pid = int(record["pid"])
            argv = [str(a) for a in record["argv"]]
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.log.warning("runtime_pid_file_unreadable", path=str(self.pid_path), error=str(exc))
            self._remove_pid_file()
            return
        if self._proc is not None and self._proc.pid == pid:
            return
        if _cmdline(pid) == argv:
            self.log.warning("runtime_leftover_process", pid=pid, model=record.get("model"))
            _signal_group(pid, signal.SIGTERM)
            deadline = time.monotonic() + self.settings.runtime_stop_timeout
            while _alive(pid) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            _signal_group(pid, signal.SIGKILL)
            while _alive(pid) and time.monotonic() < deadline + 5:
                await asyncio.sleep(0.05)
        self._remove_pid_file()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    # start_new_session made the runtime a group leader, so its pgid is its pid.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie waiting for its (new) parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
