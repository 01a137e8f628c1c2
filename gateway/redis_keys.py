"""Every Redis key and channel name the gateway uses, in one place.

The optional prefix (REDIS_PREFIX) lets tests and several deployments share one Redis. Every name
carries a Redis Cluster hash tag (the part in braces) chosen per entity, so that each multi-key
operation of a store stays in one hash slot (docs/redis.md):
- `{batch}`: the whole batch queue (job hashes, per-key indexes, ready sets, leases, the event stream)
  and the OpenAI Batches records, whose enqueue step is one transaction with the jobs it creates;
- `{evals}`: every eval-run key;
- `{<key_id>}`: one API key's usage counters (all-time, per day, and the markers of applied flushes).
Pub/sub channels are not keys (a cluster broadcasts them): they carry the prefix and the database
number, so deployments on other databases of the same Redis never hear each other.
"""

from __future__ import annotations

import hashlib

BATCH_TAG = "{batch}"
EVALS_TAG = "{evals}"


def key_tag(key_id: str) -> str:
    """The hash tag of one API key's usage keys (a digest when the id itself holds braces)."""
    if "{" in key_id or "}" in key_id or not key_id:
        key_id = hashlib.sha1(key_id.encode()).hexdigest()[:16]
    return "{" + key_id + "}"


class RedisKeys:
    """Builds key names under one prefix (and channel names under prefix and database)."""

    def __init__(self, prefix: str = "", db: int = 0) -> None:
        self.prefix = prefix
        self.db = db

    # --- usage accounting
    def key_usage(self, key_id: str) -> str:
        """All-time usage counters of one key (hash)."""
        return f"{self.prefix}key_usage:{key_tag(key_id)}"

    def key_usage_day(self, key_id: str, day: str) -> str:
        """Usage counters of one key for one UTC day, YYYYMMDD (hash, expires after ~90 days)."""
        return f"{self.prefix}key_usage:{key_tag(key_id)}::{day}"

    @property
    def key_usage_ids(self) -> str:
        """Set of key ids that have usage recorded (so listing needs no SCAN)."""
        return f"{self.prefix}key_usage_ids"

    def key_usage_day_ids(self, day: str) -> str:
        """Set of key ids with usage on one UTC day (expires with the daily buckets)."""
        return f"{self.prefix}key_usage_ids::{day}"

    def usage_flushes(self, key_id: str) -> str:
        """Gateway instance -> number of its last flush applied to this key's counters (hash), so that a
        retried flush is applied at most once."""
        return f"{self.prefix}key_usage:{key_tag(key_id)}::flushes"

    def scan_pattern(self) -> str:
        """Pattern matching every key this prefix owns (tests clean up with it)."""
        return f"{self.prefix}*"

    # --- batch queue (docs/batch.md): all under `{batch}`, so each queue step is one script in one slot.
    def job(self, job_id: str) -> str:
        """Everything about one batch job (hash; expires BATCH_JOB_TTL_SECONDS after it ends)."""
        return f"{self.prefix}{BATCH_TAG}:job:{job_id}"

    def job_index(self, key_id: str) -> str:
        """The job ids of one key by creation time (sorted set), for GET /v1/jobs."""
        return f"{self.prefix}{BATCH_TAG}:job_index:{key_id}"

    @property
    def job_owners(self) -> str:
        """Key ids that have a job index (set), so the operator's all-keys listing needs no SCAN."""
        return f"{self.prefix}{BATCH_TAG}:job_owners"

    @property
    def job_events(self) -> str:
        """The durable event log: one entry per job state change (stream)."""
        return f"{self.prefix}{BATCH_TAG}:job_events"

    def batch_ready(self, model: str) -> str:
        """Queued job ids for one model, scored by enqueue time minus priority aging (sorted set)."""
        return f"{self.prefix}{BATCH_TAG}:ready:{model}"

    @property
    def batch_models(self) -> str:
        """Models that may have queued jobs (set)."""
        return f"{self.prefix}{BATCH_TAG}:models"

    @property
    def batch_leases(self) -> str:
        """Running job ids scored by lease deadline in ms (sorted set)."""
        return f"{self.prefix}{BATCH_TAG}:leases"

    @property
    def batch_lease_tokens(self) -> str:
        """Running job id -> the claim token of its current holder (hash)."""
        return f"{self.prefix}{BATCH_TAG}:lease_tokens"

    @property
    def batch_claim_seq(self) -> str:
        """Counter that makes every claim token unique (string)."""
        return f"{self.prefix}{BATCH_TAG}:claim_seq"

    @property
    def batch_waiting(self) -> str:
        """Model -> why its queued jobs wait, as JSON written by the dispatchers every few seconds (hash)."""
        return f"{self.prefix}{BATCH_TAG}:waiting"

    @property
    def batch_notify(self) -> str:
        """Pub/sub channel: work was queued (wakes idle dispatchers at once)."""
        return f"{self.prefix}db{self.db}:batch_notify"

    @property
    def batch_cancel(self) -> str:
        """Pub/sub channel: a running job was cancelled (its holder stops the request)."""
        return f"{self.prefix}db{self.db}:batch_cancel"

    # --- dashboard sessions (gateway/http/session.py)
    def dashboard_session_revoked(self, nonce: str) -> str:
        """String: present while a logged-out dashboard session's cookie would still be valid (TTL)."""
        return f"{self.prefix}dashboard_revoked:{nonce}"

    # --- evaluation runs (docs/evals.md)
    def eval_run(self, run_id: str) -> str:
        """One eval run: its spec, status, timings, error and result (hash)."""
        return f"{self.prefix}{EVALS_TAG}:eval_run:{run_id}"

    def eval_run_requests(self, run_id: str) -> str:
        """The prepared requests of an eval-repo run, one JSON line each, in run order (list)."""
        return f"{self.prefix}{EVALS_TAG}:eval_run:{run_id}:requests"

    def eval_run_jobs(self, run_id: str) -> str:
        """Sample id -> the batch job id it was submitted as (hash)."""
        return f"{self.prefix}{EVALS_TAG}:eval_run:{run_id}:jobs"

    def eval_run_answers(self, run_id: str) -> str:
        """Sample id -> the `{id, response}` / `{id, error}` line given to `score` (hash)."""
        return f"{self.prefix}{EVALS_TAG}:eval_run:{run_id}:answers"

    def eval_run_lease(self, run_id: str) -> str:
        """The gateway working on a run; expires when its owner stops renewing it (string)."""
        return f"{self.prefix}{EVALS_TAG}:eval_run:{run_id}:lease"

    @property
    def eval_runs(self) -> str:
        """Every eval run id by creation time (sorted set), for GET /eval/runs."""
        return f"{self.prefix}{EVALS_TAG}:eval_runs"

    @property
    def eval_runs_active(self) -> str:
        """Ids of runs not yet finished: what a starting gateway resumes (set)."""
        return f"{self.prefix}{EVALS_TAG}:eval_runs_active"

    # --- OpenAI Batches API (docs/files-and-batches.md): one hash per batch plus its job list, in the
    # queue's slot so that enqueueing a chunk of lines and recording the progress is one transaction.
    def openai_batch(self, batch_id: str) -> str:
        """Everything about one OpenAI-style batch (hash; expires BATCH_JOB_TTL_SECONDS after it ends)."""
        return f"{self.prefix}{BATCH_TAG}:openai_batch:{batch_id}"

    def openai_batch_index(self, key_id: str) -> str:
        """The batch ids of one key by creation time (sorted set, lexical), for GET /v1/batches."""
        return f"{self.prefix}{BATCH_TAG}:openai_batch_index:{key_id}"

    @property
    def openai_batches_active(self) -> str:
        """Ids of batches not yet in a final state (set); the manager resumes them on start-up."""
        return f"{self.prefix}{BATCH_TAG}:openai_batches_active"

    def openai_batch_jobs(self, batch_id: str) -> str:
        """The job ids of a batch in input-line order (list)."""
        return f"{self.prefix}{BATCH_TAG}:openai_batch_jobs:{batch_id}"

    def openai_batch_errors(self, batch_id: str) -> str:
        """Error-file lines of the batch's invalid input lines (list of JSON)."""
        return f"{self.prefix}{BATCH_TAG}:openai_batch_errors:{batch_id}"

    # --- fleet (docs/fleet.md): the node registry and the swap slots, owned by gateway/fleet/store.py.
    # The registry's keys share the `{fleet}` hash tag so one Lua script or MGET reads them on a cluster.
    def fleet_node(self, node_id: str) -> str:
        """One node's registry entry, as JSON (string; expires FLEET_NODE_TTL_SECONDS after its heartbeat)."""
        return f"{self.prefix}{{fleet}}:node:{node_id}"

    @property
    def fleet_nodes(self) -> str:
        """Node ids scored by when their entry expires in ms (sorted set): the listing index, no SCAN."""
        return f"{self.prefix}{{fleet}}:nodes"

    @property
    def fleet_swap_slots(self) -> str:
        """Nodes off the realtime model, scored by their swap-slot lease deadline in ms (sorted set)."""
        return f"{self.prefix}{{fleet}}:swap_slots"

    @property
    def fleet_swap_models(self) -> str:
        """Node id -> the model its swap slot was taken for (hash)."""
        return f"{self.prefix}{{fleet}}:swap_models"

    @property
    def fleet_upload_dir_id(self) -> str:
        """The id written in the shared UPLOAD_DIR's marker file by the first node (string)."""
        return f"{self.prefix}{{fleet}}:upload_dir_id"

    # --- runtime start times (gateway/start_times.py)
    @property
    def runtime_start_seconds(self) -> str:
        """Model -> seconds its last measured runtime start took, shared by the fleet (hash)."""
        return f"{self.prefix}runtime_start_seconds"
