"""BatchManager: drives OpenAI-style batches through validating -> in_progress -> finalizing -> completed.

Each batch is driven by one task of this actor:
1. validating: a first pass over the input file checks every line; the batch fails only when the file
   as a whole is unusable (too large, too many lines, empty, not JSONL at all);
2. in_progress: a second pass enqueues the good lines as jobs of the batch queue, a chunk per Redis
   MULTI/EXEC that also appends the job ids, the bad lines' errors and the progress cursor, so a restart
   resumes exactly after the last chunk that landed (no line lost, none enqueued twice);
3. it then waits until every job is final, learning of outcomes from the job event stream (and from a
   periodic re-read of the unfinished jobs' status, which also covers events missed while stopped);
4. finalizing: the output and error files are written through the upload store, then the batch is final.
Cancelling and expiry (OPENAI_BATCH_WINDOW_SECONDS after creation) cancel the unfinished jobs and
finalize with what has completed. Everything lives in Redis; `run()` resumes every active batch.

In a fleet every node runs a manager, and each batch has one owner: the manager that holds its owner
lease (FLEET_LEASE_SECONDS, renewed every third of it). Another node takes the batch over, from the
state in Redis, once the lease runs out. Status changes are fenced by the lease, so a manager that lost
it writes nothing more: the output and error files of a manager whose final transition is refused are
removed again, and the batch record points at the one set that won. A node whose UPLOAD_DIR is not the
fleet's shared one drives no batch (it could not read the input files).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.exceptions import WatchError

from gateway import metrics
from gateway.actors.base import STOP, Actor
from gateway.actors.job_feed import JobEventFeed
from gateway.batch.jobs import Endpoint
from gateway.batch.queue import JobEvent, JobQueue, instance_id
from gateway.openai_batches.files import PURPOSE_OUTPUT, file_id, make_metadata, purpose_of, upload_id_of
from gateway.openai_batches.lines import GoodLine, LineError, LineRules, RawLine, check_line, read_lines
from gateway.openai_batches.records import BatchRecords, BatchStatus
from gateway.policy import ModelPolicy
from gateway.redis_client import REDIS_OR_OS_ERRORS
from gateway.redis_codec import text
from gateway.settings import Settings
from gateway.tokens import usage_tokens
from gateway.uploads.errors import UploadError
from gateway.uploads.store import UploadStore

_FINAL_JOB = frozenset({"completed", "failed", "cancelled"})
_SCAN_CHUNK = 250
_RETRY_SECONDS = 2.0
_RETRY_MAX_SECONDS = 60.0
_ERRORS_SHOWN = 20
_YIELD_EVERY = 100
"""Lines checked between two yields to the event loop (~2 ms of CPU)."""
_FENCE_RETRIES = 5
"""Tries of one chunk's fenced transaction before the batch is left to the next scan (each try that fails
wrote nothing: the record changed between the read and EXEC)."""


@dataclass(slots=True)
class _Tracked:
    """What the manager knows of one in-progress batch's jobs (rebuilt from Redis on every (re)start)."""

    pending: set[str] = field(default_factory=set)
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    dirty: bool = False

    def settle(self, job_id: str, status: str) -> bool:
        """Count a final job once; False if it was not pending."""
        if job_id not in self.pending:
            return False
        self.pending.discard(job_id)
        if status == "completed":
            self.completed += 1
        elif status == "cancelled":
            self.cancelled += 1
        else:
            self.failed += 1
        self.dirty = True
        if not self.pending:
            self.changed.set()
        return True


class _LostOwnership(Exception):
    """Another manager holds the batch's owner lease now: stop driving it, write nothing more."""


class BatchFileError(Exception):
    """The input file as a whole cannot be used; `code` and the message go to the batch's errors."""

    def __init__(self, code: str, message: str, details: list[LineError] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or []


@dataclass(frozen=True, slots=True)
class _Drive:
    """Drive this batch now (it was created, or asked to cancel)."""

    batch_id: str


@dataclass(frozen=True, slots=True)
class _Rescan:
    """Job events may have been missed: re-read the pending jobs' statuses."""


class BatchManager(Actor[_Drive | _Rescan]):
    """Drives every active OpenAI-style batch; `wake(batch_id)` after creating or cancelling one."""

    name = "openai_batch_manager"

    def __init__(self, settings: Settings, records: BatchRecords, queue: JobQueue,
                 store: UploadStore, feed: JobEventFeed, *, uploads_shared: Callable[[], bool | None] | None = None,
                 owner: str | None = None) -> None:
        super().__init__()
        self.owner = owner or instance_id()
        self.uploads_shared = uploads_shared
        """Whether UPLOAD_DIR is the fleet's shared directory (None: not known yet); no batch is driven
        unless it is True. Without the callable (a manager on its own) the directory is taken as shared."""
        feed.subscribe(self._on_event, self._on_gap)
        self.settings = settings
        self.queue = queue
        self.store = store
        self.records = records
        self._tracked: dict[str, _Tracked] = {}
        self._drivers: dict[str, asyncio.Task[None]] = {}
        self._retry_at: dict[str, float] = {}
        self._job_batch: dict[str, str] = {}
        """Job id -> batch id for the jobs whose outcome the follower is waiting for."""
        self._failures: dict[str, int] = {}

    # --- public
    def wake(self, batch_id: str) -> None:
        """A batch was created or asked to cancel: drive it now rather than at the next tick."""
        self.tell(_Drive(batch_id))

    @property
    def driving(self) -> int:
        """Batches being driven right now."""
        return len(self._drivers)

    # --- run loop
    async def run(self) -> None:
        """Resume active batches, follow the job event stream, and (re)start drivers as needed."""
        async with asyncio.TaskGroup() as tg:
            try:
                next_scan = next_adopt = 0.0
                # Batches whose owner died are taken over within a lease and a third of one.
                adopt_every = min(self.settings.openai_batch_rescan_seconds, self.settings.fleet_lease_seconds / 3)
                while True:
                    now = time.monotonic()
                    if now >= next_adopt:
                        next_adopt = now + adopt_every
                        try:
                            if self._may_drive():
                                for batch_id in await self.records.active_ids():
                                    self._start_driver(tg, batch_id)
                            if now >= next_scan:
                                next_scan = now + self.settings.openai_batch_rescan_seconds
                                await self._rescan()
                        except REDIS_OR_OS_ERRORS as exc:  # the next scan tries again
                            self.log.warning("openai_batch_scan_failed", error=str(exc))
                    for batch_id, at in list(self._retry_at.items()):
                        if at <= now:
                            self._start_driver(tg, batch_id)
                    message = await self.receive(1.0)
                    if message is STOP:
                        return
                    if isinstance(message, _Drive):
                        tracked = self._tracked.get(message.batch_id)
                        if tracked is not None:
                            tracked.changed.set()  # a cancel: the driver looks at the status now
                        self._start_driver(tg, message.batch_id)
                    elif isinstance(message, _Rescan):
                        try:
                            await self._rescan()
                        except REDIS_OR_OS_ERRORS as exc:  # the periodic scan tries again
                            self.log.warning("openai_batch_rescan_failed", error=str(exc))
            finally:
                for task in list(self._drivers.values()):
                    task.cancel()
                metrics.OPENAI_BATCHES_ACTIVE.set(0)

    def _may_drive(self) -> bool:
        return self.uploads_shared is None or self.uploads_shared() is True

    def _start_driver(self, tg: asyncio.TaskGroup, batch_id: str) -> None:
        if batch_id in self._drivers or self.stopping or not self._may_drive():
            return
        if self._retry_at.get(batch_id, 0.0) > time.monotonic():
            return
        self._retry_at.pop(batch_id, None)
        task = tg.create_task(self._drive_safely(batch_id), name=f"openai_batch:{batch_id}")
        self._drivers[batch_id] = task
        metrics.OPENAI_BATCHES_ACTIVE.set(len(self._drivers))

    async def _drive_safely(self, batch_id: str) -> None:
        try:
            taken = await self.records.take_owner(batch_id, self.owner, self.settings.fleet_lease_seconds)
        except REDIS_OR_OS_ERRORS as exc:
            self.log.warning("openai_batch_owner_error", batch_id=batch_id, error=str(exc))
            self._drivers.pop(batch_id, None)
            return
        if taken == "taken":  # another node drives it; it is looked at again at the next scan
            self._drivers.pop(batch_id, None)
            metrics.OPENAI_BATCHES_ACTIVE.set(len(self._drivers))
            return
        driver = asyncio.current_task()
        keeper = asyncio.create_task(self._keep_owner(batch_id, driver), name=f"openai_batch_owner:{batch_id}")
        try:
            await self._drive(batch_id)
        except _LostOwnership:
            self.log.warning("openai_batch_owner_lost", batch_id=batch_id)
        except asyncio.CancelledError:
            if (keeper.done() and not keeper.cancelled() and keeper.exception() is None
                    and keeper.result() is False):
                self.log.warning("openai_batch_owner_lost", batch_id=batch_id)
                return  # the keeper stopped us: another node drives the batch now
            raise
        except Exception as exc:  # retried from the Redis state: every step is resumable
            failures = self._failures.get(batch_id, 0) + 1
            self._failures[batch_id] = failures
            delay = min(_RETRY_SECONDS * 2 ** (failures - 1), _RETRY_MAX_SECONDS)
            self.log.exception("openai_batch_driver_error", batch_id=batch_id, error=str(exc), retry_in=delay)
            self._retry_at[batch_id] = time.monotonic() + delay
        else:
            self._failures.pop(batch_id, None)
        finally:
            keeper.cancel()
            with contextlib.suppress(*REDIS_OR_OS_ERRORS):
                await self.records.release_owner(batch_id, self.owner)
            self._drivers.pop(batch_id, None)
            self._forget(batch_id)
            metrics.OPENAI_BATCHES_ACTIVE.set(len(self._drivers))

    async def _keep_owner(self, batch_id: str, driver: asyncio.Task[Any] | None) -> bool:
        """Renew the owner lease every third of FLEET_LEASE_SECONDS; cancel the driver (and return
        False) once it is lost. A Redis error alone does not stop the driver: its writes fail too, and
        its fenced transitions are refused once another node holds the lease."""
        lease = self.settings.fleet_lease_seconds
        while True:
            await asyncio.sleep(lease / 3)
            try:
                result = await self.records.take_owner(batch_id, self.owner, lease)
            except REDIS_OR_OS_ERRORS as exc:
                self.log.warning("openai_batch_owner_renew_failed", batch_id=batch_id, error=str(exc))
                continue
            if result != "ok":
                if driver is not None:
                    driver.cancel()
                return False

    async def _transition(self, batch_id: str, allowed: tuple[BatchStatus, ...], fields: dict[str, str]) -> str:
        """A status change fenced by our owner lease; _LostOwnership when another node holds it."""
        result = await self.records.transition_owned(batch_id, self.owner, allowed, fields)
        if result == "not_owner":
            raise _LostOwnership(batch_id)
        return result

    def _forget(self, batch_id: str) -> None:
        if self._tracked.pop(batch_id, None) is not None:
            self._job_batch = {j: b for j, b in self._job_batch.items() if b != batch_id}

    # --- one batch
    async def _drive(self, batch_id: str) -> None:
        batch = await self.records.get(batch_id)
        if batch is None:
            await self.records.forget_active(batch_id)
            return
        status = BatchStatus(batch["status"])
        if status.final:
            await self.records.retire(batch_id)
            return
        log = self.log.bind(batch_id=batch_id, key_id=batch["key_id"])
        if status is BatchStatus.VALIDATING:
            if await self._expired(batch):
                return
            try:
                total, model = await self._validate(batch)
            except BatchFileError as exc:
                await self._fail(batch, exc)
                log.info("openai_batch_failed", code=exc.code, reason=exc.message)
                return
            now = repr(time.time())
            result = await self._transition(batch_id, (BatchStatus.VALIDATING,),
                                                   {"status": BatchStatus.IN_PROGRESS.value, "in_progress_at": now,
                                                    "total": str(total), "model": model})
            if result not in ("ok", BatchStatus.CANCELLING.value):
                return
            log.info("openai_batch_in_progress", total=total, model=model)
            batch = await self.records.get(batch_id) or batch
        tracked = _Tracked()
        self._tracked[batch_id] = tracked
        await self._load_jobs(batch_id, tracked)
        if batch["status"] == BatchStatus.IN_PROGRESS.value and batch.get("enqueue_done") != "1":
            try:
                await self._enqueue(batch, tracked)
            except BatchFileError as exc:
                # The input vanished mid-way (TUS termination): what was enqueued still runs and is reported.
                log.warning("openai_batch_input_lost", code=exc.code, reason=exc.message)
                done_through = await self.records.counter(batch_id, "enqueued_line")
                errors = {"object": "list", "data": [{"code": exc.code, "message": exc.message, "param": None,
                                                      "line": done_through + 1}]}
                await self.records.set(batch_id, {"errors": orjson.dumps(errors).decode(), "enqueue_done": "1"})
            batch = await self.records.get(batch_id) or batch
        final = await self._await_jobs(batch, tracked)
        await self._finalize(batch, tracked, final)

    async def _expired(self, batch: dict[str, str]) -> bool:
        """True (and the batch finalized as expired) when its completion window has passed."""
        if time.time() < float(batch["expires_at"]):
            return False
        tracked = self._tracked.setdefault(batch["id"], _Tracked())
        await self._finalize(batch, tracked, BatchStatus.EXPIRED)
        return True

    def _rules(self, batch: dict[str, str]) -> LineRules:
        return LineRules(endpoint=Endpoint(batch["endpoint"]), priority=int(batch.get("priority") or 0),
                         batch_id=batch["id"], max_metadata_items=self.settings.batch_max_metadata_items,
                         model_aliases=self.settings.aliases, realtime_model=self.settings.realtime_model,
                         policy=ModelPolicy.from_settings(self.settings))

    async def _input_lines(self, batch: dict[str, str]) -> AsyncIterator[RawLine]:
        upload_id = upload_id_of(batch["input_file_id"]) or ""
        info = self.store.get(upload_id)
        if info is None or info.key_id != batch["key_id"] or not info.is_file:
            raise BatchFileError("input_file_missing", f"The input file {batch['input_file_id']} no longer exists "
                                 "(it was deleted while the batch was running).")
        if info.size > self.settings.openai_batch_max_file_bytes:
            raise BatchFileError("file_too_large", f"The input file has {info.size} bytes, more than the limit of "
                                 f"{self.settings.openai_batch_max_file_bytes} bytes (OPENAI_BATCH_MAX_FILE_BYTES).")
        self.store.repair(info)
        async for line in read_lines(self.store.data_path(upload_id), info.size, self.settings.max_body_bytes):
            yield line

    async def _validate(self, batch: dict[str, str]) -> tuple[int, str]:
        """First pass: the number of requests and the first valid line's model; BatchFileError if unusable."""
        rules = self._rules(batch)
        seen: set[str] = set()
        lines = good = objects = 0
        model = ""
        details: list[LineError] = []
        limit = self.settings.openai_batch_max_lines
        async for raw in self._input_lines(batch):
            lines += 1
            if lines % _YIELD_EVERY == 0:
                await asyncio.sleep(0)  # checking lines is CPU work: let realtime requests through
            if lines % 10_000 == 0 and await self.records.status(batch["id"]) != BatchStatus.VALIDATING.value:
                return lines, model  # cancelled while a large file was being read: the caller sees it
            if lines > limit:
                raise BatchFileError("too_many_lines", f"The input file has more than {limit} requests (lines); "
                                     "split it into several batches (OPENAI_BATCH_MAX_LINES).")
            checked = check_line(raw, rules, seen, self.settings.max_body_bytes)
            if isinstance(checked, GoodLine):
                good += 1
                objects += 1
                model = model or checked.submission.model
            else:
                objects += checked.json_object
                if len(details) < _ERRORS_SHOWN:
                    details.append(checked)
        if lines == 0:
            raise BatchFileError("empty_file", "The input file has no requests: it is empty or only blank lines.")
        cap = self.settings.batch_key_max_jobs
        held = await self.queue.held_jobs(batch["key_id"], at_least=max(0, cap - good))
        if held + good > cap:
            raise BatchFileError("too_many_jobs", f"The batch's {good} requests would take key "
                                 f"'{batch['key_id']}' past {cap} held jobs (BATCH_KEY_MAX_JOBS; it holds {held}): "
                                 "wait for earlier jobs to finish and expire, or cancel some.")
        if objects == 0:
            raise BatchFileError("invalid_file_format", "The input file is not JSONL: none of its lines is a JSON "
                                 "object. Each line must be {\"custom_id\", \"method\", \"url\", \"body\"}.", details)
        return lines, model

    async def _fail(self, batch: dict[str, str], exc: BatchFileError) -> None:
        data: list[dict[str, Any]] = [{"code": exc.code, "message": exc.message, "param": None, "line": None}]
        data += [{"code": d.code, "message": d.message, "param": d.param, "line": d.line} for d in exc.details]
        result = await self._transition(
            batch["id"], (BatchStatus.VALIDATING, BatchStatus.CANCELLING),
            {"status": BatchStatus.FAILED.value, "failed_at": repr(time.time()),
             "errors": orjson.dumps({"object": "list", "data": data}).decode()})
        if result == "ok":
            metrics.OPENAI_BATCHES.labels("failed").inc()
        await self.records.retire(batch["id"])

    async def _load_jobs(self, batch_id: str, tracked: _Tracked) -> None:
        """Rebuild what is known of the batch's jobs from Redis (the list of ids and their statuses)."""
        async for ids in self.records.job_id_chunks(batch_id, _SCAN_CHUNK):
            # Known before their status is read: an outcome event arriving meanwhile is not lost.
            for job_id in ids:
                tracked.pending.add(job_id)
                self._job_batch[job_id] = batch_id
            statuses = await self.queue.statuses(ids)
            for job_id, status in zip(ids, statuses, strict=True):
                if status in _FINAL_JOB or status is None:
                    tracked.settle(job_id, status or "failed")
        tracked.dirty = True

    async def _enqueue(self, batch: dict[str, str], tracked: _Tracked) -> None:
        """Second pass: enqueue the good lines after the cursor, a chunk per MULTI/EXEC."""
        batch_id, key_id = batch["id"], batch["key_id"]
        rules = self._rules(batch)
        done_through = int(batch.get("enqueued_line") or 0)
        invalid = int(batch.get("invalid") or 0)
        seen: set[str] = set()
        good: list[GoodLine] = []
        errors: list[LineError] = []
        last_line = done_through
        chunk = self.settings.openai_batch_enqueue_chunk

        async def flush() -> bool:
            nonlocal good, errors, invalid
            for _ in range(_FENCE_RETRIES):
                # Renewed just before each chunk, so the lease has a full term ahead of the chunk; and the
                # chunk's transaction is fenced by the lease (owned_transaction): if another node took the
                # batch over meanwhile, nothing of the chunk is written, so no two nodes enqueue one line.
                if await self.records.take_owner(batch_id, self.owner, self.settings.fleet_lease_seconds) != "ok":
                    raise _LostOwnership(batch_id)
                fenced = await self.records.owned_transaction(batch_id, self.owner)  # one slot: `{batch}`
                if fenced is None:
                    raise _LostOwnership(batch_id)
                pipe, status = fenced
                if status != BatchStatus.IN_PROGRESS.value:
                    await pipe.reset()
                    return False  # cancelling or expired: stop feeding the queue
                jobs = self.queue.enqueue_many(pipe, key_id, [g.submission for g in good])
                self.records.add_enqueued(pipe, batch_id, [j["id"] for j in jobs],
                                          [e.to_output(batch_id) for e in errors], last_line, invalid + len(errors))
                # Pending before the jobs exist, so no outcome can arrive for an id we do not know yet.
                for job in jobs:
                    tracked.pending.add(job["id"])
                    self._job_batch[job["id"]] = batch_id
                try:
                    await pipe.execute()
                    break
                except WatchError:
                    # redis-py also reports a connection lost during EXEC as a WatchError: if the chunk
                    # landed all the same, the cursor says so (only these transactions move it).
                    if await self.records.counter(batch_id, "enqueued_line") >= last_line:
                        break
                    # The record changed since it was read (our own lease renewal, a cancel, a takeover):
                    # nothing was written; forget the ids and check the lease and the status again.
                    for job in jobs:
                        tracked.pending.discard(job["id"])
                        self._job_batch.pop(job["id"], None)
            else:
                raise _LostOwnership(batch_id)
            invalid += len(errors)
            await self.queue.notify(j["model"] for j in jobs)
            metrics.BATCH_JOBS.labels("enqueued").inc(len(jobs))
            metrics.OPENAI_BATCH_LINES.labels("enqueued").inc(len(jobs))
            metrics.OPENAI_BATCH_LINES.labels("invalid").inc(len(errors))
            good, errors = [], []
            return True

        async for raw in self._input_lines(batch):
            # Lines before the cursor are replayed only to rebuild the set of custom_ids seen.
            checked = check_line(raw, rules, seen, self.settings.max_body_bytes)
            if raw.number % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
            if raw.number <= done_through:
                continue
            last_line = raw.number
            if isinstance(checked, GoodLine):
                good.append(checked)
            else:
                errors.append(checked)
            if len(good) + len(errors) >= chunk and not await flush():
                return
        if (good or errors or last_line > done_through) and not await flush():
            return
        await self.records.set(batch_id, {"enqueue_done": "1"})
        self.log.info("openai_batch_enqueued", batch_id=batch_id, jobs=len(tracked.pending) + tracked.completed
                      + tracked.failed + tracked.cancelled, invalid=invalid)

    async def _await_jobs(self, batch: dict[str, str], tracked: _Tracked) -> BatchStatus:
        """Wait until every job is final, or the batch is cancelled or expires; the final status to write."""
        batch_id = batch["id"]
        expires_at = float(batch["expires_at"])
        while True:
            status, expiring = await self.records.status_expiring(batch_id)
            if status == BatchStatus.CANCELLING.value:
                return BatchStatus.CANCELLED
            if status == BatchStatus.FINALIZING.value:
                # A restart during finalizing: write the files again.
                return BatchStatus.EXPIRED if expiring else BatchStatus.COMPLETED
            if time.time() >= expires_at:
                return BatchStatus.EXPIRED
            if status != BatchStatus.IN_PROGRESS.value:
                raise RuntimeError(f"batch {batch_id} is {status!r} while its jobs run")
            await self._save_counts(batch_id, tracked)
            if not tracked.pending:
                return BatchStatus.COMPLETED
            tracked.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(tracked.changed.wait(), min(1.0, max(0.01, expires_at - time.time())))

    async def _save_counts(self, batch_id: str, tracked: _Tracked) -> None:
        if tracked.dirty:
            tracked.dirty = False
            await self.records.set(batch_id, {"jobs_completed": str(tracked.completed),
                                              "jobs_failed": str(tracked.failed)})

    # --- finalizing
    async def _finalize(self, batch: dict[str, str], tracked: _Tracked, final: BatchStatus) -> None:
        """Cancel what still runs (cancel/expiry), write the output and error files, set the final status."""
        batch_id, key_id = batch["id"], batch["key_id"]
        now = repr(time.time())
        if final is BatchStatus.COMPLETED:
            await self._transition(batch_id, (BatchStatus.IN_PROGRESS,),
                                          {"status": BatchStatus.FINALIZING.value, "finalizing_at": now})
        elif final is BatchStatus.EXPIRED:
            await self._transition(batch_id, (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS),
                                          {"status": BatchStatus.FINALIZING.value, "finalizing_at": now,
                                           "expiring": "1"})
        if tracked.pending:
            await self.queue.cancel_many(sorted(tracked.pending), key_id)
            for job_id in list(tracked.pending):
                tracked.settle(job_id, "cancelled")
        await self._remove_partial_outputs(batch_id, key_id)
        counts = await self._scan_outcomes(batch_id, final)
        output_id = error_id = ""
        if counts["completed"]:
            output_id = await self._write_file(batch, "output", self._output_lines(batch_id))
        if counts["errors"]:
            error_id = await self._write_file(batch, "error", self._error_lines(batch, final))
        fields = {"status": final.value, f"{final.value}_at": repr(time.time()), "output_file_id": output_id,
                  "error_file_id": error_id, "jobs_completed": str(counts["completed"]),
                  "jobs_failed": str(counts["failed"])}
        if counts["usage"]:
            fields["usage"] = orjson.dumps(counts["usage"]).decode()
        allowed = (BatchStatus.FINALIZING, BatchStatus.CANCELLING, BatchStatus.IN_PROGRESS, BatchStatus.VALIDATING)
        try:
            result = await self._transition(batch_id, allowed, fields)
        except _LostOwnership:
            # Another node owns the batch now and writes its own files: ours must not stay behind.
            for written in (output_id, error_id):
                upload_id = upload_id_of(written) if written else None
                if upload_id:
                    with contextlib.suppress(UploadError):
                        await self.store.delete(upload_id)
            raise
        if result == "ok":
            metrics.OPENAI_BATCHES.labels(final.value).inc()
            self.log.info("openai_batch_done", batch_id=batch_id, status=final.value, **{
                k: v for k, v in counts.items() if k != "usage"})
        await self.records.retire(batch_id)

    async def _job_rows(self, batch_id: str, fields: tuple[str, ...]) -> AsyncIterator[tuple[str, list[Any]]]:
        """(job id, HMGET of `fields`) for every job of the batch, in input-line order, a chunk at a time."""
        async for ids in self.records.job_id_chunks(batch_id, _SCAN_CHUNK):
            for job_id, row in zip(ids, await self.queue.job_fields(ids, fields), strict=True):
                yield job_id, row

    async def _scan_outcomes(self, batch_id: str, final: BatchStatus) -> dict[str, Any]:
        completed = failed = other = 0
        prompt = completion = 0
        async for _, (status, usage) in self._job_rows(batch_id, ("status", "usage")):
            if status == b"completed":
                completed += 1
                if usage:
                    used_in, used_out = usage_tokens(orjson.loads(usage))
                    prompt += used_in
                    completion += used_out
            elif status == b"failed":
                failed += 1
            else:
                other += 1
        if final is BatchStatus.COMPLETED:
            # Jobs cancelled one by one (DELETE /v1/jobs/<id>) or whose record expired did not run: failed.
            failed, other = failed + other, 0
        invalid = await self.records.counter(batch_id, "invalid")
        usage_view = None
        if completed:
            usage_view = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
                          "total_tokens": prompt + completion}
        return {"completed": completed, "failed": failed, "unfinished": other, "invalid": invalid,
                "errors": failed + other + invalid, "usage": usage_view}

    async def _output_lines(self, batch_id: str) -> AsyncIterator[bytes]:
        fields = ("status", "metadata", "response", "runtime_status")
        buf = bytearray()
        async for job_id, (status, meta, response, runtime_status) in self._job_rows(batch_id, fields):
            if status != b"completed":
                continue
            custom_id = orjson.loads(meta).get("custom_id") if meta else None
            try:
                body: Any = orjson.loads(response) if response else None
            except orjson.JSONDecodeError:
                body = response.decode(errors="replace")
            buf += orjson.dumps({
                "id": job_id, "custom_id": custom_id,
                "response": {"status_code": int(runtime_status or 200), "request_id": job_id, "body": body},
                "error": None,
            })
            buf += b"\n"
            if len(buf) >= 256 * 1024:
                yield bytes(buf)
                buf.clear()
        if buf:
            yield bytes(buf)

    async def _error_lines(self, batch: dict[str, str], final: BatchStatus) -> AsyncIterator[bytes]:
        batch_id = batch["id"]
        buf = bytearray()
        async for lines in self.records.error_line_chunks(batch_id, _SCAN_CHUNK):
            for entry in lines:
                buf += entry + b"\n"
            yield bytes(buf)
            buf.clear()
        fields = ("status", "metadata", "error", "error_code", "error_type", "runtime_status")
        unfinished_code = {BatchStatus.EXPIRED: "batch_expired", BatchStatus.CANCELLED: "batch_cancelled"}.get(
            final, "batch_cancelled")
        async for job_id, (status, meta, error, code, etype, runtime_status) in self._job_rows(batch_id, fields):
            if status == b"completed":
                continue
            custom_id = orjson.loads(meta).get("custom_id") if meta else None
            message = text(error) if error else ""
            if status == b"failed" and runtime_status and code == b"runtime_4xx":
                line: dict[str, Any] = {
                    "id": job_id, "custom_id": custom_id,
                    "response": {"status_code": int(runtime_status), "request_id": job_id,
                                 "body": {"error": {"message": message, "type": text(etype or b"") or None,
                                                    "code": None, "param": None}}},
                    "error": None}
            elif status == b"failed":
                line = {"id": job_id, "custom_id": custom_id, "response": None,
                        "error": {"code": text(code or b"") or "batch_job_failed", "message": message}}
            elif status is None:
                line = {"id": job_id, "custom_id": custom_id, "response": None,
                        "error": {"code": "result_expired", "message": "The job's record expired "
                                  "(BATCH_JOB_TTL_SECONDS) before the batch was finalized."}}
            elif final is BatchStatus.COMPLETED:
                line = {"id": job_id, "custom_id": custom_id, "response": None,
                        "error": {"code": "job_cancelled", "message": "The job was cancelled on its own "
                                  f"(DELETE /v1/jobs/{job_id}) before it ran."}}
            else:
                verb = "expired" if final is BatchStatus.EXPIRED else "was cancelled"
                line = {"id": job_id, "custom_id": custom_id, "response": None,
                        "error": {"code": unfinished_code,
                                  "message": f"The request did not run: the batch {verb} first."}}
            buf += orjson.dumps(line) + b"\n"
            if len(buf) >= 256 * 1024:
                yield bytes(buf)
                buf.clear()
        if buf:
            yield bytes(buf)

    async def _write_file(self, batch: dict[str, str], kind: str, chunks: AsyncIterator[bytes]) -> str:
        metadata = make_metadata({"filename": f"{batch['id']}_{kind}.jsonl", "filetype": "application/jsonl",
                                  "purpose": PURPOSE_OUTPUT, "batch_id": batch["id"]})
        try:
            info = await self.store.put(batch["key_id"], chunks, metadata)
        except UploadError as exc:
            # E.g. the key's upload quota is full: the batch still ends, with the reason in its errors.
            self.log.error("openai_batch_file_write_failed", batch_id=batch["id"], kind=kind, error=exc.message)
            errors = {"object": "list", "data": [{"code": "output_file_failed", "param": None, "line": None,
                                                   "message": f"The {kind} file could not be stored: {exc.message}"}]}
            await self.records.set(batch["id"], {"errors": orjson.dumps(errors).decode()})
            return ""
        return file_id(info.id)

    async def _remove_partial_outputs(self, batch_id: str, key_id: str) -> None:
        """Files written by an earlier finalize of this batch that stopped before its status was set."""
        for info in self.store.list_for_key(key_id):
            # Only the gateway sets purpose batch_output (TUS metadata cannot), so a user's file is never hit.
            if info.metadata.values.get("batch_id") == batch_id and purpose_of(info) == PURPOSE_OUTPUT:
                with contextlib.suppress(UploadError):
                    await self.store.delete(info.id)

    # --- job outcomes
    def _on_event(self, event: JobEvent) -> None:
        """Settle a job of a tracked batch when its final event arrives (called by the job event feed)."""
        fields = event.fields
        job_id = fields.get("job_id", "")
        batch_id = self._job_batch.get(job_id)
        if batch_id is None:
            return
        status = fields.get("status", "")
        if status in _FINAL_JOB and fields.get("event", "") in _FINAL_JOB:
            tracked = self._tracked.get(batch_id)
            if tracked is not None and tracked.settle(job_id, status):
                self._job_batch.pop(job_id, None)
                tracked.changed.set()

    def _on_gap(self) -> None:
        """Events may have been missed: re-read the pending jobs' statuses from their hashes."""
        self.tell(_Rescan())

    async def _rescan(self) -> None:
        """Re-read the status of every pending job (events may have been missed or trimmed)."""
        for _batch_id, tracked in list(self._tracked.items()):
            ids = list(tracked.pending)
            for start in range(0, len(ids), _SCAN_CHUNK):
                chunk = ids[start:start + _SCAN_CHUNK]
                for job_id, status in zip(chunk, await self.queue.statuses(chunk), strict=True):
                    if status in _FINAL_JOB and tracked.settle(job_id, status):
                        self._job_batch.pop(job_id, None)
            if tracked.dirty:
                tracked.changed.set()
