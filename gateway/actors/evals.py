"""The EvalRunner: drives eval runs (eval-repo through the batch queue, EuroEval as a subprocess).

One task per run this gateway works on, each holding the run's lease in Redis. Everything a run needs
to continue lives in Redis (its prepared requests, the batch job of each sample, each sample's answer),
so a run whose gateway stopped or died is taken over, on start-up or by another gateway once the lease
runs out, and continues from what was already answered without resubmitting anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shlex
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from gateway import metrics
from gateway.actors.base import STOP, Actor
from gateway.actors.job_feed import JobEventFeed
from gateway.batch.jobs import Endpoint, parse_submission
from gateway.batch.queue import JobEvent, JobQueue, instance_id
from gateway.errors import ApiError
from gateway.evals.euroeval import EuroEvalFailed, build_args, run_euroeval
from gateway.evals.evalrepo import EvalRepo, EvalRepoError
from gateway.evals.runs import FINAL_STATUSES, Harness, RunSpec, RunStatus, RunStore, run_view
from gateway.keys import ApiKey, Keyring, Scope
from gateway.policy import ModelPolicy
from gateway.redis_client import REDIS_OR_OS_ERRORS
from gateway.redis_codec import opt_text
from gateway.settings import Settings

# Crashes (not protocol errors: those fail the run at once) a run may have before it is failed for good.
MAX_RUN_CRASHES = 3


@dataclass(frozen=True, slots=True)
class _Start:
    run_id: str


@dataclass(frozen=True, slots=True)
class _Cancel:
    run_id: str


class EvalRunner(Actor[_Start | _Cancel]):
    """Creates, runs, resumes and cancels eval runs; see docs/evals.md."""

    name = "eval_runner"

    def __init__(self, settings: Settings, store: RunStore, queue: JobQueue, keyring: Keyring,
                 feed: JobEventFeed, *, owner: str | None = None) -> None:
        super().__init__()
        feed.subscribe(self._on_event, self._on_gap)
        self.settings = settings
        self.store = store
        self.queue = queue
        self.keyring = keyring
        self.repo = EvalRepo(settings.eval_repo_dir)
        self.owner = owner or instance_id()
        host = settings.listen_host
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        self.api_base = f"http://{host}:{settings.listen_port}/v1"
        """Where EuroEval reaches this gateway's OpenAI endpoint."""
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._harness: dict[str, Harness] = {}
        self._cancelling: set[str] = set()
        self._job_runs: dict[str, str] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._tokens: dict[str, str] = {}
        self._retry_at: dict[str, float] = {}
        self._tick_interval = max(0.2, settings.eval_lease_seconds / 3)

    # --- public API (HTTP handlers, the CLI, schedulers)
    async def create_run(self, spec: RunSpec, key_id: str | None = None) -> dict[str, str]:
        """Store a run and start it. Without a key id the run is internal: accounted to INTERNAL_EVAL_KEY_ID."""
        created_by = "api" if key_id else "internal"
        run = await self.store.create(spec, key_id or self.settings.internal_eval_key_id, created_by)
        metrics.EVAL_RUNS.labels(spec.harness.value, "created").inc()
        self.log.info("eval_run_created", run_id=run["id"], harness=spec.harness.value, key_id=run["key_id"],
                      eval=spec.eval, model=spec.model)
        self.tell(_Start(run["id"]))
        return run

    async def cancel_run(self, run_id: str) -> tuple[str, dict[str, str] | None]:
        """Cancel a run that has not finished: ('cancelled', run), ('already:<status>', run) or ('missing', None)."""
        run = await self.store.get(run_id)
        if run is None:
            return "missing", None
        if run.get("status") in FINAL_STATUSES:
            return f"already:{run['status']}", run
        # Read the jobs before finishing: finishing drops the run's working data.
        jobs = await self.store.sample_jobs(run_id)
        answered = await self.store.answered_samples(run_id)
        if not await self.store.finish(run_id, RunStatus.CANCELLED, {}):
            run = await self.store.get(run_id)
            return (f"already:{run['status']}", run) if run else ("missing", None)
        # Whoever works on the run (this gateway or another) stops at its next look at the status; the
        # queued jobs are taken back here so that they stop even if nobody works on the run any more.
        await self._cancel_jobs([job for sid, job in jobs.items() if sid not in answered], run["key_id"])
        metrics.EVAL_RUNS.labels(run["harness"], "cancelled").inc()
        self.log.info("eval_run_cancelled", run_id=run_id)
        self.tell(_Cancel(run_id))
        return "cancelled", await self.store.get(run_id)

    async def evals(self, *, base_model: bool = False) -> list[dict[str, Any]]:
        """The eval-repo's `list` output (only the evals suited to base models when asked)."""
        evals = await self.repo.list_evals()
        return [e for e in evals if e.get("suits_base_models")] if base_model else evals

    async def list_runs(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest runs of every key, as GET /eval/runs/<id> shows them (for operators: /monitor/evals)."""
        runs, _ = await self.store.list(None, limit=limit)
        views = []
        for run in runs:
            working = run.get("harness") == Harness.EVAL_REPO and run.get("status") not in FINAL_STATUSES
            views.append(run_view(run, await self.store.progress(run["id"]) if working else None))
        return views

    def working_on(self) -> set[str]:
        """Ids of the runs this gateway is driving now."""
        return set(self._tasks)

    # --- the loop
    async def run(self) -> None:
        """Take messages; every tick renew leases, notice cancelled runs and adopt unowned ones."""
        try:
            await self._tick()
            next_tick = time.monotonic() + self._tick_interval
            while True:
                message = await self.receive(timeout=max(0.0, next_tick - time.monotonic()))
                if message is STOP:
                    return
                if isinstance(message, _Start):
                    await self._guard(self._adopt(message.run_id))
                elif isinstance(message, _Cancel):
                    self._stop_task(message.run_id, cancelled=True)
                if time.monotonic() >= next_tick:
                    await self._tick()
                    next_tick = time.monotonic() + self._tick_interval
        finally:
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            # The runs stay active in Redis: the next gateway to start (or another one) resumes them.
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _guard(self, step: Any) -> None:
        try:
            await step
        except REDIS_OR_OS_ERRORS as exc:
            # Redis away for a moment: the next tick tries again; the runs keep their state in Redis.
            self.log.warning("eval_runner_redis_error", error=str(exc))

    async def _tick(self) -> None:
        await self._guard(self._check_own_runs())
        await self._guard(self._adopt_unowned())

    async def _check_own_runs(self) -> None:
        for run_id in list(self._tasks):
            status = await self.store.status(run_id)
            if status is None or status in FINAL_STATUSES:
                self._stop_task(run_id, cancelled=status == RunStatus.CANCELLED)
            elif not await self.store.take_lease(run_id, self.owner, self.settings.eval_lease_seconds):
                self.log.warning("eval_run_lease_lost", run_id=run_id)
                self._stop_task(run_id, cancelled=False)

    async def _adopt_unowned(self) -> None:
        for run_id in await self.store.active_ids():
            if run_id not in self._tasks:
                await self._adopt(run_id)

    async def _adopt(self, run_id: str) -> None:
        if run_id in self._tasks or self.stopping or self._retry_at.get(run_id, 0.0) > time.monotonic():
            return
        self._retry_at.pop(run_id, None)
        run = await self.store.get(run_id)
        if run is None or run.get("status") in FINAL_STATUSES:
            await self.store.forget_active(run_id)
            return
        if not await self.store.take_lease(run_id, self.owner, self.settings.eval_lease_seconds):
            return  # another gateway works on it
        harness = Harness(run["harness"])
        event = "started" if run.get("status") == RunStatus.QUEUED else "resumed"
        metrics.EVAL_RUNS.labels(harness.value, event).inc()
        metrics.EVAL_RUNS_ACTIVE.labels(harness.value).inc()
        self.log.info(f"eval_run_{event}", run_id=run_id, harness=harness.value, status=run.get("status"))
        task = asyncio.create_task(self._drive(run), name=f"eval_run:{run_id}")
        self._tasks[run_id] = task
        self._harness[run_id] = harness
        task.add_done_callback(partial(self._task_done, run_id))

    def _task_done(self, run_id: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(run_id) is task:
            del self._tasks[run_id]
            metrics.EVAL_RUNS_ACTIVE.labels(self._harness.pop(run_id).value).dec()
        self._cancelling.discard(run_id)

    def _stop_task(self, run_id: str, *, cancelled: bool) -> None:
        task = self._tasks.get(run_id)
        if task is not None and not task.done():
            if cancelled:
                self._cancelling.add(run_id)
            task.cancel()

    async def _drive(self, run: dict[str, str]) -> None:
        run_id = run["id"]
        release = True
        try:
            spec = RunSpec.from_fields(run)
            if spec.harness is Harness.EVAL_REPO:
                await self._drive_eval_repo(run, spec)
            else:
                await self._drive_euroeval(run, spec)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Not the run's fault as far as we know (Redis, a bug): keep the lease until it runs out, so
            # the run is taken up again (here or by another gateway) after a pause; give up after a few tries.
            release = False
            self._retry_at[run_id] = time.monotonic() + self.settings.eval_lease_seconds
            self.log.exception("eval_run_crashed", run_id=run_id)
            with contextlib.suppress(*REDIS_OR_OS_ERRORS):
                crashes = await self.store.count_crash(run_id)
                if crashes >= MAX_RUN_CRASHES:
                    await self._fail(run, f"internal error after {crashes} attempts: {type(exc).__name__}: {exc}",
                                     "internal")
        finally:
            self._wake.pop(run_id, None)
            for job_id in [j for j, r in self._job_runs.items() if r == run_id]:
                del self._job_runs[job_id]
            if release:
                with contextlib.suppress(*REDIS_OR_OS_ERRORS):
                    await asyncio.shield(self.store.release_lease(run_id, self.owner))

    async def _fail(self, run: dict[str, str], message: str, code: str, log_tail: list[str] | None = None) -> None:
        fields = {"error": message, "error_code": code, "log_tail": orjson.dumps(log_tail or []).decode()}
        if await self.store.finish(run["id"], RunStatus.FAILED, fields):
            metrics.EVAL_RUNS.labels(run["harness"], "failed").inc()
            self.log.warning("eval_run_failed", run_id=run["id"], code=code, error=message)

    async def _fail_repo(self, run: dict[str, str], exc: EvalRepoError) -> None:
        await self._fail(run, exc.message, exc.code, exc.stderr.splitlines()[-self.settings.eval_log_tail_lines:])

    async def _complete(self, run: dict[str, str], result: dict[str, Any], extra: dict[str, str]) -> None:
        if await self.store.finish(run["id"], RunStatus.COMPLETED,
                                   {"result": orjson.dumps(result).decode(), **extra}):
            metrics.EVAL_RUNS.labels(run["harness"], "completed").inc()
            self.log.info("eval_run_completed", run_id=run["id"], metrics=result.get("metrics"))

    # --- eval-repo runs
    async def _drive_eval_repo(self, run: dict[str, str], spec: RunSpec) -> None:
        run_id, key_id = run["id"], run["key_id"]
        assert spec.eval is not None
        raw_requests = await self.store.requests(run_id)
        if not raw_requests:
            if await self.store.update(run_id, {"status": RunStatus.PREPARING.value,
                                                "started_at": run.get("started_at") or repr(time.time())}) != "ok":
                return
            try:
                raw_requests = await self.repo.prepare(spec.eval, spec.model, spec.options)
            except EvalRepoError as exc:
                await self._fail_repo(run, exc)
                return
            if not raw_requests:
                await self._fail(run, "run_eval.py prepare selected no samples", "no_samples")
                return
            await self.store.save_requests(run_id, raw_requests)
        if await self.store.update(run_id, {"status": RunStatus.RUNNING.value,
                                            "started_at": run.get("started_at") or repr(time.time())}) != "ok":
            await self._drop_working_data(run_id)
            return
        requests = [orjson.loads(line) for line in raw_requests]
        jobs = await self.store.sample_jobs(run_id)
        answered = await self.store.answered_samples(run_id)
        outstanding = {sid: job for sid, job in jobs.items() if sid not in answered}
        to_send = deque(r for r in requests if r["id"] not in jobs and r["id"] not in answered)
        wake = self._wake.setdefault(run_id, asyncio.Event())
        for job_id in outstanding.values():
            self._job_runs[job_id] = run_id
        try:
            while to_send or outstanding:
                status = await self.store.status(run_id)
                if status is None or status in FINAL_STATUSES:
                    await self._abandon(run_id, key_id, list(outstanding.values()))
                    return
                while to_send and len(outstanding) < self.settings.eval_max_in_flight:
                    await self._submit(run_id, key_id, spec, to_send.popleft(), outstanding)
                wake.clear()
                collected = await self._collect(run_id, outstanding)
                if outstanding and not collected and (not to_send
                                                      or len(outstanding) >= self.settings.eval_max_in_flight):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), self.settings.eval_poll_interval)
        except asyncio.CancelledError:
            if run_id in self._cancelling:
                await asyncio.shield(self._abandon(run_id, key_id, list(outstanding.values())))
            raise
        if await self.store.update(run_id, {"status": RunStatus.SCORING.value}) != "ok":
            await self._drop_working_data(run_id)
            return
        lines = await self.store.answers(run_id)
        try:
            result = await self.repo.score(spec.eval, spec.options, lines)
        except EvalRepoError as exc:
            await self._fail_repo(run, exc)
            return
        await self._complete(run, result, {"eval_version": str(result.get("version", ""))})

    async def _submit(self, run_id: str, key_id: str, spec: RunSpec, request: dict[str, Any],
                      outstanding: dict[str, str]) -> None:
        sample = request["id"]
        body = dict(request["body"])
        body["priority"] = spec.priority
        body["metadata"] = {"eval_run": run_id, "eval_sample": sample}
        try:
            submission = parse_submission(body, Endpoint(request["endpoint"]),
                                          max_metadata_items=max(2, self.settings.batch_max_metadata_items),
                                          policy=ModelPolicy.from_settings(self.settings))
        except (ApiError, ValueError) as exc:
            # The eval asked for something the batch API refuses: the sample fails, the run goes on.
            message = exc.message if isinstance(exc, ApiError) else str(exc)
            line = {"id": sample, "error": f"the gateway refused the request: {message}"}
            await self.store.record_answers(run_id, {sample: orjson.dumps(line)})
            metrics.EVAL_SAMPLES.labels("failed").inc()
            return
        job = await self.queue.enqueue(key_id, submission)
        # A crash between these two writes leaves one job unrecorded: the sample is sent again on resume
        # and the stray job's answer is ignored (docs/evals.md).
        await self.store.record_job(run_id, sample, job["id"])
        outstanding[sample] = job["id"]
        self._job_runs[job["id"]] = run_id
        metrics.EVAL_SAMPLES.labels("submitted").inc()

    async def _collect(self, run_id: str, outstanding: dict[str, str]) -> int:
        """Record the answers of finished jobs; returns how many finished."""
        if not outstanding:
            return 0
        items = list(outstanding.items())
        rows = await self.queue.job_fields([job_id for _, job_id in items], ("status", "response", "error"))
        answers: dict[str, bytes] = {}
        for (sample, job_id), (raw_status, response, error) in zip(items, rows, strict=True):
            status = opt_text(raw_status)
            line: dict[str, Any]
            if status is None:
                line = {"id": sample, "error": f"batch job {job_id} disappeared (expired or deleted) before it "
                                               "was answered"}
            elif status == "completed":
                try:
                    line = {"id": sample, "response": orjson.loads(response or b"null")}
                except orjson.JSONDecodeError:
                    line = {"id": sample, "response": (response or b"").decode(errors="replace")}
            elif status == "failed":
                line = {"id": sample, "error": opt_text(error) or f"batch job {job_id} failed"}
            elif status == "cancelled":
                line = {"id": sample, "error": f"batch job {job_id} was cancelled"}
            else:
                continue
            answers[sample] = orjson.dumps(line)
            metrics.EVAL_SAMPLES.labels("answered" if "response" in line else "failed").inc()
        if answers:
            await self.store.record_answers(run_id, answers)
            for sample in answers:
                self._job_runs.pop(outstanding.pop(sample), None)
        return len(answers)

    async def _abandon(self, run_id: str, key_id: str, job_ids: list[str]) -> None:
        """The run ended while we worked on it (cancelled): stop its jobs and drop its working data."""
        with contextlib.suppress(*REDIS_OR_OS_ERRORS):
            if await self.store.status(run_id) == RunStatus.CANCELLED:
                await self._cancel_jobs(job_ids, key_id)
            await self._drop_working_data(run_id)

    async def _drop_working_data(self, run_id: str) -> None:
        await self.store.drop_working_data(run_id)

    async def _cancel_jobs(self, job_ids: list[str], key_id: str) -> None:
        for job_id in job_ids:
            await self.queue.cancel(job_id, key_id)

    # --- EuroEval runs
    def _token(self, run_id: str, key_id: str) -> str:
        """A token for one EuroEval run (realtime scope, accounted to the run's key), revoked when the run
        ends (`_drop_token`) or when its key leaves the keys file (the keyring drops it on reload)."""
        token = self._tokens[run_id] = secrets.token_urlsafe(32)
        owner = None if key_id == self.settings.internal_eval_key_id else key_id
        self.keyring.add_internal(token, ApiKey(key_id, frozenset({Scope.REALTIME})), owner=owner)
        return token

    def _drop_token(self, run_id: str) -> None:
        token = self._tokens.pop(run_id, None)
        if token is not None:
            self.keyring.remove_internal(token)

    async def _drive_euroeval(self, run: dict[str, str], spec: RunSpec) -> None:
        run_id = run["id"]
        if await self.store.update(run_id, {"status": RunStatus.RUNNING.value,
                                            "started_at": run.get("started_at") or repr(time.time())}) != "ok":
            return
        token = self._token(run_id, run["key_id"])
        work = Path(self.settings.euroeval_work_dir)
        argv = build_args(shlex.split(self.settings.euroeval_command), model=spec.model, api_base=self.api_base,
                          datasets=spec.datasets, tasks=spec.tasks, languages=spec.languages,
                          options=spec.options, cache_dir=str((work / "cache").resolve()))
        try:
            result = await run_euroeval(argv, cwd=(work / run_id).resolve(), debug_log=self.settings.euroeval_debug_log,
                                        run_id=run_id, secret=token, timeout=self.settings.euroeval_timeout_seconds,
                                        tail_lines=self.settings.eval_log_tail_lines)
        except EuroEvalFailed as exc:
            # The client sees the message and the log's tail; the debug log's path stays on the server.
            where = str(work.resolve())
            tail = [line.replace(where, "<EUROEVAL_WORK_DIR>") for line in exc.log_tail]
            await self._fail(run, f"{exc.message} The full log is in the gateway's EUROEVAL_DEBUG_LOG.", exc.code,
                             tail)
            return
        finally:
            self._drop_token(run_id)
        await self._complete(run, result, {})

    # --- job events: wake a run as soon as one of its jobs finishes (polling is only the fallback)
    def _on_event(self, event: JobEvent) -> None:
        if event.fields.get("event") in ("completed", "failed", "cancelled"):
            run_id = self._job_runs.get(event.fields.get("job_id", ""))
            wake = self._wake.get(run_id) if run_id else None
            if wake is not None:
                wake.set()

    def _on_gap(self) -> None:
        # Outcomes may have been missed: every run looks at its jobs now.
        for wake in self._wake.values():
            wake.set()
