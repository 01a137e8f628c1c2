"""Eval runs through the gateway: the /eval API, each eval-repo eval end to end on the simulator (batch
queue included), protocol errors as failed runs, cancellation, and a gateway restart in the middle of a run."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.bootstrap import create_app
from gateway.evals.runs import Harness, RunSpec
from gateway.http.evals import EVAL_RUNNER
from gateway.redis_keys import RedisKeys
from tests.api_helpers import create_run, wait_run
from tests.conftest import (
    KEY_IDS,
    REALTIME_MODEL,
    ROOT,
    RedisBackend,
    auth,
    eventually,
    start_simulator,
    wait_ready,
)

pytestmark = pytest.mark.slow  # whole eval runs through the batch queue

RUN_EVAL = ROOT / "eval-repo" / "run_eval.py"


def run_eval(*args: str, stdin: bytes | None = None) -> bytes:
    """Call run_eval.py directly (the reference the gateway's results are compared with)."""
    done = subprocess.run([sys.executable, str(RUN_EVAL), *args], input=stdin, capture_output=True, check=True)
    return done.stdout


def option_flags(options: dict[str, Any]) -> list[str]:
    flags = {"limit": "--limit", "seed": "--seed", "few_shot": "--few-shot", "max_tokens": "--max-tokens"}
    out = [a for k, v in options.items() if k in flags for a in (flags[k], str(v))]
    return out + (["--json-mode"] if options.get("json_mode") else [])


def expected_score(sim_url: str, eval_name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Prepare, send every request straight to the simulator, score: what a run through the gateway must give."""
    lines = []
    for raw in run_eval("prepare", eval_name, REALTIME_MODEL, *option_flags(options)).splitlines():
        request = json.loads(raw)
        req = urllib.request.Request(sim_url + request["endpoint"], data=json.dumps(request["body"]).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            lines.append(json.dumps({"id": request["id"], "response": json.loads(resp.read())}).encode())
    return json.loads(run_eval("score", eval_name, *option_flags(options), stdin=b"\n".join(lines)))


async def test_list_evals_is_the_eval_repo_list(gateway: Any) -> None:
    resp = await gateway.get("/eval/evals", headers=auth("eval"))
    assert resp.status == 200
    data = (await resp.json())["data"]
    assert data == json.loads(run_eval("list"))
    assert {e["name"] for e in data} >= {"arithmetic", "capitals-qa", "mc-logprobs", "json-format"}
    resp = await gateway.get("/eval/evals?base_model=true", headers=auth("eval"))
    base = (await resp.json())["data"]
    assert base == json.loads(run_eval("list", "--base-model")) and 0 < len(base) < len(data)
    assert (await gateway.get("/eval/evals", headers=auth("batch"))).status == 401


@pytest.mark.parametrize(("body", "param", "needle"), [
    ({"harness": "lm-eval", "model": REALTIME_MODEL}, "harness", "eval-repo, euroeval"),
    ({"harness": "eval-repo", "eval": "arithmetic"}, "model", "'model' is required"),
    ({"harness": "eval-repo", "model": REALTIME_MODEL}, "eval", "available: arithmetic"),
    ({"harness": "eval-repo", "model": REALTIME_MODEL, "eval": "nope"}, "eval",
     "Unknown eval 'nope'; available: arithmetic, capitals-qa, mc-logprobs, json-format"),
    ({"harness": "eval-repo", "model": REALTIME_MODEL, "eval": "capitals-qa", "options": {"few_shot": 9}},
     "options.few_shot", "from 0 to 8"),
    ({"harness": "eval-repo", "model": REALTIME_MODEL, "eval": "arithmetic", "options": {"json_mode": True}},
     "options.json_mode", "not an option of eval 'arithmetic'"),
    ({"harness": "eval-repo", "model": REALTIME_MODEL, "eval": "arithmetic", "options": {"lim": 3}},
     "options", "Unknown option 'lim' for harness 'eval-repo'; it accepts: limit, seed"),
    ({"harness": "eval-repo", "model": REALTIME_MODEL, "eval": "arithmetic", "options": {"limit": 0}},
     "options.limit", "integer from 1"),
    ({"harness": "eval-repo", "model": REALTIME_MODEL, "eval": "arithmetic", "options": {"temperature": 3}},
     "options.temperature", "from 0 to 2"),
    ({"harness": "eval-repo", "model": REALTIME_MODEL, "eval": "arithmetic", "options": []},
     "options", "must be an object"),
    ({"harness": "eval-repo", "model": REALTIME_MODEL, "eval": "arithmetic", "priority": 10},
     "priority", "from 0 to 9"),
    ({"harness": "eval-repo", "model": REALTIME_MODEL, "eval": "arithmetic", "dataset": "x"},
     "dataset", "belongs to the euroeval harness"),
    ({"harness": "eval-repo", "model": REALTIME_MODEL, "eval": "arithmetic", "evals": "x"},
     "evals", "Unknown field 'evals'"),
    ({"harness": "euroeval", "model": REALTIME_MODEL}, "dataset", "Name a 'dataset' or a 'task'"),
    ({"harness": "euroeval", "model": REALTIME_MODEL, "dataset": "angry-tweets", "language": "da"},
     "dataset", "does not combine"),
    ({"harness": "euroeval", "model": REALTIME_MODEL, "task": "--help"}, "task", "not starting with '-'"),
    ({"harness": "euroeval", "model": "other/model", "task": "sentiment-classification"}, "model",
     "serves 'test-org/realtime-model' only"),
    ({"harness": "euroeval", "model": REALTIME_MODEL, "eval": "arithmetic"}, "eval", "belongs to the eval-repo"),
    ({"harness": "euroeval", "model": REALTIME_MODEL, "task": "sentiment-classification",
      "options": {"generative_type": "chat"}}, "options.generative_type", "base, instruction_tuned, reasoning"),
])
async def test_bad_run_requests_are_clear_400s(gateway: Any, body: dict[str, Any], param: str, needle: str) -> None:
    resp = await gateway.post("/eval/runs", json=body, headers=auth("eval"))
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == param
    assert needle in error["message"], error["message"]


async def test_bad_json_body_is_400(gateway: Any) -> None:
    resp = await gateway.post("/eval/runs", data=b"{nope", headers={**auth("eval"),
                                                                    "Content-Type": "application/json"})
    assert resp.status == 400
    assert "not valid JSON" in (await resp.json())["error"]["message"]


@pytest.mark.parametrize(("eval_name", "options"), [
    ("arithmetic", {"limit": 6, "few_shot": 1}),
    ("capitals-qa", {"limit": 6}),
    ("mc-logprobs", {"limit": 6, "seed": 3}),
    ("json-format", {"limit": 6}),
    ("json-format", {"limit": 6, "json_mode": True}),
])
async def test_each_eval_end_to_end(gateway: Any, sim_url: str, eval_name: str, options: dict[str, Any]) -> None:
    view = await create_run(gateway, {"harness": "eval-repo", "eval": eval_name, "model": REALTIME_MODEL,
                                  "options": options, "priority": 2})
    assert view["status"] == "queued" and view["eval"] == eval_name and view["priority"] == 2
    done = await wait_run(gateway, view["id"])
    assert done["status"] == "completed", done["error"]
    assert done["progress"] == {"prepared": 6, "sent": 6, "answered": 6, "scored": 6}
    expected = expected_score(sim_url, eval_name, options)
    assert done["metrics"] == expected["metrics"]
    assert done["result"]["counts"] == {"selected": 6, "answered": 6, "errors": 0, "missing": 0}
    assert done["result"]["version"] == expected["version"] and done["result"]["eval"] == eval_name
    assert "samples" not in done["result"]
    # What the eval-repo engineer found on the simulator: every accuracy is 0, JSON mode makes valid JSON.
    assert all(m["value"] == 0.0 for name, m in done["metrics"].items() if name != "valid_json")
    if eval_name == "json-format":
        assert done["metrics"]["valid_json"]["value"] == (1.0 if options.get("json_mode") else 0.0)
    resp = await gateway.get(f"/eval/runs/{view['id']}?samples=true", headers=auth("eval"))
    samples = (await resp.json())["result"]["samples"]
    assert [s["id"] for s in samples] == [s["id"] for s in expected["samples"]]
    assert [s["output"] for s in samples] == [s["output"] for s in expected["samples"]]


@pytest.mark.usefixtures("redis_backend")  # on one Redis and on a Redis Cluster
async def test_runs_go_through_the_batch_queue_under_the_callers_key(gateway: Any, redis_prefix: str,
                                                                    test_redis: RedisBackend) -> None:
    view = await create_run(gateway, {"harness": "eval-repo", "eval": "arithmetic", "model": REALTIME_MODEL,
                                      "options": {"limit": 3}})
    done = await wait_run(gateway, view["id"])
    assert done["status"] == "completed", done["error"]
    assert done["progress"] == {"prepared": 3, "sent": 3, "answered": 3, "scored": 3}
    assert done["result"]["counts"] == {"selected": 3, "answered": 3, "errors": 0, "missing": 0}
    client = test_redis.sync_client()
    try:
        job_ids = [j.decode() for j in client.zrange(f"{redis_prefix}{{batch}}:job_index:{KEY_IDS['eval']}", 0, -1)]
        assert len(job_ids) == 3
        for job_id in job_ids:
            job = {k.decode(): v.decode() for k, v in client.hgetall(f"{redis_prefix}{{batch}}:job:{job_id}").items()}
            assert job["status"] == "completed" and job["priority"] == "0"
            assert json.loads(job["metadata"])["eval_run"] == view["id"]
        # The run's working data is gone once it is scored; the run hash keeps the result.
        assert not client.exists(f"{redis_prefix}{{evals}}:eval_run:{view['id']}:answers")
        assert not client.sismember(f"{redis_prefix}{{evals}}:eval_runs_active", view["id"])
        usage_key = RedisKeys(redis_prefix).key_usage(KEY_IDS['eval'])
        await eventually(lambda: client.hget(usage_key, "requests") == b"3")
    finally:
        client.close()


@pytest.mark.usefixtures("redis_backend")  # on one Redis and on a Redis Cluster
async def test_list_and_visibility(gateway: Any, redis_prefix: str, test_redis: RedisBackend) -> None:
    mine = await create_run(gateway, {"harness": "eval-repo", "eval": "arithmetic", "model": REALTIME_MODEL,
                                  "options": {"limit": 1}})
    theirs = await create_run(gateway, {"harness": "eval-repo", "eval": "arithmetic", "model": REALTIME_MODEL,
                                    "options": {"limit": 1}}, role="all")
    internal = await gateway.app[EVAL_RUNNER].create_run(RunSpec(Harness.EVAL_REPO, REALTIME_MODEL,
                                                                 options={"limit": 1}, eval="capitals-qa"))
    for run_id in (mine["id"], internal["id"]):
        await wait_run(gateway, run_id)
    await wait_run(gateway, theirs["id"], role="all")
    resp = await gateway.get("/eval/runs", headers=auth("eval"))
    listed = (await resp.json())["data"]
    assert [r["id"] for r in listed] == [internal["id"], mine["id"]]  # newest first; not the other key's
    assert listed[0]["created_by"] == "internal" and listed[1]["created_by"] == "api"
    assert (await gateway.get(f"/eval/runs/{theirs['id']}", headers=auth("eval"))).status == 404
    assert (await gateway.post(f"/eval/runs/{theirs['id']}/cancel", headers=auth("eval"))).status == 404
    page = await (await gateway.get("/eval/runs?limit=1", headers=auth("eval"))).json()
    assert page["has_more"] and [r["id"] for r in page["data"]] == [internal["id"]]
    page = await (await gateway.get(f"/eval/runs?limit=1&after={page['next_cursor']}", headers=auth("eval"))).json()
    assert [r["id"] for r in page["data"]] == [mine["id"]] and not page["has_more"]
    resp = await gateway.get("/eval/runs?status=failed", headers=auth("eval"))
    assert (await resp.json())["data"] == []
    assert (await gateway.get("/eval/runs?status=done", headers=auth("eval"))).status == 400
    assert (await gateway.get("/eval/runs/evalrun_nothing", headers=auth("eval"))).status == 404
    # An internal run's batch job is queued (and accounted) under INTERNAL_EVAL_KEY_ID.
    rclient = test_redis.sync_client()
    try:
        assert rclient.zcard(f"{redis_prefix}{{batch}}:job_index:__internal_eval__") == 1
        assert rclient.zcard(f"{redis_prefix}{{batch}}:job_index:{KEY_IDS['eval']}") == 1
    finally:
        rclient.close()


@pytest.mark.usefixtures("redis_backend")  # on one Redis and on a Redis Cluster
async def test_protocol_error_in_prepare_is_a_failed_run(gateway: Any) -> None:
    # Internal runs skip the API's validation: run_eval.py's own check surfaces as the run's error.
    run = await gateway.app[EVAL_RUNNER].create_run(RunSpec(Harness.EVAL_REPO, REALTIME_MODEL,
                                                            options={"few_shot": 99}, eval="capitals-qa"))
    done = await wait_run(gateway, run["id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == "usage"
    assert "--few-shot 99 is more than the 8 examples eval 'capitals-qa' has" in done["error"]["message"]
    assert any("--few-shot 99" in line for line in done["error"]["log_tail"])
    assert done["progress"]["sent"] == 0 and done["metrics"] is None
    unknown = await gateway.app[EVAL_RUNNER].create_run(RunSpec(Harness.EVAL_REPO, REALTIME_MODEL, eval="nope"))
    done = await wait_run(gateway, unknown["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "unknown_eval"
    assert "unknown eval 'nope'" in done["error"]["message"]


def _broken_repo(tmp_path: Path, score_reply: str, exit_code: int) -> Path:
    """An eval-repo whose list and prepare are the real ones and whose score misbehaves."""
    repo = tmp_path / "broken-eval-repo"
    repo.mkdir()
    (repo / "run_eval.py").write_text(
        "import subprocess, sys\n"
        "if sys.argv[1] == 'score':\n"
        f"    sys.stdin.read(); print({score_reply!r}); print('run_eval.py: error: broken', file=sys.stderr)\n"
        f"    sys.exit({exit_code})\n"
        f"sys.exit(subprocess.call([sys.executable, {str(RUN_EVAL)!r}, *sys.argv[1:]]))\n")
    return repo


@pytest.mark.parametrize(("reply", "exit_code", "code", "needle"), [
    ('{"error": {"code": "duplicate_id", "message": "stdin line 2: duplicate id \'arithmetic-001\'"}}', 5,
     "duplicate_id", "stdin line 2: duplicate id"),
    ("not json at all", 0, "bad_output", "did not print a JSON document"),
    ('{"protocol_version": 1, "metrics": {}}', 0, "protocol_version", "protocol version 1"),
    ("", 1, "internal", "run_eval.py: error: broken"),
])
async def test_protocol_error_in_score_is_a_failed_run(aiohttp_client: Any, make_settings: Any, tmp_path: Path,
                                                       reply: str, exit_code: int, code: str, needle: str) -> None:
    client = await aiohttp_client(create_app(make_settings(eval_repo_dir=str(_broken_repo(tmp_path, reply,
                                                                                          exit_code)))))
    await wait_ready(client.app)
    view = await create_run(client, {"harness": "eval-repo", "eval": "arithmetic", "model": REALTIME_MODEL,
                                 "options": {"limit": 2}})
    done = await wait_run(client, view["id"])
    assert done["status"] == "failed" and done["error"]["code"] == code
    assert needle in done["error"]["message"]
    assert done["progress"]["answered"] == 2 and done["progress"]["scored"] == 0


async def test_missing_eval_repo_is_503(aiohttp_client: Any, make_settings: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(create_app(make_settings(eval_repo_dir=str(tmp_path / "nowhere"))))
    resp = await client.get("/eval/evals", headers=auth("eval"))
    assert resp.status == 503
    assert "EVAL_REPO_DIR" in (await resp.json())["error"]["message"]


@pytest.mark.usefixtures("redis_backend")  # on one Redis and on a Redis Cluster
async def test_cancel_stops_the_run_and_its_jobs(aiohttp_client: Any, make_settings: Any,
                                                 redis_prefix: str, test_redis: RedisBackend) -> None:
    # No dispatcher: the jobs stay queued, so the run is certainly unfinished when it is cancelled.
    client = await aiohttp_client(create_app(make_settings(batch_dispatcher_enabled=False, eval_max_in_flight=3)))
    view = await create_run(client, {"harness": "eval-repo", "eval": "arithmetic", "model": REALTIME_MODEL,
                                 "options": {"limit": 5}})

    async def sent() -> dict[str, Any] | None:
        v = await (await client.get(f"/eval/runs/{view['id']}", headers=auth("eval"))).json()
        return v if v["progress"]["sent"] == 3 else None
    running = await eventually(sent)
    assert running["status"] == "running" and running["progress"]["prepared"] == 5
    assert running["progress"]["answered"] == 0
    resp = await client.post(f"/eval/runs/{view['id']}/cancel", headers=auth("eval"))
    assert resp.status == 200
    assert (await resp.json())["status"] == "cancelled"
    rclient = test_redis.sync_client()
    try:
        job_ids = [j.decode() for j in rclient.zrange(f"{redis_prefix}{{batch}}:job_index:{KEY_IDS['eval']}", 0, -1)]
        assert len(job_ids) == 3
        assert all(rclient.hget(f"{redis_prefix}{{batch}}:job:{j}", "status") == b"cancelled" for j in job_ids)
        await eventually(lambda: not client.app[EVAL_RUNNER].working_on())
        index = f"{redis_prefix}{{batch}}:job_index:{KEY_IDS['eval']}"
        assert len(rclient.zrange(index, 0, -1)) == 3  # nothing more sent
        assert not rclient.exists(f"{redis_prefix}{{evals}}:eval_run:{view['id']}:jobs")
    finally:
        rclient.close()
    resp = await client.post(f"/eval/runs/{view['id']}/cancel", headers=auth("eval"))
    assert resp.status == 409 and "already cancelled" in (await resp.json())["error"]["message"]


@pytest.mark.usefixtures("redis_backend")  # on one Redis and on a Redis Cluster
async def test_restart_mid_run_resumes_without_duplicates(aiohttp_client: Any, make_settings: Any,
                                                          redis_prefix: str, test_redis: RedisBackend) -> None:
    proc, slow_url = start_simulator(REALTIME_MODEL, "--served-model-name", REALTIME_MODEL, "--sim-ttft", "0.3")
    rclient = test_redis.sync_client()
    try:
        settings = make_settings(runtime_url=slow_url, eval_max_in_flight=2, max_concurrent_batch=2)
        first = await aiohttp_client(create_app(settings))
        await wait_ready(first.app)
        view = await create_run(first, {"harness": "eval-repo", "eval": "capitals-qa", "model": REALTIME_MODEL,
                                    "options": {"limit": 10}})
        answers_key = f"{redis_prefix}{{evals}}:eval_run:{view['id']}:answers"
        jobs_key = f"{redis_prefix}{{evals}}:eval_run:{view['id']}:jobs"
        await eventually(lambda: rclient.hlen(answers_key) >= 2, timeout=30)
        await first.close()  # the gateway stops in the middle of the run
        answered_before = {k.decode() for k in rclient.hkeys(answers_key)}
        jobs_before = {k.decode(): v.decode() for k, v in rclient.hgetall(jobs_key).items()}
        assert 2 <= len(answered_before) < 10
        assert rclient.hget(f"{redis_prefix}{{evals}}:eval_run:{view['id']}", "status") == b"running"
        assert rclient.sismember(f"{redis_prefix}{{evals}}:eval_runs_active", view["id"])

        second = await aiohttp_client(create_app(settings))  # same Redis prefix: the run resumes
        done = await wait_run(second, view["id"], timeout=60)
        assert done["status"] == "completed", done["error"]
        assert done["progress"] == {"prepared": 10, "sent": 10, "answered": 10, "scored": 10}
        assert done["result"]["counts"] == {"selected": 10, "answered": 10, "errors": 0, "missing": 0}
        resp = await second.get(f"/eval/runs/{view['id']}?samples=true", headers=auth("eval"))
        samples = (await resp.json())["result"]["samples"]
        assert len({s["id"] for s in samples}) == 10
        # Exactly one batch job per sample, and the jobs sent before the restart were not sent again.
        jobs = {}
        for raw in rclient.zrange(f"{redis_prefix}{{batch}}:job_index:{KEY_IDS['eval']}", 0, -1):
            job = rclient.hgetall(f"{redis_prefix}{{batch}}:job:{raw.decode()}")
            meta = orjson.loads(job[b"metadata"])
            assert meta["eval_run"] == view["id"] and job[b"status"] == b"completed"
            assert meta["eval_sample"] not in jobs, "a sample was submitted twice"
            jobs[meta["eval_sample"]] = raw.decode()
        assert len(jobs) == 10
        assert all(jobs[sample] == job_id for sample, job_id in jobs_before.items())
    finally:
        rclient.close()
        proc.terminate()
        proc.wait(10)


async def test_unexpected_errors_are_retried_then_fail_the_run(aiohttp_client: Any, make_settings: Any) -> None:
    client = await aiohttp_client(create_app(make_settings(eval_lease_seconds=1)))
    runner = client.app[EVAL_RUNNER]
    calls = []

    async def broken_prepare(*args: Any) -> list[bytes]:
        calls.append(args)
        raise RuntimeError("boom")
    runner.repo.prepare = broken_prepare  # type: ignore[method-assign]
    view = await create_run(client, {"harness": "eval-repo", "eval": "arithmetic", "model": REALTIME_MODEL})
    done = await wait_run(client, view["id"], timeout=30)
    assert done["status"] == "failed" and done["error"]["code"] == "internal"
    assert "internal error after 3 attempts: RuntimeError: boom" in done["error"]["message"]
    assert len(calls) == 3


async def test_operators_see_every_run_on_the_monitor(gateway: Any) -> None:
    view = await create_run(gateway, {"harness": "eval-repo", "eval": "capitals-qa", "model": REALTIME_MODEL,
                                  "options": {"limit": 2}})
    other = await create_run(gateway, {"harness": "eval-repo", "eval": "arithmetic", "model": REALTIME_MODEL,
                                   "options": {"limit": 1}}, role="all")
    await wait_run(gateway, view["id"])
    await wait_run(gateway, other["id"], role="all")
    resp = await gateway.get("/monitor/evals", headers=auth("monitor"))
    assert resp.status == 200
    runs = {r["id"]: r for r in (await resp.json())["data"]}
    assert set(runs) == {view["id"], other["id"]}
    mine = runs[view["id"]]
    assert mine["status"] == "completed" and mine["eval"] == "capitals-qa" and mine["key_id"] == KEY_IDS["eval"]
    assert mine["progress"]["scored"] == 2 and "exact_match" in mine["metrics"]
