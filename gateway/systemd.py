"""systemd integration: sd_notify over $NOTIFY_SOCKET (READY, STATUS, WATCHDOG, STOPPING).

Plain standard-library sockets, no libsystemd: a notification is one datagram of `KEY=VALUE` lines sent
to the AF_UNIX socket systemd names in NOTIFY_SOCKET (a path, or `@name` for the abstract namespace).
Without NOTIFY_SOCKET every call is a no-op, so the same code runs under systemd, Compose or a shell.

The watchdog pings from the event loop itself: a blocked loop stops the pings and systemd restarts the
service after WatchdogSec, which is exactly the failure a thread-based pinger would hide.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, MutableMapping

import structlog

log = structlog.get_logger(component="systemd")

_ENV_NAMES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Sends sd_notify datagrams; disabled (every send returns False) when there is no socket."""

    def __init__(self, address: str | None) -> None:
        self.address: str | bytes | None = None
        self._sock: socket.socket | None = None
        if not address:
            return
        if address.startswith("@"):
            # Abstract namespace: systemd spells the leading NUL as '@'.
            self.address = "\0" + address[1:]
        elif address.startswith("/"):
            self.address = address
        else:
            log.warning("notify_socket_unsupported", address=address)
            return
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # Never block the event loop: a datagram to a full socket is dropped rather than waited for.
        self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        """True when notifications go somewhere."""
        return self._sock is not None

    def notify(self, *assignments: str) -> bool:
        """Send `KEY=VALUE` lines in one datagram; False when disabled or the send failed."""
        if self._sock is None or self.address is None:
            return False
        payload = "\n".join(a.replace("\n", " ") if a.startswith("STATUS=") else a for a in assignments)
        try:
            self._sock.sendto(payload.encode(), self.address)
        except OSError as exc:  # includes BlockingIOError: systemd is not reading; never fatal
            log.warning("sd_notify_failed", error=str(exc), message=payload.split("\n", 1)[0])
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1 (with MAINPID, so a wrapper process is no problem) and an optional STATUS."""
        lines = ["READY=1", f"MAINPID={os.getpid()}"]
        if status:
            lines.append(f"STATUS={status}")
        return self.notify(*lines)

    def status(self, text: str) -> bool:
        """STATUS=<text>: what `systemctl status` shows."""
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        """WATCHDOG=1: the service is alive and well."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: shutdown has begun (systemd waits up to TimeoutStopSec)."""
        lines = ["STOPPING=1"]
        if status:
            lines.append(f"STATUS={status}")
        return self.notify(*lines)

    def close(self) -> None:
        """Release the socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(env: MutableMapping[str, str], pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when systemd expects none.

    WATCHDOG_PID, when set, names the process the watchdog applies to; any other process must not ping.
    """
    raw = env.get("WATCHDOG_USEC", "")
    if not raw:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner and owner.isdigit() and int(owner) != (os.getpid() if pid is None else pid):
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("watchdog_usec_invalid", value=raw)
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


def from_environment(env: MutableMapping[str, str] | None = None) -> tuple[Notifier, float | None]:
    """The notifier and watchdog interval for this process, taken out of the environment.

    The variables are removed (sd_notify's unset_environment): the runtime subprocess and any other
    child must not believe it is the service systemd is waiting for.
    """
    env = os.environ if env is None else env
    notifier = Notifier(env.get("NOTIFY_SOCKET"))
    interval = watchdog_interval(env)
    for name in _ENV_NAMES:
        env.pop(name, None)
    return notifier, interval


async def run_watchdog(notifier: Notifier, interval: float, healthy: Callable[[], bool],
                       status: Callable[[], str] | None = None, sent_status: str | None = None) -> None:
    """Ping WATCHDOG=1 every `interval` seconds while `healthy()` is true; keep STATUS current.

    Runs until cancelled. An unhealthy check skips the ping (and says why in STATUS), so systemd
    restarts the service if it stays unhealthy for WatchdogSec. `sent_status` is the STATUS already sent
    (with READY=1), so it is not repeated.
    """
    last_status = sent_status
    lag_warned = False
    was_ok = True
    while True:
        started = time.monotonic()
        try:
            ok = healthy()
        except Exception:
            log.exception("watchdog_health_check_failed")
            ok = False
        if ok:
            notifier.watchdog()
        if ok != was_ok:
            (log.info if ok else log.error)("watchdog_health", healthy=ok,
                                            action="pinging" if ok else "pings skipped")
            was_ok = ok
        text = status() if status is not None else None
        if text is not None and not ok:
            text = f"unhealthy: {text}"
        if text is not None and text != last_status:
            notifier.status(text)
            last_status = text
        await asyncio.sleep(interval)
        # The loop is the thing being watched: say so in the log when it fell far behind.
        lag = time.monotonic() - started - interval
        if lag > interval and not lag_warned:
            log.warning("event_loop_lag", seconds=round(lag, 3), watchdog_interval=interval)
            lag_warned = True
        elif lag <= interval:
            lag_warned = False
