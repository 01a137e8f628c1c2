"""Throttling of failed authentication per client address, and the client address itself.

A client that keeps presenting unknown tokens (bearer headers or the dashboard login form) is refused with
429 for the rest of a window once it has failed AUTH_FAIL_MAX times within AUTH_FAIL_WINDOW_SECONDS, before
its token is even looked up. The table of addresses is bounded (AUTH_FAIL_TABLE_MAX, oldest dropped first),
so a flood of spoofed or rotating addresses cannot grow memory. X-Forwarded-For is honoured only when the
peer is one of TRUSTED_PROXIES: anyone else could name any address in it.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Iterable

from aiohttp import web

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _trusted(address: str, proxies: Iterable[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in proxies)


def client_address(request: web.Request, proxies: tuple[Network, ...]) -> str:
    """The client's address: the peer, or, when the peer is a trusted proxy, the nearest address in
    X-Forwarded-For that is not itself a trusted proxy."""
    peer = request.remote or "unknown"
    if not proxies or not _trusted(peer, proxies):
        return peer
    hops = [h.strip() for h in ",".join(request.headers.getall("X-Forwarded-For", [])).split(",") if h.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, proxies):
            return hop[:64]
    return hops[0][:64] if hops else peer


class AuthThrottle:
    """Failed-authentication counts per client address in fixed windows, in a bounded table."""

    def __init__(self, max_failures: int, window_seconds: float, table_max: int,
                 proxies: tuple[Network, ...] = ()) -> None:
        self.proxies = proxies
        self.max_failures = max_failures
        self.window = window_seconds
        self.table_max = table_max
        self._table: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def _entry(self, address: str, now: float) -> tuple[float, int]:
        started, count = self._table.get(address, (now, 0))
        if now - started >= self.window:
            return now, 0
        return started, count

    def retry_after(self, address: str, now: float | None = None) -> int:
        """Seconds the address must wait before it may try again; 0 when it may try now."""
        now = time.monotonic() if now is None else now
        started, count = self._entry(address, now)
        if count < self.max_failures:
            return 0
        return max(1, math.ceil(started + self.window - now))

    def failed(self, address: str, now: float | None = None) -> None:
        """Count one failed attempt from the address."""
        now = time.monotonic() if now is None else now
        started, count = self._entry(address, now)
        self._table[address] = (started, count + 1)
        self._table.move_to_end(address)
        while len(self._table) > self.table_max:
            self._table.popitem(last=False)

    def __len__(self) -> int:
        return len(self._table)
