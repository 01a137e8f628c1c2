"""All configuration, read once from the environment (and `.env`) and validated at start-up."""

from __future__ import annotations

import ipaddress
import re
import shlex
import socket
import sys
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class RuntimeBackend(StrEnum):
    """Where the runtime runs: a Docker container, a local subprocess, or somewhere we only probe."""

    DOCKER = "docker"
    PROCESS = "process"
    EXTERNAL = "external"


class RuntimeType(StrEnum):
    """The runtime flavour: decides command line, health and metrics endpoints."""

    VLLM = "vllm"
    SGLANG = "sglang"


class Settings(BaseSettings):
    """Every setting of the gateway. Environment variable names are the field names in upper case."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore",
                                      case_sensitive=False)

    # --- listening
    listen_host: str = "0.0.0.0"
    listen_port: int = Field(8000, ge=0, le=65535)

    # --- Redis
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = Field("", description="Prefix for every Redis key (tests use one of their own)")
    redis_cluster: bool = Field(False, description="REDIS_URL names a node of a Redis Cluster (docs/redis.md)")

    # --- runtime
    runtime_backend: RuntimeBackend = RuntimeBackend.PROCESS
    runtime_type: RuntimeType = RuntimeType.VLLM
    runtime_image: str = ""
    runtime_args: str = ""
    runtime_command: str = ""
    runtime_url: str = ""
    runtime_container_name: str = "llm_runtime"
    runtime_network: str = ""
    runtime_port: int = Field(0, ge=0, le=65535)
    runtime_gpus: str = "auto"
    runtime_cpus: str = Field("", description="CPUs the runtime may run on, e.g. 1-7 (Linux cpu list; empty: "
                              "all). Keeps the gateway's own CPUs free of the runtime's busy-polling engine: "
                              "process backend via sched_setaffinity, docker backend via the container's cpuset")
    runtime_start_timeout: float = Field(900.0, gt=0)
    runtime_stop_timeout: float = Field(20.0, gt=0)
    runtime_failure_dir: str = ""
    runtime_restart_backoff_max: float = Field(60.0, gt=0)
    runtime_expected_start_seconds: float = Field(60.0, gt=0)
    host_hf_cache: str = ""
    # RuntimeSupervisor / backends (see gateway/backends/): extra environment for the runtime as shell
    # words KEY=VALUE (e.g. HF_TOKEN=..., VLLM_SERVER_DEV_MODE=1); never logged.
    runtime_env: str = ""
    runtime_pid_file: str = Field("", description="Process backend: where the runtime's pid is kept so a "
                                  "restarted gateway can replace a leftover; default var/runtime[-<prefix>].pid")
    runtime_shm_size: str = Field("8g", description="Docker backend: /dev/shm size (PyTorch workers share "
                                  "tensors through it); ignored when RUNTIME_IPC_HOST is true")
    runtime_ipc_host: bool = False
    # Liveness of a ready managed runtime (gateway/actors/supervisor.py): a health probe every interval;
    # this many failures in a row restart it with a crash log. 0 turns the probe off.
    runtime_liveness_interval: float = Field(10.0, ge=0, description="Seconds between health probes of a ready "
                                             "managed runtime (0: off)")
    runtime_liveness_timeout: float = Field(5.0, gt=0, description="How long one liveness probe may take")
    runtime_liveness_failures: int = Field(3, ge=1, le=1000, description="Failed liveness probes in a row that "
                                           "restart the runtime")
    runtime_docker_healthcheck: bool = True

    # --- models
    realtime_model: str = "synquid/gemma-3-27b-it-FP8"
    model_aliases: str = ""
    batch_models: str = Field("", description="Models batch work, Batches lines and evals may run besides the "
                              "realtime model and its aliases: comma-separated names or glob patterns "
                              "(e.g. 'google/gemma-3-*'); empty: the realtime model only, '*': any valid name")
    # Bounds on one request's generation, realtime and batch alike (gateway/policy.py).
    request_max_n: int = Field(16, ge=1, le=1024, description="Largest `n` (and `best_of`) one request may ask for")
    request_max_tokens: int = Field(32768, ge=1, le=10_000_000, description="Largest `max_tokens` (and "
                                    "`max_completion_tokens`) one request may ask for")

    # --- proxy
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0)
    upstream_connect_timeout: float = Field(5.0, gt=0)
    upstream_read_timeout: float = Field(600.0, gt=0)
    upstream_max_connections: int = Field(1024, gt=0)
    # Slow clients: a connection must deliver a complete request head within CLIENT_HEADER_TIMEOUT of
    # connecting (or of its previous response; aiohttp's keepalive_timeout), and a body must arrive
    # within CLIENT_BODY_TIMEOUT (JSON bodies: whole; streamed uploads: between two pieces).
    client_header_timeout: float = Field(60.0, gt=0)
    client_body_timeout: float = Field(60.0, gt=0)

    # --- batch
    max_concurrent_batch: int = Field(8, ge=1, le=4096)
    batch_dispatcher_enabled: bool = True
    # Batch queue (issue 3; see docs/batch.md for the rules these tune).
    batch_job_ttl_seconds: int = Field(7 * 24 * 3600, gt=0)
    batch_max_attempts: int = Field(3, ge=1, le=100)
    batch_lease_seconds: float = Field(6.0, ge=0.1, description="A dead gateway's jobs are taken over once "
                                       "this lease runs out (renewed every third of it)")
    batch_aging_seconds: float = Field(60.0, ge=0)
    batch_request_timeout: float = Field(600.0, gt=0)
    batch_retry_backoff_seconds: float = Field(1.0, ge=0)
    batch_retry_backoff_max: float = Field(30.0, ge=0)
    batch_poll_interval: float = Field(1.0, gt=0)
    batch_max_metadata_items: int = Field(16, ge=0)
    batch_key_max_jobs: int = Field(100_000, ge=1, le=100_000_000, description="Jobs one key may hold (queued, "
                                    "running, or finished and kept until BATCH_JOB_TTL_SECONDS); with "
                                    "MAX_BODY_BYTES this bounds the request bytes a key can store")
    job_stream_maxlen: int = Field(1_000_000, ge=0)
    job_stream_max_age_seconds: int = Field(0, ge=0)
    swap_realtime_idle_seconds: float = Field(60.0, ge=0)
    swap_grace_seconds: float = Field(10.0, ge=0)
    batch_max_residency_seconds: float = Field(1800.0, gt=0)
    realtime_min_residency_seconds: float = Field(300.0, ge=0)
    runtime_sleep_mode: bool = False

    # --- co-serving (docs/co-serving.md): batch beside realtime on the same runtime, under a latency SLO
    runtime_priority_scheduling: Literal["auto", "on", "off"] = Field(
        "auto", description="Run the runtime's priority scheduler and send each request's priority "
        "(realtime first); auto = on for a managed vLLM or SGLang runtime, off for an external one")
    realtime_ttft_slo_ms: float = Field(500.0, gt=0, description="Realtime time to first token (p95) that "
                                        "co-served batch work must not push realtime beyond")
    realtime_itl_slo_ms: float = Field(100.0, gt=0, description="Realtime inter-token latency (p95) target")
    coserve_adaptive: bool = Field(True, description="Size the co-served batch concurrency from measured "
                                   "realtime latency (off: a fixed MAX_CONCURRENT_BATCH)")
    coserve_interval_seconds: float = Field(0.5, gt=0, description="How often the co-serving controller "
                                            "decides")
    coserve_window_seconds: float = Field(10.0, gt=0, description="The realtime latency window it judges")

    # --- auth and accounting
    auth_keys_file: str = "config/auth.keys.json"
    internal_eval_key_id: str = "__internal_eval__"
    # Failed authentication (unknown bearer tokens, refused dashboard logins) per client address: after
    # AUTH_FAIL_MAX failures within AUTH_FAIL_WINDOW_SECONDS the address gets 429 until the window ends.
    auth_fail_max: int = Field(20, ge=1, le=1_000_000, description="Failed authentications one client "
                               "address may make per window before it is refused with 429")
    auth_fail_window_seconds: float = Field(60.0, gt=0, description="The window AUTH_FAIL_MAX counts in")
    auth_fail_table_max: int = Field(10_000, ge=1, le=10_000_000, description="Client addresses tracked "
                                     "at once (oldest forgotten first)")
    trusted_proxies: str = Field("", description="Comma-separated addresses or CIDR networks of reverse "
                                 "proxies whose X-Forwarded-For names the client; empty: none trusted")
    usage_buffer_max: int = Field(100_000, gt=0)
    usage_flush_interval: float = Field(0.25, gt=0)
    usage_daily_ttl_days: int = Field(90, gt=0)

    # --- evaluations (docs/evals.md): the EvalRunner, the eval-repo harness and the EuroEval adapter
    euroeval_debug_log: str = "./euroeval_debug.log"
    eval_repo_dir: str = Field(str(Path(__file__).resolve().parent.parent / "eval-repo"), min_length=1,
                               description="Directory holding run_eval.py (the eval-repo protocol)")
    euroeval_command: str = Field("euroeval", min_length=1, description="The EuroEval command line (shell words)")
    euroeval_work_dir: str = Field("./var/euroeval", min_length=1, description="Per-run working directories "
                                   "(EuroEval writes its results file in its cwd) and the shared dataset cache")
    euroeval_timeout_seconds: float = Field(24 * 3600.0, gt=0)
    eval_max_in_flight: int = Field(64, ge=1, le=100_000, description="Batch jobs one eval run keeps queued "
                                    "or running at a time")
    eval_poll_interval: float = Field(1.0, gt=0, description="Fallback poll of a run's jobs when no job event "
                                      "arrives")
    eval_lease_seconds: float = Field(6.0, ge=1, description="A run is resumed by another gateway (or after a "
                                      "crash) once its owner stops renewing this lease")
    eval_log_tail_lines: int = Field(40, ge=1, le=1000)

    # --- resumable uploads (TUS)
    upload_dir: str = Field("./var/uploads", min_length=1)
    upload_max_size: int = Field(1024 ** 3, gt=0, description="Largest upload in bytes (Tus-Max-Size)")
    upload_key_quota_bytes: int = Field(10 * 1024 ** 3, gt=0, description="Bytes one key may keep stored")
    upload_expiry_seconds: float = Field(24 * 3600.0, gt=0, description="Unfinished uploads expire after "
                                         "this long without a PATCH that adds bytes")
    upload_max_lifetime_seconds: float = Field(7 * 24 * 3600.0, gt=0, description="An unfinished upload "
                                               "expires this long after its creation, however it progresses")
    upload_key_max_uploads: int = Field(1000, ge=1, le=1_000_000, description="Uploads (finished or not, "
                                        "partial ones included) one key may hold")
    upload_metadata_max_bytes: int = Field(2048, ge=64, le=8000, description="Longest Upload-Metadata header "
                                           "kept with an upload")
    upload_concat_max_parts: int = Field(64, ge=1, le=1000, description="Most partial uploads one "
                                         "concatenation (Upload-Concat: final) may join")
    upload_sweep_interval: float = Field(300.0, gt=0)

    # --- OpenAI Files and Batches API (docs/files-and-batches.md)
    openai_batch_max_lines: int = Field(50_000, ge=1, description="Most requests in one batch input file")
    openai_batch_max_file_bytes: int = Field(200 * 1024 * 1024, ge=1, description="Largest batch input file")
    openai_batch_window_seconds: float = Field(24 * 3600.0, gt=0, description="What completion_window "
                                               "'24h' means: unfinished lines expire after this long")
    openai_batch_enqueue_chunk: int = Field(50, ge=1, le=1000, description="Lines enqueued per Redis "
                                            "transaction (building one blocks the event loop ~60 us a line)")
    openai_batch_rescan_seconds: float = Field(15.0, gt=0, description="How often the batch manager re-reads "
                                               "the status of unfinished jobs besides following the event stream")

    # --- fleet (docs/fleet.md): several gateways on one Redis
    node_id: str = Field(default_factory=socket.gethostname, min_length=1, max_length=200,
                         description="This gateway's name in the node registry (default: the host name; set "
                         "it when several gateways run on one host)")
    node_address: str = Field("", max_length=500, description="The URL other nodes and operators reach this "
                              "gateway at (default: http://<host name>:<LISTEN_PORT>)")
    fleet_heartbeat_seconds: float = Field(2.0, gt=0, description="How often a node refreshes its registry entry")
    fleet_node_ttl_seconds: float = Field(10.0, gt=0, description="A node's entry expires this long after its "
                                          "last heartbeat")
    fleet_lease_seconds: float = Field(6.0, ge=1, description="Swap-slot and batch-owner leases; a dead node's "
                                       "are taken over once they run out (renewed every third of it)")
    fleet_max_swapped_nodes: int = Field(0, ge=0, le=10_000, description="Most nodes off the realtime model at "
                                         "once (0: all but one)")
    fleet_swap_min_jobs: int = Field(20, ge=1, description="Queued jobs for a model that are worth a swap on "
                                     "their own, per node swapped to it")
    fleet_swap_max_wait_seconds: float = Field(120.0, ge=0, description="A smaller queue is worth a swap once "
                                               "its oldest job has waited this long (when no node serves it)")

    # --- dashboard (gateway/http/dashboard.py): the session cookie is signed with DASHBOARD_SECRET, or with a
    # random per-process secret when unset (sessions then end when the gateway restarts).
    dashboard_secret: str = Field("", description="HMAC secret for dashboard session cookies (>= 32 chars)")
    dashboard_session_seconds: float = Field(12 * 3600.0, ge=60, le=30 * 86400)

    # --- operations (issue 7): how often the batch queue depth gauge is refreshed from Redis, and how many
    # jobs per model are read to split it by priority (the rest count as priority "unknown").
    queue_depth_refresh_seconds: float = Field(5.0, gt=0)
    queue_depth_sample_max: int = Field(50_000, ge=1)

    # --- logging
    log_level: str = "info"
    log_format: str = "auto"
    shutdown_timeout: float = Field(30.0, gt=0)

    @field_validator("runtime_args", "runtime_command", "euroeval_command")
    @classmethod
    def _shell_words(cls, value: str) -> str:
        try:
            shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"not a valid shell word list: {exc}") from exc
        return value

    @field_validator("runtime_env")
    @classmethod
    def _env_words(cls, value: str) -> str:
        try:
            words = shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"not a valid shell word list: {exc}") from exc
        bad = [w.split("=", 1)[0] for w in words if "=" not in w or not w.split("=", 1)[0]]
        if bad:
            raise ValueError(f"use KEY=VALUE words (bad: {', '.join(bad)})")
        return value

    @field_validator("runtime_shm_size")
    @classmethod
    def _shm_size(cls, value: str) -> str:
        value = value.strip().lower()
        if not re.fullmatch(r"\d+[kmg]?b?", value):
            raise ValueError("use a size such as 8g, 512m or a byte count")
        return value

    @field_validator("runtime_cpus")
    @classmethod
    def _cpus(cls, value: str) -> str:
        value = value.strip().replace(" ", "")
        if value and not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", value):
            raise ValueError("use a Linux CPU list such as 1-7 or 0,2-3 (empty: every CPU)")
        return value

    @property
    def runtime_cpu_set(self) -> set[int]:
        """RUNTIME_CPUS as a set of CPU numbers (empty: no restriction)."""
        cpus: set[int] = set()
        for part in filter(None, self.runtime_cpus.split(",")):
            low, _, high = part.partition("-")
            cpus.update(range(int(low), int(high or low) + 1))
        return cpus

    @field_validator("runtime_gpus")
    @classmethod
    def _gpus(cls, value: str) -> str:
        value = value.strip().lower()
        if value in {"auto", "all", "none"}:
            return value
        parts = [p.strip() for p in value.split(",")]
        if not parts or not all(p.isdigit() for p in parts):
            raise ValueError("use auto, all, none or a comma list of GPU indices such as 0,1")
        return ",".join(parts)

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.lower()
        if value not in {"debug", "info", "warning", "error"}:
            raise ValueError("use debug, info, warning or error")
        return value

    @field_validator("log_format")
    @classmethod
    def _format(cls, value: str) -> str:
        value = value.lower()
        if value not in {"auto", "json", "console"}:
            raise ValueError("use auto, json or console")
        return value

    @field_validator("dashboard_secret")
    @classmethod
    def _dashboard_secret(cls, value: str) -> str:
        if value and len(value) < 32:
            raise ValueError("use at least 32 characters (e.g. `python -c 'import secrets; "
                             "print(secrets.token_urlsafe(32))'`), or leave it empty for a per-process secret")
        return value

    @field_validator("batch_models")
    @classmethod
    def _batch_models(cls, value: str) -> str:
        bad = [p.strip() for p in value.split(",") if p.strip() and
               (len(p.strip()) > 200 or not re.fullmatch(r"[A-Za-z0-9._/:@+*?\[\]~-]+", p.strip()))]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a model name or glob pattern")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, value: str) -> str:
        for part in value.split(","):
            if part.strip():
                try:
                    ipaddress.ip_network(part.strip(), strict=False)
                except ValueError:
                    raise ValueError(f"{part.strip()!r} is not an IP address or CIDR network") from None
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("redis_prefix")
    @classmethod
    def _redis_prefix(cls, value: str) -> str:
        # Braces would become a Redis Cluster hash tag and move every key into one slot of the prefix's.
        if "{" in value or "}" in value:
            raise ValueError("must not contain { or } (Redis Cluster reads braces as a hash tag)")
        if len(value) > 100:
            raise ValueError("use at most 100 characters")
        return value

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, value: str) -> str:
        value = value.strip()
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:@-]*", value):
            raise ValueError("use letters, digits and _ . : @ - (a host name, say)")
        return value

    @field_validator("realtime_model")
    @classmethod
    def _model(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name the model to keep hot")
        return value.strip()

    @model_validator(mode="after")
    def _backend_needs(self) -> Settings:
        if self.runtime_backend is RuntimeBackend.EXTERNAL and not self.runtime_url:
            raise ValueError("RUNTIME_URL is required when RUNTIME_BACKEND=external")
        if self.runtime_backend is RuntimeBackend.DOCKER and not self.runtime_image:
            raise ValueError("RUNTIME_IMAGE is required when RUNTIME_BACKEND=docker")
        return self

    # --- derived values
    @property
    def runtime_args_list(self) -> list[str]:
        """RUNTIME_ARGS split like a shell would."""
        return shlex.split(self.runtime_args)

    @property
    def priority_scheduling(self) -> bool:
        """Whether upstream requests carry a priority (and a managed runtime runs its priority scheduler)."""
        if self.runtime_priority_scheduling == "auto":
            return self.runtime_backend is not RuntimeBackend.EXTERNAL
        return self.runtime_priority_scheduling == "on"

    @property
    def runtime_command_list(self) -> list[str]:
        """The program the process backend runs; the simulator when unset."""
        if self.runtime_command:
            return shlex.split(self.runtime_command)
        return [sys.executable, "-m", "gateway.simulator"]

    @property
    def aliases(self) -> frozenset[str]:
        """Other names clients may use for the realtime model."""
        return frozenset(a.strip() for a in self.model_aliases.split(",") if a.strip())

    @property
    def batch_model_patterns(self) -> tuple[str, ...]:
        """BATCH_MODELS as a tuple of names or glob patterns."""
        return tuple(p.strip() for p in self.batch_models.split(",") if p.strip())

    @property
    def listens_on_loopback_only(self) -> bool:
        """True when LISTEN_HOST is a loopback address (or localhost): nothing off this machine can connect."""
        if self.listen_host.strip().lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.listen_host.strip()).is_loopback
        except ValueError:
            return False

    @property
    def trusted_proxy_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """TRUSTED_PROXIES as networks."""
        return tuple(ipaddress.ip_network(p.strip(), strict=False) for p in self.trusted_proxies.split(",")
                     if p.strip())

    @property
    def runtime_env_dict(self) -> dict[str, str]:
        """RUNTIME_ENV as a mapping."""
        return dict(w.split("=", 1) for w in shlex.split(self.runtime_env))

    @property
    def runtime_shm_bytes(self) -> int:
        """RUNTIME_SHM_SIZE in bytes."""
        value = self.runtime_shm_size.rstrip("b")
        scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(value[-1:], 1)
        return int(value.rstrip("kmg")) * scale

    @property
    def runtime_pid_path(self) -> Path:
        """Pid file of the process backend; one per gateway instance (Redis prefix) by default."""
        if self.runtime_pid_file:
            return Path(self.runtime_pid_file)
        suffix = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.redis_prefix).strip("_.")
        return Path("var") / (f"runtime-{suffix}.pid" if suffix else "runtime.pid")

    @property
    def node_url(self) -> str:
        """NODE_ADDRESS, or where this gateway listens as seen from another host."""
        return self.node_address or f"http://{socket.gethostname()}:{self.listen_port}"

    @property
    def failure_dir(self) -> Path:
        """Where crash logs of the runtime go."""
        if self.runtime_failure_dir:
            return Path(self.runtime_failure_dir)
        if Path("/host_hf_cache").is_dir():
            return Path("/host_hf_cache/runtime_failures")
        return Path("var/runtime_failures")


class SettingsError(Exception):
    """Raised with one human-readable line per invalid variable."""


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment, turning validation errors into one clear message."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = "_".join(str(p) for p in err["loc"]).upper() or "settings"
            msg = err["msg"].removeprefix("Value error, ")
            value = err.get("input")
            shown = f" (got {value!r})" if isinstance(value, (str, int, float)) and loc != "settings" else ""
            lines.append(f"invalid setting {loc}{shown}: {msg}")
        raise SettingsError("; ".join(lines)) from None
