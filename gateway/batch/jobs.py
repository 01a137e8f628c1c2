"""Batch job schemas: what a submission may contain and how a job hash is shown to its owner."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

from gateway.errors import bad_request
from gateway.redis_codec import RawHash, text_hash

PRIORITY_MIN = 0
PRIORITY_MAX = 9
METADATA_KEY_MAX = 64
METADATA_VALUE_MAX = 512


class JobStatus(StrEnum):
    """Where a job is in its life; the last three are final."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        """True when nothing will happen to the job any more."""
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


class Endpoint(StrEnum):
    """The runtime endpoint a job is sent to."""

    COMPLETIONS = "/v1/completions"
    CHAT_COMPLETIONS = "/v1/chat/completions"


@dataclass(frozen=True, slots=True)
class Submission:
    """A validated batch request: the runtime body (without the batch-only fields) and the job fields."""

    endpoint: Endpoint
    model: str
    priority: int
    metadata: dict[str, str]
    body: bytes


def new_job_id(now: float | None = None) -> str:
    """A job id whose text order is its creation order (microseconds in fixed-width hex + randomness).

    Time order in the id gives FIFO tie-breaks in sorted sets and cursor pagination for free.
    """
    micros = time.time_ns() // 1000 if now is None else round(now * 1_000_000)
    return f"job_{micros:014x}{secrets.token_hex(5)}"


def parse_submission(data: dict[str, Any], endpoint: Endpoint, *, max_metadata_items: int,
                     model_aliases: frozenset[str] = frozenset(), realtime_model: str = "") -> Submission:
    """Validate a batch body (the realtime body plus `priority` and `metadata`) or raise a clear 400."""
    model = data.get("model")
    if not isinstance(model, str) or not model.strip():
        raise bad_request("'model' is required: a non-empty string naming the model to run.", param="model")
    model = model.strip()
    if model in model_aliases and realtime_model:
        model = realtime_model
    if data.get("stream"):
        raise bad_request("Batch jobs do not stream: drop 'stream' (or set it to false) and poll the job's "
                          "status_url for the result.", param="stream")
    if endpoint is Endpoint.COMPLETIONS:
        prompt = data.get("prompt")
        if prompt is None or prompt == "" or prompt == []:
            raise bad_request("'prompt' is required: a string or a list of strings/token ids.", param="prompt")
        if not isinstance(prompt, (str, list)):
            raise bad_request(f"'prompt' must be a string or a list, not {_json_type(prompt)}.", param="prompt")
    else:
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad_request("'messages' is required: a non-empty list of {role, content} objects.",
                              param="messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise bad_request(f"messages[{i}] must be an object with a string 'role'.",
                                  param=f"messages[{i}]")
    priority = data.get("priority", 0)
    if priority is None:
        priority = 0
    if isinstance(priority, bool) or not isinstance(priority, int) or not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise bad_request(f"'priority' must be an integer from {PRIORITY_MIN} to {PRIORITY_MAX} (higher runs "
                          f"first), not {orjson.dumps(priority).decode()}.", param="priority")
    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise bad_request("'metadata' must be an object mapping strings to strings.", param="metadata")
    if len(metadata) > max_metadata_items:
        raise bad_request(f"'metadata' may hold at most {max_metadata_items} entries.", param="metadata")
    for key, value in metadata.items():
        if not isinstance(value, str) or len(key) > METADATA_KEY_MAX or len(value) > METADATA_VALUE_MAX:
            raise bad_request(f"metadata[{key[:METADATA_KEY_MAX]!r}]: keys are strings of at most "
                              f"{METADATA_KEY_MAX} characters and values strings of at most "
                              f"{METADATA_VALUE_MAX}.", param="metadata")
    body = {k: v for k, v in data.items() if k not in ("priority", "metadata")}
    body["model"] = model
    body.pop("stream", None)
    body.pop("stream_options", None)
    return Submission(endpoint=endpoint, model=model, priority=priority, metadata=metadata,
                      body=orjson.dumps(body))


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def decode_hash(raw: RawHash) -> dict[str, str]:
    """A job hash as read with decode_responses=False, with text keys and values."""
    return text_hash(raw)


def _float(value: str | None) -> float | None:
    return float(value) if value else None


def job_view(job: dict[str, str], *, include_result: bool = True,
             waiting_reason: dict[str, Any] | None = None) -> dict[str, Any]:
    """The public JSON of a job (GET /v1/jobs/<id>) from its decoded hash.

    `waiting_reason` (JobQueue.explain) says why a queued job is not running yet.
    """
    created = _float(job.get("created_at")) or 0.0
    started = _float(job.get("started_at"))
    finished = _float(job.get("finished_at"))
    status = job.get("status", "")
    flags = [f for f in job.get("flags", "").split(",") if f]
    error = None
    if job.get("error"):
        error = {"message": job["error"], "type": job.get("error_type") or "batch_error",
                 "code": job.get("error_code") or None, "flags": flags,
                 "crash_log": job.get("crash_log") or None,
                 "runtime_status": int(job["runtime_status"]) if job.get("runtime_status") else None}
    view: dict[str, Any] = {
        "id": job.get("id"),
        "object": "batch.job",
        "status": status,
        "model": job.get("model"),
        "endpoint": job.get("endpoint"),
        "priority": int(job.get("priority") or 0),
        "metadata": orjson.loads(job["metadata"]) if job.get("metadata") else {},
        "status_url": f"/v1/jobs/{job.get('id')}",
        "created_at": int(created),
        "started_at": int(started) if started else None,
        "finished_at": int(finished) if finished else None,
        "timings": {
            "queued_seconds": round((started or finished or time.time()) - created, 6) if created else None,
            "running_seconds": round((finished or time.time()) - started, 6) if started else None,
        },
        "attempts": int(job.get("attempt") or 0),
        "max_attempts": int(job.get("max_attempts") or 0),
        "flags": flags,
        "error": error,
        "usage": orjson.loads(job["usage"]) if job.get("usage") else None,
        "waiting_reason": waiting_reason,
    }
    if include_result:
        view["response"] = orjson.loads(job["response"]) if job.get("response") else None
    return view
