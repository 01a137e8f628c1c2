"""Every Redis key and stream name the gateway uses, in one place.

The optional prefix (REDIS_PREFIX) lets tests and several deployments share one Redis; with the
default empty prefix the names are exactly the documented ones (`key_usage:<key_id>`, `job:<id>`).
"""

from __future__ import annotations


class RedisKeys:
    """Builds key names under one prefix."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    # --- usage accounting
    def key_usage(self, key_id: str) -> str:
        """All-time usage counters of one key (hash)."""
        return f"{self.prefix}key_usage:{key_id}"

    def key_usage_day(self, key_id: str, day: str) -> str:
        """Usage counters of one key for one UTC day, YYYYMMDD (hash, expires after ~90 days)."""
        return f"{self.prefix}key_usage:{key_id}::{day}"

    @property
    def key_usage_ids(self) -> str:
        """Set of key ids that have usage recorded (so listing needs no SCAN)."""
        return f"{self.prefix}key_usage_ids"

    def key_usage_day_ids(self, day: str) -> str:
        """Set of key ids with usage on one UTC day (expires with the daily buckets)."""
        return f"{self.prefix}key_usage_ids::{day}"

    def scan_pattern(self) -> str:
        """Pattern matching every key this prefix owns (tests clean up with it)."""
        return f"{self.prefix}*"

    # --- batch queue (docs/batch.md). Keys a Lua script touches together share the `{batch}` hash tag
    # so a Redis Cluster keeps them in one slot; the job hash and the per-key index stand alone.
    def job(self, job_id: str) -> str:
        """Everything about one batch job (hash; expires BATCH_JOB_TTL_SECONDS after it ends)."""
        return f"{self.prefix}job:{job_id}"

    def job_index(self, key_id: str) -> str:
        """The job ids of one key by creation time (sorted set), for GET /v1/jobs."""
        return f"{self.prefix}job_index:{key_id}"

    @property
    def job_owners(self) -> str:
        """Key ids that have a job index (set), so the operator's all-keys listing needs no SCAN."""
        return f"{self.prefix}job_owners"

    @property
    def job_events(self) -> str:
        """The durable event log: one entry per job state change (stream)."""
        return f"{self.prefix}job_events"

    def batch_ready(self, model: str) -> str:
        """Queued job ids for one model, scored by enqueue time minus priority aging (sorted set)."""
        return f"{self.prefix}{{batch}}:ready:{model}"

    @property
    def batch_models(self) -> str:
        """Models that may have queued jobs (set)."""
        return f"{self.prefix}{{batch}}:models"

    @property
    def batch_leases(self) -> str:
        """Running job ids scored by lease deadline in ms (sorted set)."""
        return f"{self.prefix}{{batch}}:leases"

    @property
    def batch_lease_tokens(self) -> str:
        """Running job id -> the claim token of its current holder (hash)."""
        return f"{self.prefix}{{batch}}:lease_tokens"

    @property
    def batch_claim_seq(self) -> str:
        """Counter that makes every claim token unique (string)."""
        return f"{self.prefix}{{batch}}:claim_seq"

    @property
    def batch_waiting(self) -> str:
        """Model -> why its queued jobs wait, as JSON written by the dispatchers every few seconds (hash)."""
        return f"{self.prefix}{{batch}}:waiting"

    @property
    def batch_notify(self) -> str:
        """Pub/sub channel: work was queued (wakes idle dispatchers at once)."""
        return f"{self.prefix}{{batch}}:notify"

    @property
    def batch_cancel(self) -> str:
        """Pub/sub channel: a running job was cancelled (its holder stops the request)."""
        return f"{self.prefix}{{batch}}:cancel"

    # --- dashboard sessions (gateway/http/session.py)
    def dashboard_session_revoked(self, nonce: str) -> str:
        """String: present while a logged-out dashboard session's cookie would still be valid (TTL)."""
        return f"{self.prefix}dashboard_revoked:{nonce}"

    # --- evaluation runs (docs/evals.md)
    def eval_run(self, run_id: str) -> str:
        """One eval run: its spec, status, timings, error and result (hash)."""
        return f"{self.prefix}eval_run:{run_id}"

    def eval_run_requests(self, run_id: str) -> str:
        """The prepared requests of an eval-repo run, one JSON line each, in run order (list)."""
        return f"{self.prefix}eval_run:{run_id}:requests"

    def eval_run_jobs(self, run_id: str) -> str:
        """Sample id -> the batch job id it was submitted as (hash)."""
        return f"{self.prefix}eval_run:{run_id}:jobs"

    def eval_run_answers(self, run_id: str) -> str:
        """Sample id -> the `{id, response}` / `{id, error}` line given to `score` (hash)."""
        return f"{self.prefix}eval_run:{run_id}:answers"

    def eval_run_lease(self, run_id: str) -> str:
        """The gateway working on a run; expires when its owner stops renewing it (string)."""
        return f"{self.prefix}eval_run:{run_id}:lease"

    @property
    def eval_runs(self) -> str:
        """Every eval run id by creation time (sorted set), for GET /eval/runs."""
        return f"{self.prefix}eval_runs"

    @property
    def eval_runs_active(self) -> str:
        """Ids of runs not yet finished: what a starting gateway resumes (set)."""
        return f"{self.prefix}eval_runs_active"

    # --- OpenAI Batches API (docs/files-and-batches.md): one hash per batch plus its job list
    def openai_batch(self, batch_id: str) -> str:
        """Everything about one OpenAI-style batch (hash; expires BATCH_JOB_TTL_SECONDS after it ends)."""
        return f"{self.prefix}openai_batch:{batch_id}"

    def openai_batch_index(self, key_id: str) -> str:
        """The batch ids of one key by creation time (sorted set, lexical), for GET /v1/batches."""
        return f"{self.prefix}openai_batch_index:{key_id}"

    @property
    def openai_batches_active(self) -> str:
        """Ids of batches not yet in a final state (set); the manager resumes them on start-up."""
        return f"{self.prefix}openai_batches_active"

    def openai_batch_jobs(self, batch_id: str) -> str:
        """The job ids of a batch in input-line order (list)."""
        return f"{self.prefix}openai_batch_jobs:{batch_id}"

    def openai_batch_errors(self, batch_id: str) -> str:
        """Error-file lines of the batch's invalid input lines (list of JSON)."""
        return f"{self.prefix}openai_batch_errors:{batch_id}"
