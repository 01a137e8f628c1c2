"""Co-serving: batch requests beside realtime ones on the same runtime, under a realtime latency SLO.

Two mechanisms (docs/co-serving.md):
- **Priority.** With RUNTIME_PRIORITY_SCHEDULING on, the runtime runs with its priority scheduler and
  every upstream request carries a `priority` (lower runs first, as in vLLM): realtime 0, batch jobs
  10–19 by job priority, eval jobs 30. A client's own `priority` never reaches the runtime.
- **Admission.** `AdmissionController` moves the batch concurrency limit between 0 and
  MAX_CONCURRENT_BATCH from what it measures: the realtime TTFT and inter-token latency the gateway
  observes on its own streams, and the runtime's waiting queue and KV-cache use. It backs off
  multiplicatively on a breach and grows additively while there is headroom (AIMD, as in TCP and
  Netflix's concurrency-limits), and jumps to the maximum while no realtime traffic is seen.

Everything here is pure: the clock and the measurements come in as arguments, so the decisions are
unit-tested without sleeping.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

REALTIME_PRIORITY = 0
BATCH_PRIORITY_BASE = 10
EVAL_PRIORITY = 30


def batch_priority(job_priority: int, *, is_eval: bool, job_priority_max: int = 9) -> int:
    """The runtime priority of a batch job: after realtime, higher job priority first, evals last."""
    if is_eval:
        return EVAL_PRIORITY
    return BATCH_PRIORITY_BASE + (job_priority_max - max(0, min(job_priority, job_priority_max)))


class LatencyWindow:
    """Realtime latency samples (seconds) of the last `window` seconds, bounded in count."""

    def __init__(self, window: float = 10.0, max_samples: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.clock = clock
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)

    def add(self, seconds: float) -> None:
        """Record one sample now."""
        self._samples.append((self.clock(), seconds))

    def values(self, since: float = float("-inf")) -> list[float]:
        """The samples still inside the window (and taken after `since`), oldest first."""
        horizon = self.clock() - self.window
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()
        return [v for t, v in self._samples if t > since]

    def quantile(self, q: float, since: float = float("-inf")) -> float | None:
        """The q-quantile (nearest rank) of the window (samples after `since`), or None when it is empty."""
        values = sorted(self.values(since))
        if not values:
            return None
        return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


@dataclass(frozen=True, slots=True)
class RuntimeLoad:
    """The runtime's own gauges, read from its /metrics (None where it does not export one)."""

    waiting: float | None = None
    running: float | None = None
    kv_cache_usage: float | None = None


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    """The controller's targets and pace (settings REALTIME_TTFT_SLO_MS, REALTIME_ITL_SLO_MS, COSERVE_*)."""

    max_limit: int
    ttft_slo: float
    itl_slo: float
    interval: float = 0.5
    quantile: float = 0.95
    headroom: float = 0.5
    """Grow only while the measured TTFT quantile is below this share of its SLO..."""
    itl_headroom: float = 0.7
    """...and the ITL quantile below this share of its (ITL barely depends on the request, so it sits closer
    to its SLO even with no batch at all)."""
    decrease_factor: float = 0.5
    increase_step: int = 1
    kv_high: float = 0.95
    cooldown: float = 2.0
    """After a decrease, no increase for this long: the next measurements must reflect the new limit."""
    min_samples: int = 3
    resume_share: float = 0.125
    """When realtime comes back after an idle spell, the limit starts from the last one realtime traffic was
    served under, or this share of max_limit before any: batch had every slot while realtime was away, and
    the first requests of a burst must not meet all of them."""


@dataclass(frozen=True, slots=True)
class Decision:
    """One step of the controller: the new limit and why."""

    at: float
    limit: int
    reason: str
    ttft: float | None
    itl: float | None
    changed: bool


class AdmissionController:
    """AIMD control of the co-served batch concurrency from realtime latency and runtime load."""

    def __init__(self, config: ControllerConfig, clock: Callable[[], float] = time.monotonic,
                 history: int = 600) -> None:
        self.config = config
        self.clock = clock
        self.limit = config.max_limit
        self.reason = "start"
        self._last_decrease = float("-inf")
        self._active_limit: int | None = None  # the limit while realtime was last active
        self.history: deque[Decision] = deque(maxlen=history)

    def step(self, ttft: LatencyWindow, itl: LatencyWindow, load: RuntimeLoad, *, realtime_active: bool,
             priority: bool, first_token_wait: float = 0.0) -> Decision:
        """Decide the limit from the last window of realtime latency and the runtime's load.

        `realtime_active`: realtime requests arrived within the window. `priority`: the runtime schedules
        realtime first, so its waiting queue holds batch work and says nothing about realtime.
        `first_token_wait`: how long the oldest realtime stream still without a first token has waited, a
        TTFT the window has not seen yet.
        """
        cfg = self.config
        now = self.clock()
        # Only what was measured since the last decrease: older samples show the load of the old limit, and
        # would keep cutting for a whole window after one cut.
        since = self._last_decrease
        ttft_q = ttft.quantile(cfg.quantile, since) if len(ttft.values(since)) >= cfg.min_samples else None
        itl_q = itl.quantile(cfg.quantile, since) if len(itl.values(since)) >= cfg.min_samples else None
        limit, reason = self.limit, "holding"
        if not realtime_active:
            # No realtime traffic to protect: batch may use every slot.
            limit, reason = cfg.max_limit, "realtime_idle"
        elif self.reason in ("realtime_idle", "start"):
            # Realtime is back: start where it was last served well, not from every slot.
            resume = self._active_limit
            if resume is None:
                resume = max(1, math.floor(cfg.max_limit * cfg.resume_share))
            limit, reason = min(self.limit, resume), "realtime_back"
        elif (ttft_q is not None and ttft_q > cfg.ttft_slo) or first_token_wait > cfg.ttft_slo:
            limit, reason = math.floor(self.limit * cfg.decrease_factor), "ttft_over_slo"
        elif itl_q is not None and itl_q > cfg.itl_slo:
            limit, reason = math.floor(self.limit * cfg.decrease_factor), "itl_over_slo"
        elif (load.kv_cache_usage is not None and load.kv_cache_usage >= cfg.kv_high
              and (load.waiting or 0) > 0):
            limit, reason = math.floor(self.limit * cfg.decrease_factor), "kv_cache_full"
        elif not priority and (load.waiting or 0) > 0:
            # First come, first served: whatever waits in the runtime, realtime waits behind it.
            limit, reason = math.floor(self.limit * cfg.decrease_factor), "runtime_queue"
        elif now - self._last_decrease < cfg.cooldown:
            reason = "cooldown"
        elif ((ttft_q is None or ttft_q < cfg.headroom * cfg.ttft_slo)
              and (itl_q is None or itl_q < cfg.itl_headroom * cfg.itl_slo)):
            limit, reason = self.limit + cfg.increase_step, "headroom"
        limit = max(0, min(cfg.max_limit, limit))
        if limit < self.limit:
            self._last_decrease = now
        if realtime_active:
            self._active_limit = limit
        changed = limit != self.limit
        self.limit = limit
        self.reason = reason
        decision = Decision(now, limit, reason, ttft_q, itl_q, changed)
        self.history.append(decision)
        return decision


def parse_runtime_load(text: str) -> RuntimeLoad:
    """The waiting/running/KV gauges from a vLLM (or SGLang) Prometheus text page, summed over engines."""
    names = {"vllm:num_requests_waiting": "waiting", "vllm:num_requests_running": "running",
             "vllm:kv_cache_usage_perc": "kv", "vllm:gpu_cache_usage_perc": "kv",
             "sglang:num_queue_reqs": "waiting", "sglang:num_running_reqs": "running",
             "sglang:token_usage": "kv"}
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name, _, rest = line.partition("{") if "{" in line.split(" ", 1)[0] else line.partition(" ")
        key = names.get(name.strip())
        if key is None:
            continue
        value_text = rest.rsplit("}", 1)[-1].split()[0] if "}" in rest else rest.split()[0]
        try:
            value = float(value_text)
        except ValueError:
            continue
        # Several engines: queues add up; KV use is the fullest engine's.
        found[key] = max(found.get(key, 0.0), value) if key == "kv" else found.get(key, 0.0) + value
    return RuntimeLoad(found.get("waiting"), found.get("running"), found.get("kv"))
