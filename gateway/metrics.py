"""Every Prometheus metric object of the gateway, in one registry.

Label sets stay bounded: routes are route templates, key ids come from the keys file, states and
reasons are enums.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.core import GaugeMetricFamily

from gateway import __version__


class ChildCache:
    """Labelled children of one metric, cached: `labels()` validates and locks on every call, which
    shows up on the proxy's per-request path. Only for label sets that are bounded anyway."""

    __slots__ = ("_metric", "_children")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *labels: str) -> Any:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._metric.labels(*labels)
        return child


REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# --- HTTP front
HTTP_REQUESTS = Counter("llm_gateway_http_requests_total", "HTTP requests handled, by route template, "
                        "method and status", ["route", "method", "status"], registry=REGISTRY)
HTTP_LATENCY = Histogram("llm_gateway_http_request_duration_seconds", "Time to the full HTTP response "
                         "(streams: until the last byte)", ["route"], buckets=_LATENCY_BUCKETS,
                         registry=REGISTRY)
HTTP_REQUESTS_BY = ChildCache(HTTP_REQUESTS)
HTTP_LATENCY_BY = ChildCache(HTTP_LATENCY)
HTTP_IN_FLIGHT = Gauge("llm_gateway_http_requests_in_flight", "HTTP requests being handled",
                       registry=REGISTRY)

# --- realtime proxy
UPSTREAM_TTFT = Histogram("llm_gateway_upstream_time_to_first_token_seconds", "Time from forwarding a "
                          "request to the runtime to its first response byte (streams: first chunk)",
                          ["endpoint"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
UPSTREAM_ERRORS = Counter("llm_gateway_upstream_errors_total", "Realtime requests that failed at the "
                          "runtime boundary, by reason", ["reason"], registry=REGISTRY)
TOKENS = Counter("llm_gateway_tokens_total", "Tokens reported by the runtime, by key id and kind "
                 "(prompt or completion)", ["key_id", "kind"], registry=REGISTRY)
TOKENS_BY = ChildCache(TOKENS)
UPSTREAM_TTFT_BY = ChildCache(UPSTREAM_TTFT)

# --- runtime supervisor
RUNTIME_STATE = Gauge("llm_gateway_runtime_state", "1 for the runtime's current state, 0 for the others",
                      ["state"], registry=REGISTRY)
RUNTIME_RESTARTS = Counter("llm_gateway_runtime_restarts_total", "Runtime restarts after a crash or "
                           "failed start", registry=REGISTRY)
RUNTIME_CRASHES = Counter("llm_gateway_runtime_crashes_total", "Runtime exits the gateway did not ask "
                          "for, by reason (exit, oom, unhealthy, start_failed)", ["reason"],
                          registry=REGISTRY)
RUNTIME_START_SECONDS = Histogram("llm_gateway_runtime_start_duration_seconds", "Time from starting the "
                                  "runtime to ready", buckets=(1, 2, 5, 10, 30, 60, 120, 300, 600, 1200),
                                  registry=REGISTRY)
RUNTIME_SWAPS = Counter("llm_gateway_runtime_swaps_total", "Times the runtime was replaced to serve "
                        "another model", registry=REGISTRY)

# --- usage accounting
USAGE_EVENTS_DROPPED = Counter("llm_gateway_usage_events_dropped_total", "Usage events dropped because "
                               "the buffer was full while Redis was unreachable", registry=REGISTRY)
USAGE_BUFFERED = Gauge("llm_gateway_usage_events_buffered", "Usage events waiting to be written to Redis",
                       registry=REGISTRY)
USAGE_FLUSH_FAILURES = Counter("llm_gateway_usage_flush_failures_total", "Failed attempts to write usage "
                               "to Redis (retried)", registry=REGISTRY)

# --- actors
ACTOR_RESTARTS = Counter("llm_gateway_actor_restarts_total", "Actor run loops restarted after a crash",
                         ["actor"], registry=REGISTRY)

# --- batch queue and dispatcher
BATCH_JOBS = Counter("llm_gateway_batch_jobs_total", "Batch job state changes, by event (enqueued, "
                     "started, retried, requeued, completed, failed, cancelled)", ["event"],
                     registry=REGISTRY)
BATCH_IN_FLIGHT = Gauge("llm_gateway_batch_requests_in_flight", "Batch requests this gateway has sent to "
                        "the runtime and not yet finished", registry=REGISTRY)
BATCH_SLOTS = Gauge("llm_gateway_batch_slots", "MAX_CONCURRENT_BATCH of this gateway", registry=REGISTRY)
COSERVE_LIMIT = Gauge("llm_gateway_coserve_batch_limit", "Batch requests allowed at the runtime now (0 to "
                      "MAX_CONCURRENT_BATCH), set by the co-serving controller", registry=REGISTRY)
COSERVE_CHANGES = Counter("llm_gateway_coserve_limit_changes_total", "Changes of the co-served batch limit, by "
                          "reason", ["reason"], registry=REGISTRY)
COSERVE_REALTIME_TTFT = Gauge("llm_gateway_coserve_realtime_ttft_p95_seconds", "Realtime time to first token "
                              "(p95 over COSERVE_WINDOW_SECONDS) as the co-serving controller saw it",
                              registry=REGISTRY)
COSERVE_PREEMPTED = Counter("llm_gateway_coserve_preempted_total", "Batch requests stopped and requeued (no "
                            "attempt counted) to bring realtime latency back under its SLO", registry=REGISTRY)
BATCH_SLOT_BUSY_SECONDS = Counter("llm_gateway_batch_slot_busy_seconds_total", "Integral of batch slots in "
                                  "use over time (rate / slots = slot utilisation)", registry=REGISTRY)
BATCH_QUEUED = Gauge("llm_gateway_batch_jobs_queued", "Jobs waiting in the shared queue (all models)",
                     registry=REGISTRY)
BATCH_QUEUE_WAIT = Histogram("llm_gateway_batch_queue_wait_seconds", "Time from enqueue to the first "
                             "attempt", buckets=_LATENCY_BUCKETS + (600, 1800, 3600), registry=REGISTRY)
BATCH_ATTEMPT_SECONDS = Histogram("llm_gateway_batch_attempt_duration_seconds", "Duration of one attempt "
                                  "at the runtime, by outcome (ok, transient, permanent, cancelled)",
                                  ["outcome"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
BATCH_SWAPS = Counter("llm_gateway_batch_swaps_total", "Model swaps the dispatcher asked for, by reason "
                      "(batch_group, group_done, realtime_wanted, max_residency, load_failed)",
                      ["reason"], registry=REGISTRY)
BATCH_SWAP_SECONDS = Histogram("llm_gateway_batch_swap_duration_seconds", "Time from asking for a swap to "
                               "the runtime being ready with the new model, by reason", ["reason"],
                               buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200),
                               registry=REGISTRY)

# --- resumable uploads (TUS)
UPLOAD_BYTES_RECEIVED = Counter("llm_gateway_upload_bytes_received_total", "Upload bytes written to disk "
                                "and acknowledged (discarded chunks are not counted)", registry=REGISTRY)
UPLOADS_CREATED = Counter("llm_gateway_uploads_created_total", "TUS uploads created", registry=REGISTRY)
UPLOADS_COMPLETED = Counter("llm_gateway_uploads_completed_total", "TUS uploads that received their last "
                            "byte", registry=REGISTRY)
UPLOADS_EXPIRED = Counter("llm_gateway_uploads_expired_total", "Unfinished TUS uploads removed by the "
                          "sweeper after they expired", registry=REGISTRY)
UPLOAD_STORED_BYTES = Gauge("llm_gateway_upload_stored_bytes", "Bytes held by uploads on disk (declared "
                            "length, or bytes received while the length is deferred)", registry=REGISTRY)

# --- evaluation runs (EvalRunner)
EVAL_RUNS = Counter("llm_gateway_eval_runs_total", "Eval run state changes, by harness (eval-repo, euroeval) and "
                    "event (created, started, resumed, completed, failed, cancelled)", ["harness", "event"],
                    registry=REGISTRY)
EVAL_RUNS_ACTIVE = Gauge("llm_gateway_eval_runs_active", "Eval runs this gateway is working on", ["harness"],
                         registry=REGISTRY)
EVAL_SAMPLES = Counter("llm_gateway_eval_samples_total", "Eval-repo samples, by event (submitted, answered, "
                       "failed)", ["event"], registry=REGISTRY)

# --- OpenAI Files and Batches API (batch manager)
OPENAI_BATCHES = Counter("llm_gateway_openai_batches_total", "OpenAI-style batches, by event (created, "
                         "completed, failed, expired, cancelled)", ["event"], registry=REGISTRY)
OPENAI_BATCH_LINES = Counter("llm_gateway_openai_batch_lines_total", "Input lines of OpenAI-style batches, by "
                             "outcome (enqueued, invalid)", ["outcome"], registry=REGISTRY)
OPENAI_BATCHES_ACTIVE = Gauge("llm_gateway_openai_batches_active", "Batches this gateway is driving (not yet "
                              "in a final state)", registry=REGISTRY)

# --- operations (issue 7: metrics completeness, systemd drain, operator actions)
class _QueueDepth:
    """`llm_gateway_batch_queue_depth{model,priority}` from a cached table (QueueDepthSampler refreshes it).

    A collector rather than a Gauge: each refresh replaces the whole table, so a model whose queue
    emptied disappears instead of lingering with a stale value. Models beyond the largest
    QUEUE_DEPTH_MAX_MODELS are summed under model="other", priority="unknown" (user-chosen names must not
    grow the label set).
    """

    name = "llm_gateway_batch_queue_depth"
    documentation = ("Jobs waiting in the shared batch queue, by model and priority (0-9; 'unknown' past "
                     "the sampled head of a very long queue); refreshed every QUEUE_DEPTH_REFRESH_SECONDS")

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], int] = {}
        self.refreshed_at = 0.0

    def set(self, rows: dict[tuple[str, str], int], at: float) -> None:
        """Replace the table (one atomic attribute swap; scrapes see the old or the new one)."""
        self.rows = dict(rows)
        self.refreshed_at = at

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily(self.name, self.documentation, labels=["model", "priority"])]

    def collect(self) -> list[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=["model", "priority"])
        for (model, priority), value in sorted(self.rows.items()):
            family.add_metric([model, priority], value)
        refreshed = GaugeMetricFamily("llm_gateway_batch_queue_depth_refreshed_timestamp_seconds",
                                      "Unix time of the last queue depth refresh (0: never)",
                                      value=self.refreshed_at)
        return [family, refreshed]


QUEUE_DEPTH = _QueueDepth()
REGISTRY.register(QUEUE_DEPTH)  # type: ignore[arg-type, unused-ignore]
QUEUE_DEPTH_MAX_MODELS = 20

OPERATOR_ACTIONS = Counter("llm_gateway_operator_actions_total", "Runtime actions asked for through "
                           "/monitor/runtime/* (the CLI's `runtime restart|swap`), by action and outcome "
                           "(accepted, refused)", ["action", "outcome"], registry=REGISTRY)
DRAINING = Gauge("llm_gateway_draining", "1 while the gateway drains after SIGTERM", registry=REGISTRY)
BUILD_INFO = Gauge("llm_gateway_build_info", "Always 1; the version is a label", ["version"], registry=REGISTRY)
BUILD_INFO.labels(__version__).set(1)

# --- reliability (issue 8): process internals the load test (scripts/load_streams.py) watches
ASYNCIO_TASKS = Gauge("llm_gateway_asyncio_tasks", "asyncio tasks alive in the gateway's event loop "
                      "(refreshed at each scrape); back at its idle level once traffic stops", registry=REGISTRY)

# Known label values start at 0, so rates and dashboards work before the first event of each kind.
for _event in ("enqueued", "started", "retried", "requeued", "completed", "failed", "cancelled"):
    BATCH_JOBS.labels(_event)
for _reason in ("batch_group", "group_done", "realtime_wanted", "max_residency", "load_failed", "model_changed"):
    BATCH_SWAPS.labels(_reason)
for _action in ("restart", "swap"):
    for _outcome in ("accepted", "refused"):
        OPERATOR_ACTIONS.labels(_action, _outcome)


def render() -> bytes:
    """The Prometheus text exposition of every metric."""
    return _generate_latest(REGISTRY)
