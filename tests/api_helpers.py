"""HTTP helpers shared by test modules: submit and poll batch jobs, create and poll eval runs, read the
job event stream. Test modules import these from here, never from each other."""

from __future__ import annotations

from typing import Any

from gateway.http.appkeys import BATCH_QUEUE
from tests.conftest import auth
from tests.polling import eventually

EVAL_FINAL = ("completed", "failed", "cancelled")


async def submit(client: Any, body: dict[str, Any], path: str = "/v1/batch/completions",
                 role: str = "batch") -> dict[str, Any]:
    """POST a batch job; asserts the 202 and returns the job view."""
    resp = await client.post(path, json=body, headers=auth(role))
    assert resp.status == 202, await resp.text()
    result: dict[str, Any] = await resp.json()
    return result


async def job_status(client: Any, job_id: str, role: str = "batch") -> dict[str, Any]:
    """GET /v1/jobs/<id>; asserts the 200."""
    resp = await client.get(f"/v1/jobs/{job_id}", headers=auth(role))
    assert resp.status == 200, await resp.text()
    result: dict[str, Any] = await resp.json()
    return result


async def wait_status(client: Any, job_id: str, statuses: set[str], timeout: float = 20.0) -> dict[str, Any]:
    """Poll the job until its status is one of `statuses`; returns its view then."""
    async def check() -> dict[str, Any] | None:
        job = await job_status(client, job_id)
        return job if job["status"] in statuses else None

    job: dict[str, Any] = await eventually(check, timeout=timeout)
    return job


async def events(client: Any) -> list[dict[str, str]]:
    """Every entry of the job event stream, oldest first (through the job queue, the stream's owner)."""
    return [e.fields for e in reversed(await client.app[BATCH_QUEUE].recent_events(100_000))]


async def create_run(client: Any, body: dict[str, Any], role: str = "eval") -> dict[str, Any]:
    """POST /eval/runs; asserts the 202 and the Location header, returns the run view."""
    resp = await client.post("/eval/runs", json=body, headers=auth(role))
    assert resp.status == 202, await resp.text()
    view: dict[str, Any] = await resp.json()
    assert resp.headers["Location"] == f"/eval/runs/{view['id']}"
    return view


async def wait_run(client: Any, run_id: str, timeout: float = 60.0, role: str = "eval") -> dict[str, Any]:
    """Poll GET /eval/runs/<id> until the run is final."""
    async def done() -> dict[str, Any] | None:
        resp = await client.get(f"/eval/runs/{run_id}", headers=auth(role))
        assert resp.status == 200, await resp.text()
        view: dict[str, Any] = await resp.json()
        return view if view["status"] in EVAL_FINAL else None
    run: dict[str, Any] = await eventually(done, timeout=timeout, interval=0.1)
    return run
