"""Eval runs: the request schema, the run record in Redis, and its public JSON.

A run is one hash (`eval_run:<id>`) plus, for an eval-repo run, its prepared requests (a list), the batch
job of each sample and each sample's answer (two hashes); those three go when the run ends, the hash with
the result stays. docs/evals.md has the whole picture.
"""

from __future__ import annotations

import builtins
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson
from redis.asyncio import Redis

from gateway import redis_client
from gateway.batch.jobs import PRIORITY_MAX, PRIORITY_MIN
from gateway.errors import bad_request
from gateway.evals.euroeval import GENERATIVE_TYPES
from gateway.evals.evalrepo import EvalRepo
from gateway.policy import ModelPolicy
from gateway.redis_codec import as_bytes, hash_fields, opt_text, text, text_hash, texts
from gateway.redis_keys import RedisKeys
from gateway.settings import Settings


class Harness(StrEnum):
    """What runs the evaluation."""

    EVAL_REPO = "eval-repo"
    EUROEVAL = "euroeval"


class RunStatus(StrEnum):
    """Where a run is; the last three are final."""

    QUEUED = "queued"
    PREPARING = "preparing"
    RUNNING = "running"
    SCORING = "scoring"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        """True when nothing will happen to the run any more."""
        return self in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED)


FINAL_STATUSES = frozenset(s.value for s in RunStatus if s.final)

# Options each harness accepts: name -> (kind, description for error messages).
EVAL_REPO_OPTIONS = ("limit", "seed", "max_tokens", "few_shot", "temperature", "json_mode")
EUROEVAL_OPTIONS = ("num_iterations", "few_shot", "evaluate_test_split", "generative_type")
_SEED_MAX = 2 ** 63 - 1
# Names handed to EuroEval as arguments: no leading '-', so none can pass for an option.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,199}")


@dataclass(slots=True)
class RunSpec:
    """A validated run request."""

    harness: Harness
    model: str
    priority: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    eval: str | None = None
    datasets: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    languages: list[str] = field(default_factory=list)

    def to_fields(self) -> dict[str, str]:
        """The spec as run hash fields."""
        return {
            "harness": self.harness.value, "model": self.model, "priority": str(self.priority),
            "options": orjson.dumps(self.options).decode(), "eval": self.eval or "",
            "datasets": orjson.dumps(self.datasets).decode(), "tasks": orjson.dumps(self.tasks).decode(),
            "languages": orjson.dumps(self.languages).decode(),
        }

    @classmethod
    def from_fields(cls, run: Mapping[str, str]) -> RunSpec:
        """The spec stored in a run hash."""
        return cls(harness=Harness(run["harness"]), model=run["model"], priority=int(run.get("priority") or 0),
                   options=orjson.loads(run.get("options") or "{}"), eval=run.get("eval") or None,
                   datasets=orjson.loads(run.get("datasets") or "[]"), tasks=orjson.loads(run.get("tasks") or "[]"),
                   languages=orjson.loads(run.get("languages") or "[]"))


_RUN_ID = re.compile(r"^evalrun_[0-9a-f]{22,32}$")


def is_run_id(text: str) -> bool:
    """True when `text` has the shape of a run id (anything else is answered 404 without touching Redis,
    where `<id>:lease` would name another kind of key)."""
    return _RUN_ID.match(text) is not None


def new_run_id(now: float | None = None) -> str:
    """A run id whose text order is its creation order (like batch job ids)."""
    micros = time.time_ns() // 1000 if now is None else round(now * 1_000_000)
    return f"evalrun_{micros:014x}{secrets.token_hex(4)}"


def _json(value: object) -> str:
    return orjson.dumps(value).decode()


def _int(options: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    value = options.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad_request(f"options.{name} must be an integer from {low} to {high}, not {_json(value)}.",
                          param=f"options.{name}")
    return value


def _bool(options: Mapping[str, Any], name: str) -> bool | None:
    value = options.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad_request(f"options.{name} must be true or false, not {_json(value)}.", param=f"options.{name}")
    return value


def _names(data: Mapping[str, Any], name: str) -> list[str]:
    value = data.get(name)
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and _NAME.fullmatch(v)
                                                            for v in values):
        raise bad_request(f"'{name}' must be a name or a non-empty list of names (letters, digits, '_', '.', "
                          f"':', '/' and '-', not starting with '-'), not {_json(value)}.", param=name)
    return list(dict.fromkeys(values))


def _options(data: Mapping[str, Any], allowed: tuple[str, ...], harness: str) -> dict[str, Any]:
    options = data.get("options")
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise bad_request("'options' must be an object.", param="options")
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise bad_request(f"Unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for "
                          f"harness '{harness}'; it accepts: {', '.join(allowed)}.", param="options")
    return {k: v for k, v in options.items() if v is not None}


async def parse_run_request(data: Mapping[str, Any], *, repo: EvalRepo, settings: Settings) -> RunSpec:
    """Validate a POST /eval/runs body or raise a 400 that says what to change."""
    harness = data.get("harness")
    if harness not in Harness.__members__.values():
        raise bad_request(f"'harness' must be one of {', '.join(h.value for h in Harness)}, not {_json(harness)}.",
                          param="harness")
    harness = Harness(str(harness))
    model = data.get("model")
    if not isinstance(model, str) or not model.strip():
        raise bad_request("'model' is required: a non-empty string naming the model to evaluate.", param="model")
    model = ModelPolicy.from_settings(settings).batch_model(model.strip())
    priority = data.get("priority", 0)
    if priority is None:
        priority = 0
    if isinstance(priority, bool) or not isinstance(priority, int) or not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise bad_request(f"'priority' must be an integer from {PRIORITY_MIN} to {PRIORITY_MAX} (higher runs "
                          f"first; evals default to {PRIORITY_MIN}), not {_json(priority)}.", param="priority")
    known = {"harness", "model", "priority", "options", "eval", "dataset", "task", "language"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise bad_request(f"Unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; a run "
                          f"takes: {', '.join(sorted(known))}.", param=unknown[0])
    if harness is Harness.EVAL_REPO:
        return await _eval_repo_spec(data, model, priority, repo)
    return _euroeval_spec(data, model, priority, settings)


async def _eval_repo_spec(data: Mapping[str, Any], model: str, priority: int, repo: EvalRepo) -> RunSpec:
    for param in ("dataset", "task", "language"):
        if data.get(param) is not None:
            raise bad_request(f"'{param}' belongs to the euroeval harness; an eval-repo run names an 'eval'.",
                              param=param)
    name = data.get("eval")
    evals = await repo.list_evals()
    available = ", ".join(e["name"] for e in evals)
    if not isinstance(name, str) or not name:
        raise bad_request(f"'eval' is required for harness 'eval-repo'; available: {available}.", param="eval")
    info = next((e for e in evals if e["name"] == name), None)
    if info is None:
        raise bad_request(f"Unknown eval '{name}'; available: {available}.", param="eval", code="unknown_eval")
    options = _options(data, EVAL_REPO_OPTIONS, "eval-repo")
    checked: dict[str, Any] = {}
    for key, low, high in (("limit", 1, 1_000_000), ("seed", 0, _SEED_MAX), ("max_tokens", 1, 1_000_000),
                           ("few_shot", 0, int(info.get("max_few_shot") or 0))):
        value = _int(options, key, low, high)
        if value is not None:
            checked[key] = value
    temperature = options.get("temperature")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            raise bad_request(f"options.temperature must be a number from 0 to 2, not {_json(temperature)}.",
                              param="options.temperature")
        checked["temperature"] = float(temperature)
    if _bool(options, "json_mode"):
        if "--json-mode" not in (info.get("extra_options") or []):
            raise bad_request(f"options.json_mode is not an option of eval '{name}'.", param="options.json_mode")
        checked["json_mode"] = True
    return RunSpec(Harness.EVAL_REPO, model, priority, checked, eval=name)


def _euroeval_spec(data: Mapping[str, Any], model: str, priority: int, settings: Settings) -> RunSpec:
    if data.get("eval") is not None:
        raise bad_request("'eval' belongs to the eval-repo harness; a euroeval run names a 'dataset' or a "
                          "'task' (and optionally a 'language').", param="eval")
    if model != settings.realtime_model:
        raise bad_request(f"EuroEval runs against the realtime endpoint, which serves '{settings.realtime_model}' "
                          f"only, not '{model}'.", param="model")
    datasets, tasks, languages = _names(data, "dataset"), _names(data, "task"), _names(data, "language")
    if not datasets and not tasks:
        raise bad_request("Name a 'dataset' or a 'task' (EuroEval would otherwise run every benchmark it has).",
                          param="dataset")
    if datasets and (tasks or languages):
        raise bad_request("EuroEval does not combine 'dataset' with 'task' or 'language': a dataset already "
                          "fixes both.", param="dataset")
    options = _options(data, EUROEVAL_OPTIONS, "euroeval")
    checked: dict[str, Any] = {}
    value = _int(options, "num_iterations", 1, 100)
    if value is not None:
        checked["num_iterations"] = value
    for key in ("few_shot", "evaluate_test_split"):
        flag = _bool(options, key)
        if flag is not None:
            checked[key] = flag
    kind = options.get("generative_type")
    if kind is not None:
        if kind not in GENERATIVE_TYPES:
            raise bad_request(f"options.generative_type must be one of {', '.join(GENERATIVE_TYPES)}, not "
                              f"{_json(kind)}.", param="options.generative_type")
        checked["generative_type"] = kind
    return RunSpec(Harness.EUROEVAL, model, priority, checked, datasets=datasets, tasks=tasks, languages=languages)


# Change a run that is not final yet (a cancel or a finish that got there first wins).
_UPDATE = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if st == 'completed' or st == 'failed' or st == 'cancelled' then return st end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 'ok'
"""

# Take or keep the lease of a run: free, or already ours.
_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RunStore:
    """Every Redis operation on eval runs."""

    def __init__(self, redis: Redis, keys: RedisKeys) -> None:
        self.redis = redis
        self.keys = keys
        self._update = redis.register_script(_UPDATE)
        self._lease = redis.register_script(_LEASE)
        self._release = redis.register_script(_RELEASE)

    async def create(self, spec: RunSpec, key_id: str, created_by: str) -> dict[str, str]:
        """Store a new queued run; returns its hash."""
        now = time.time()
        run_id = new_run_id(now)
        fields = {"id": run_id, "key_id": key_id, "created_by": created_by, "status": RunStatus.QUEUED.value,
                  "created_at": repr(now), "updated_at": repr(now), **spec.to_fields()}
        # One transaction (every eval key is in the `{evals}` slot): never a run missing from the listing.
        pipe = await redis_client.transaction(self.redis)
        pipe.hset(self.keys.eval_run(run_id), mapping=hash_fields(fields))
        pipe.zadd(self.keys.eval_runs, {run_id: 0})
        pipe.sadd(self.keys.eval_runs_active, run_id)
        await pipe.execute()
        return fields

    async def get(self, run_id: str) -> dict[str, str] | None:
        """The run hash, decoded, or None (also for a text that is no run id)."""
        if not is_run_id(run_id):
            return None
        raw = await self.redis.hgetall(self.keys.eval_run(run_id))
        return text_hash(raw) if raw else None

    async def status(self, run_id: str) -> str | None:
        """The run's status alone."""
        raw = await self.redis.hget(self.keys.eval_run(run_id), "status")
        return opt_text(raw)

    async def update(self, run_id: str, fields: Mapping[str, str]) -> str:
        """Set fields of a run that is not final: 'ok', 'missing' or the final status that stopped it."""
        args: list[str] = []
        for k, v in {**fields, "updated_at": repr(time.time())}.items():
            args.extend((k, v))
        result = await self._update(keys=[self.keys.eval_run(run_id)], args=args)
        return text(result)

    async def finish(self, run_id: str, status: RunStatus, fields: Mapping[str, str]) -> bool:
        """Move a run to a final status (False when it already was final) and drop its working data."""
        # The counts outlive the working data they are read from.
        prepared, sent, answered = await self.progress(run_id)
        counts = {"prepared": str(prepared), "sent": str(sent), "answered": str(answered)}
        outcome = await self.update(run_id, {**counts, **fields, "status": status.value,
                                             "finished_at": repr(time.time())})
        pipe = await redis_client.transaction(self.redis)
        if outcome == "ok":
            pipe.delete(self.keys.eval_run_requests(run_id), self.keys.eval_run_jobs(run_id),
                        self.keys.eval_run_answers(run_id))
        pipe.srem(self.keys.eval_runs_active, run_id)
        await pipe.execute()
        return outcome == "ok"

    async def progress(self, run_id: str) -> tuple[int, int, int]:
        """(prepared, sent, answered) of an eval-repo run still working."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.llen(self.keys.eval_run_requests(run_id))
        pipe.hlen(self.keys.eval_run_jobs(run_id))
        pipe.hlen(self.keys.eval_run_answers(run_id))
        prepared, sent, answered = await pipe.execute()
        return int(prepared), int(sent), int(answered)

    async def active_ids(self) -> list[str]:
        """Runs not finished yet."""
        return sorted(texts(await self.redis.smembers(self.keys.eval_runs_active)))

    async def forget_active(self, run_id: str) -> None:
        """Drop a run from the active set (it was found final or missing)."""
        await self.redis.srem(self.keys.eval_runs_active, run_id)

    async def list(self, visible: set[str] | None, *, limit: int, after: str | None = None,
                   status: str | None = None, scan_max: int = 5000) -> tuple[list[dict[str, str]], str | None]:
        """A page of runs of the given key ids (None: every key), newest first, and the next page's cursor."""
        upper = f"({after}" if after else "+"
        found: list[dict[str, str]] = []
        scanned, last_seen = 0, None
        while len(found) < limit and scanned < scan_max:
            ids = await self.redis.zrevrangebylex(self.keys.eval_runs, upper, "-", start=0, num=100)
            if not ids:
                return found, None
            pipe = self.redis.pipeline(transaction=False)
            for raw_id in ids:
                pipe.hgetall(self.keys.eval_run(text(raw_id)))
            rows = await pipe.execute()
            for raw_id, row in zip(ids, rows, strict=True):
                scanned += 1
                last_seen = text(raw_id)
                run = text_hash(row)
                wanted = (visible is None or run.get("key_id") in visible) and (status is None
                                                                                 or run.get("status") == status)
                if run and wanted:
                    found.append(run)
                    if len(found) == limit:
                        break
            upper = f"({last_seen}"
            if len(ids) < 100 and len(found) < limit:
                return found, None
        if last_seen is None:
            return found, None
        more = await self.redis.zrevrangebylex(self.keys.eval_runs, f"({last_seen}", "-", start=0, num=1)
        return found, last_seen if more else None

    # --- an eval-repo run's working data: its prepared requests, the batch job and the answer of each sample
    async def requests(self, run_id: str) -> builtins.list[bytes]:
        """The run's prepared requests (JSON lines), empty before `save_requests`."""
        return [as_bytes(x) for x in await self.redis.lrange(self.keys.eval_run_requests(run_id), 0, -1)]

    async def save_requests(self, run_id: str, raw_requests: Sequence[bytes]) -> None:
        """Store the prepared requests, replacing any earlier ones, in one transaction."""
        pipe = await redis_client.transaction(self.redis)  # one slot: `{evals}`
        pipe.delete(self.keys.eval_run_requests(run_id))
        pipe.rpush(self.keys.eval_run_requests(run_id), *raw_requests)
        await pipe.execute()

    async def sample_jobs(self, run_id: str) -> dict[str, str]:
        """Sample id -> the batch job id it was sent as."""
        return text_hash(await self.redis.hgetall(self.keys.eval_run_jobs(run_id)))

    async def record_job(self, run_id: str, sample: str, job_id: str) -> None:
        """The sample was sent as batch job `job_id`."""
        await self.redis.hset(self.keys.eval_run_jobs(run_id), sample, job_id)

    async def answered_samples(self, run_id: str) -> set[str]:
        """Ids of the samples that have an answer (or a recorded failure)."""
        return set(texts(await self.redis.hkeys(self.keys.eval_run_answers(run_id))))

    async def answers(self, run_id: str) -> builtins.list[bytes]:
        """Every recorded answer line (JSON)."""
        return [as_bytes(x) for x in await self.redis.hvals(self.keys.eval_run_answers(run_id))]

    async def record_answers(self, run_id: str, answers: Mapping[str, bytes]) -> None:
        """Record answer lines (JSON) by sample id."""
        await self.redis.hset(self.keys.eval_run_answers(run_id), mapping=hash_fields(answers))

    async def drop_working_data(self, run_id: str) -> None:
        """Delete the run's requests, jobs and answers (the run hash and its counts stay)."""
        await self.redis.delete(self.keys.eval_run_requests(run_id), self.keys.eval_run_jobs(run_id),
                                self.keys.eval_run_answers(run_id))

    async def count_crash(self, run_id: str) -> int:
        """Count one more crash of the run; returns the total."""
        return int(await self.redis.hincrby(self.keys.eval_run(run_id), "crashes", 1))

    # --- leases: one gateway works on a run at a time
    async def take_lease(self, run_id: str, owner: str, seconds: float) -> bool:
        """Take (or renew) the run's lease; False when another gateway holds it."""
        return bool(await self._lease(keys=[self.keys.eval_run_lease(run_id)], args=[owner, int(seconds * 1000)]))

    async def release_lease(self, run_id: str, owner: str) -> None:
        """Give the lease back (only if it is still ours)."""
        await self._release(keys=[self.keys.eval_run_lease(run_id)], args=[owner])


def _float(value: str | None) -> float | None:
    return float(value) if value else None


def run_view(run: Mapping[str, str], progress: tuple[int, int, int] | None = None, *,
             include_samples: bool = False) -> dict[str, Any]:
    """The public JSON of a run (GET /eval/runs/<id>)."""
    spec = RunSpec.from_fields(run)
    status = run.get("status", "")
    result = orjson.loads(run["result"]) if run.get("result") else None
    if progress is None:
        progress = (int(run.get("prepared") or 0), int(run.get("sent") or 0), int(run.get("answered") or 0))
    view: dict[str, Any] = {
        "id": run.get("id"),
        "object": "eval.run",
        "harness": spec.harness.value,
        "status": status,
        "model": spec.model,
        "priority": spec.priority,
        "options": spec.options,
        "key_id": run.get("key_id"),
        "created_by": run.get("created_by"),
        "created_at": _float(run.get("created_at")),
        "started_at": _float(run.get("started_at")),
        "finished_at": _float(run.get("finished_at")),
        "progress": None,
        "metrics": None,
        "result": None,
        "error": None,
    }
    if spec.harness is Harness.EVAL_REPO:
        view["eval"] = spec.eval
        scored = int(result["counts"]["answered"]) if result and isinstance(result.get("counts"), dict) else 0
        view["progress"] = {"prepared": progress[0], "sent": progress[1], "answered": progress[2], "scored": scored}
        if result is not None:
            view["metrics"] = result.get("metrics")
            summary = {k: result.get(k) for k in ("eval", "version", "protocol_version", "primary_metric", "counts",
                                                  "missing_ids", "options")}
            if include_samples:
                summary["samples"] = result.get("samples")
            view["result"] = summary
    else:
        view.update(dataset=spec.datasets or None, task=spec.tasks or None, language=spec.languages or None)
        records = result.get("records") if result else None
        view["progress"] = {"prepared": None, "sent": None, "answered": None,
                            "scored": len(records) if records is not None else 0}
        if result is not None:
            view["metrics"] = result.get("metrics")
            view["result"] = result
    if run.get("error"):
        view["error"] = {"message": run["error"], "code": run.get("error_code") or None,
                         "log_tail": orjson.loads(run["log_tail"]) if run.get("log_tail") else []}
    return view
