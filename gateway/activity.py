"""Realtime activity as the proxy sees it: what the batch dispatcher reads to decide when to swap."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from gateway.batch.coserve import LatencyWindow


class RealtimeActivity:
    """Counts realtime requests in flight and remembers when the last one arrived.

    The proxy calls `begin()`/`end()` around every realtime request and `want_realtime()` when a
    realtime request finds another model loaded; the dispatcher awaits `wanted` to end a batch group.
    """

    def __init__(self, window: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        """Monotonic seconds (injectable: the dispatcher's unit tests share one fake clock with it)."""
        self.in_flight = 0
        self.last_request_at = 0.0
        self.wanted = asyncio.Event()
        self.ttft = LatencyWindow(window)
        """Time to first token of the realtime streams of the last `window` seconds (the co-serving signal)."""
        self.itl = LatencyWindow(window)
        """Mean inter-token latency of each of those streams."""
        self._awaiting: dict[int, float] = {}
        self._next_stream = 0

    def record_stream(self, ttft: float, itl: float | None) -> None:
        """A realtime stream's time to first token and, when it had two tokens or more, its mean ITL."""
        self.ttft.add(ttft)
        if itl is not None:
            self.itl.add(itl)

    def await_first_token(self) -> int:
        """A realtime stream was sent to the runtime: until `first_token`, it counts in `first_token_wait`.
        Returns the handle to pass to `first_token`/`stream_ended`."""
        self._next_stream += 1
        self._awaiting[self._next_stream] = self.clock()
        return self._next_stream

    def first_token(self, handle: int, ttft: float) -> None:
        """The stream's first token arrived `ttft` seconds after the request: a TTFT sample now, not when
        the stream ends (a controller that waits for the end reacts a whole stream late)."""
        if self._awaiting.pop(handle, None) is not None:
            self.ttft.add(ttft)

    def stream_ended(self, handle: int) -> None:
        """The stream ended, failed or was never answered (no sample if no first token came)."""
        self._awaiting.pop(handle, None)

    def record_itl(self, itl: float) -> None:
        """A finished realtime stream's mean inter-token latency."""
        self.itl.add(itl)

    def first_token_wait(self) -> float:
        """Seconds the oldest realtime stream still without its first token has waited (0 if none): a lower
        bound of a TTFT the window has not seen yet."""
        if not self._awaiting:
            return 0.0
        return max(0.0, self.clock() - min(self._awaiting.values()))

    def begin(self) -> None:
        """A realtime request arrived."""
        self.in_flight += 1
        self.last_request_at = self.clock()

    def end(self) -> None:
        """A realtime request finished (any outcome)."""
        self.in_flight -= 1
        self.last_request_at = self.clock()

    def want_realtime(self) -> None:
        """A realtime request found the realtime model not loaded: ask for it back."""
        self.last_request_at = self.clock()
        self.wanted.set()

    def idle_for(self) -> float:
        """Seconds since the last realtime request began or ended (0 while any is in flight)."""
        if self.in_flight:
            return 0.0
        return self.clock() - self.last_request_at if self.last_request_at else float("inf")
