"""Dashboard sessions (login, cookie flags, CSRF, the middleware's cookie path) and the monitor JSON endpoints."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp import web

from gateway.actors.traffic import TrafficSampler, histogram_quantile
from gateway.bootstrap import create_app
from gateway.http import appkeys
from gateway.http.appkeys import KEYRING, SETTINGS
from gateway.http.monitor import eval_run_view
from gateway.http.session import COOKIE_NAME, SECRET, make_cookie_value, verify_cookie_value
from tests.conftest import KEY_IDS, TOKENS, auth, eventually, wait_ready

HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
CHAT = {"model": "test-org/realtime-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def make_client(aiohttp_client: Any, make_settings: Any, **overrides: Any) -> Any:
    settings = make_settings(batch_dispatcher_enabled=False, **overrides)
    client = await aiohttp_client(create_app(settings))
    await wait_ready(client.app)
    return client


async def login(client: Any, role: str = "monitor") -> str:
    """Log in through the form; returns the page's CSRF token (the cookie stays in the client's jar)."""
    resp = await client.post("/dashboard/login", data={"token": TOKENS[role], "next": "/dashboard"},
                             allow_redirects=False)
    assert resp.status == 303, await resp.text()
    assert resp.headers["Location"] == "/dashboard"
    page = await client.get("/dashboard", headers=HTML)
    assert page.status == 200
    match = re.search(r'<meta name="csrf-token" content="([^"]+)">', await page.text())
    assert match, "the page carries the session's CSRF token"
    return match.group(1)


def set_cookie_header(resp: Any) -> str:
    values = resp.headers.getall("Set-Cookie", [])
    assert len(values) == 1, values
    return values[0]


async def submit_job(client: Any, role: str = "batch", model: str = "test-org/batch-model", priority: int = 0) -> str:
    resp = await client.post("/v1/batch/chat/completions", headers=auth(role),
                             json={**CHAT, "model": model, "priority": priority})
    assert resp.status == 202, await resp.text()
    return str((await resp.json())["id"])


# --- login, cookie, session
async def test_pages_redirect_browsers_to_login_and_answer_scripts_with_401(aiohttp_client: Any,
                                                                          make_settings: Any) -> None:
    client = await make_client(aiohttp_client, make_settings)
    resp = await client.get("/dashboard/jobs?status=queued", headers=HTML, allow_redirects=False)
    assert resp.status == 302
    location = urlsplit(resp.headers["Location"])
    assert location.path == "/dashboard/login"
    assert parse_qs(location.query) == {"next": ["/dashboard/jobs?status=queued"]}
    resp = await client.get("/dashboard", allow_redirects=False)  # a script: no text/html in Accept
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "missing_api_key"
    # The monitor JSON never redirects, even for a browser.
    resp = await client.get("/monitor/overview", headers=HTML, allow_redirects=False)
    assert resp.status == 401
    form = await client.get("/dashboard/login?next=/dashboard/keys")
    assert form.status == 200
    text = await form.text()
    assert 'name="token"' in text and 'value="/dashboard/keys"' in text


async def test_login_sets_a_signed_httponly_strict_cookie_without_the_token(aiohttp_client: Any,
                                                                            make_settings: Any) -> None:
    client = await make_client(aiohttp_client, make_settings)
    resp = await client.post("/dashboard/login", data={"token": TOKENS["monitor"], "next": "/dashboard/keys"},
                             allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/dashboard/keys"
    header = set_cookie_header(resp)
    attrs = [a.strip().lower() for a in header.split(";")]
    assert attrs[0].startswith(COOKIE_NAME + "=")
    assert "httponly" in attrs and "samesite=strict" in attrs and "path=/" in attrs
    assert "secure" not in attrs  # plain HTTP: a Secure cookie would never come back
    assert TOKENS["monitor"] not in header
    value = header.split(";")[0].split("=", 1)[1].strip('"')
    session = verify_cookie_value(client.app[SECRET], value)
    assert session is not None and session.key_id == KEY_IDS["monitor"]
    assert session.expires > time.time() + 3600
    page = await client.get("/dashboard/keys", headers=HTML)
    assert page.status == 200
    assert "Key usage" in await page.text()
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert (await client.get("/monitor/overview")).status == 200  # the cookie alone authenticates


async def test_secure_flag_when_the_request_came_over_https(aiohttp_client: Any, make_settings: Any) -> None:
    app = create_app(make_settings(batch_dispatcher_enabled=False))

    @web.middleware
    async def as_https(request: web.Request, handler: Any) -> web.StreamResponse:
        # What a TLS-terminating proxy plus aiohttp-remotes would do: mark the request as HTTPS.
        return await handler(request.clone(scheme="https"))

    app.middlewares.insert(0, as_https)
    client = await aiohttp_client(app)
    resp = await client.post("/dashboard/login", data={"token": TOKENS["monitor"]}, allow_redirects=False)
    assert resp.status == 303
    assert "secure" in [a.strip().lower() for a in set_cookie_header(resp).split(";")]


async def test_wrong_or_unscoped_token_gets_the_form_again_and_no_cookie(aiohttp_client: Any,
                                                                         make_settings: Any) -> None:
    client = await make_client(aiohttp_client, make_settings)
    for token in ("not-a-token-at-all", TOKENS["realtime"]):
        resp = await client.post("/dashboard/login", data={"token": token}, allow_redirects=False)
        assert resp.status == 401
        text = await resp.text()
        assert "not a key with the monitor scope" in text and 'name="token"' in text
        assert token not in text
        assert "Set-Cookie" not in resp.headers
    resp = await client.post("/dashboard/login", data={"token": ""}, allow_redirects=False)
    assert resp.status == 400 and "Set-Cookie" not in resp.headers
    assert (await client.get("/monitor/overview")).status == 401
    # No open redirect through `next`.
    resp = await client.post("/dashboard/login", data={"token": TOKENS["monitor"], "next": "//evil.example/x"},
                             allow_redirects=False)
    assert resp.headers["Location"] == "/dashboard"


async def test_forged_expired_and_revoked_sessions_are_refused(aiohttp_client: Any, make_settings: Any,
                                                              keys_file: Path) -> None:
    client = await make_client(aiohttp_client, make_settings)
    secret = client.app[SECRET]
    good, _ = make_cookie_value(secret, KEY_IDS["monitor"], 3600)
    payload, signature = good.split(".")
    other_payload = make_cookie_value(secret, KEY_IDS["all"], 3600)[0].split(".")[0]
    expired, _ = make_cookie_value(secret, KEY_IDS["monitor"], 60, now=time.time() - 3600)
    foreign, _ = make_cookie_value(b"x" * 32, KEY_IDS["monitor"], 3600)
    unscoped, _ = make_cookie_value(secret, KEY_IDS["realtime"], 3600)
    for value in (f"{payload}.{signature[:-2]}AA", f"{other_payload}.{signature}", expired, foreign, unscoped,
                  "garbage", ""):
        resp = await client.get("/monitor/runtime", cookies={COOKIE_NAME: value})
        assert resp.status == 401, value
    resp = await client.get("/monitor/runtime", cookies={COOKIE_NAME: good})
    assert resp.status == 200
    # Revoking the key (reload without it) ends its sessions at once.
    keys = json.loads(keys_file.read_text())
    keys["keys"] = [k for k in keys["keys"] if k["id"] != KEY_IDS["monitor"]]
    keys_file.write_text(json.dumps(keys))
    assert client.app[KEYRING].reload()
    resp = await client.get("/monitor/runtime", cookies={COOKIE_NAME: good})
    assert resp.status == 401


async def test_session_cookie_only_counts_on_monitor_routes(aiohttp_client: Any, make_settings: Any) -> None:
    client = await make_client(aiohttp_client, make_settings)
    await login(client, "all")  # the key has every scope, the cookie still only opens monitor routes
    assert (await client.get("/monitor/runtime")).status == 200
    resp = await client.get("/v1/models")
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "missing_api_key"
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 401
    # A bearer header wins over the cookie: a wrong one is refused even with a valid session.
    resp = await client.get("/monitor/runtime", headers={"Authorization": "Bearer wrong-token-123"})
    assert resp.status == 401


async def test_logout_needs_the_csrf_token_and_clears_the_cookie(aiohttp_client: Any, make_settings: Any) -> None:
    client = await make_client(aiohttp_client, make_settings)
    csrf = await login(client)
    for data in ({}, {"csrf_token": "wrong"}, {"csrf_token": csrf[:-1]}):
        resp = await client.post("/dashboard/logout", data=data, allow_redirects=False)
        assert resp.status == 403, data
        assert (await resp.json())["error"]["code"] == "csrf_failed"
    assert (await client.get("/monitor/runtime")).status == 200  # still logged in
    resp = await client.post("/dashboard/logout", data={"csrf_token": csrf}, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/dashboard/login?logged_out=1"
    cleared = set_cookie_header(resp).lower()
    assert cleared.startswith(COOKIE_NAME + '=""') or cleared.startswith(COOKIE_NAME + "=;")
    assert "max-age=0" in cleared
    assert (await client.get("/monitor/runtime")).status == 401


# --- jobs
async def test_operator_job_listing_filters_inspect_and_cancel(aiohttp_client: Any, make_settings: Any) -> None:
    client = await make_client(aiohttp_client, make_settings)
    mine = [await submit_job(client, "batch", "m-a"), await submit_job(client, "batch", "m-b", priority=5)]
    theirs = await submit_job(client, "batch2", "m-a", priority=5)
    monitor = auth("monitor")
    body = await (await client.get("/monitor/jobs", headers=monitor)).json()
    assert [j["id"] for j in body["data"]] == [theirs, mine[1], mine[0]]  # every key's, newest first
    assert {j["key_id"] for j in body["data"]} == {KEY_IDS["batch"], KEY_IDS["batch2"]}
    assert body["counts"] == {"queued": 3, "running": 0}
    by_model = await (await client.get("/monitor/jobs?model=m-a", headers=monitor)).json()
    assert [j["id"] for j in by_model["data"]] == [theirs, mine[0]]
    by_key = await (await client.get(f"/monitor/jobs?key_id={KEY_IDS['batch']}", headers=monitor)).json()
    assert [j["id"] for j in by_key["data"]] == [mine[1], mine[0]]
    page1 = await (await client.get("/monitor/jobs?limit=2", headers=monitor)).json()
    assert [j["id"] for j in page1["data"]] == [theirs, mine[1]] and page1["has_more"]
    page2 = await (await client.get(f"/monitor/jobs?limit=2&after={page1['next_cursor']}", headers=monitor)).json()
    assert [j["id"] for j in page2["data"]] == [mine[0]] and not page2["has_more"]
    for bad in ("status=done", "limit=0", "limit=x", "after=nope"):
        resp = await client.get(f"/monitor/jobs?{bad}", headers=monitor)
        assert resp.status == 400, bad

    one = await (await client.get(f"/monitor/jobs/{theirs}", headers=monitor)).json()
    assert one["key_id"] == KEY_IDS["batch2"] and one["status"] == "queued" and one["priority"] == 5
    assert [e["event"] for e in one["events"]] == ["enqueued"]
    assert (await client.get("/monitor/jobs/job_missing", headers=monitor)).status == 404

    # Bearer callers cancel without a CSRF token (browsers never send bearer headers by themselves).
    resp = await client.delete(f"/monitor/jobs/{theirs}", headers=monitor)
    assert resp.status == 200 and (await resp.json())["status"] == "cancelled"
    assert (await client.delete(f"/monitor/jobs/{theirs}", headers=monitor)).status == 409
    assert (await client.delete("/monitor/jobs/job_missing", headers=monitor)).status == 404
    owner_view = await (await client.get(f"/v1/jobs/{theirs}", headers=auth("batch2"))).json()
    assert owner_view["status"] == "cancelled"
    depth = await (await client.get("/monitor/overview", headers=monitor)).json()
    assert depth["queue"]["total"] == 2


async def test_cancel_with_the_session_cookie_needs_the_csrf_token(aiohttp_client: Any, make_settings: Any) -> None:
    client = await make_client(aiohttp_client, make_settings)
    first, second = await submit_job(client), await submit_job(client)
    csrf = await login(client)
    resp = await client.post(f"/dashboard/jobs/{first}/cancel", data={"next": "/dashboard/jobs"},
                             allow_redirects=False)
    assert resp.status == 403
    resp = await client.delete(f"/monitor/jobs/{first}", headers={"X-CSRF-Token": "nope"})
    assert resp.status == 403
    assert (await client.get(f"/monitor/jobs/{first}")).status == 200
    assert (await (await client.get(f"/monitor/jobs/{first}")).json())["status"] == "queued"

    resp = await client.post(f"/dashboard/jobs/{first}/cancel",
                             data={"csrf_token": csrf, "next": "/dashboard/jobs?status=queued"}, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/dashboard/jobs?status=queued"
    assert (await (await client.get(f"/monitor/jobs/{first}")).json())["status"] == "cancelled"
    resp = await client.delete(f"/monitor/jobs/{second}", headers={"X-CSRF-Token": csrf})
    assert resp.status == 200 and (await resp.json())["status"] == "cancelled"
    # Cancelling a finished job from the page just goes back to the list.
    resp = await client.post(f"/dashboard/jobs/{first}/cancel", data={"csrf_token": csrf}, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/dashboard/jobs"


async def test_dashboard_pages_render(aiohttp_client: Any, make_settings: Any) -> None:
    client = await make_client(aiohttp_client, make_settings)
    job_id = await submit_job(client, model="page-model")
    await login(client)
    for path, needle in (("/dashboard", "Realtime traffic"), ("/dashboard/jobs?status=queued", job_id),
                         (f"/dashboard/jobs/{job_id}", job_id), ("/dashboard/evals", "No eval runs."),
                         ("/dashboard/keys", "Key usage"), ("/dashboard/runtime", "State history")):
        resp = await client.get(path, headers=HTML)
        assert resp.status == 200, path
        text = await resp.text()
        assert needle in text, path
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert "https://" not in text and "http://" not in text.replace('"http://www.w3.org', "")  # nothing external
    css = await client.get("/dashboard/static/dashboard.css")
    assert css.status == 200 and css.content_type == "text/css"
    js = await client.get("/dashboard/static/dashboard.js")
    assert js.status == 200 and js.content_type == "text/javascript"
    assert (await client.get("/dashboard/static/../settings.py")).status == 404
    assert (await client.get("/dashboard/static/nothing.js")).status == 404
    assert (await client.get("/dashboard/jobs/job_missing", headers=HTML)).status == 404


async def test_initial_data_cannot_break_out_of_its_script_element(aiohttp_client: Any, make_settings: Any) -> None:
    client = await make_client(aiohttp_client, make_settings)
    evil = "</script><script>alert(1)</script>"
    await submit_job(client, model=evil)
    await login(client)
    text = await (await client.get("/dashboard/jobs", headers=HTML)).text()
    assert evil not in text and "\\u003c/script\\u003e" in text


# --- overview, keys, evals, runtime
async def test_overview_counts_realtime_traffic_and_queue_depth_by_priority(aiohttp_client: Any,
                                                                             make_settings: Any) -> None:
    client = await make_client(aiohttp_client, make_settings)
    monitor = auth("monitor")
    before = (await (await client.get("/monitor/overview", headers=monitor)).json())["realtime"]["requests_total"]
    for _ in range(3):
        assert (await client.post("/v1/chat/completions", headers=auth("realtime"), json=CHAT)).status == 200
    for priority in (0, 5, 5):
        await submit_job(client, model="q-model", priority=priority)
    await submit_job(client, model="q-other", priority=1)
    body = await (await client.get("/monitor/overview", headers=monitor)).json()
    assert body["realtime"]["requests_total"] == before + 3
    assert body["runtime"]["state"] == "ready" and body["runtime"]["model"] == "test-org/realtime-model"
    assert body["redis"] == "up"
    queue = body["queue"]
    assert queue["total"] == 4 and queue["complete"]
    assert queue["by_priority"] == {"5": 2, "1": 1, "0": 1}
    assert {r["model"]: (r["queued"], r["by_priority"]) for r in queue["by_model"]} == {
        "q-model": (3, {"5": 2, "0": 1}), "q-other": (1, {"1": 1})}
    assert body["batch"] == {"running": 0, "in_flight_here": 0, "slots": 8, "dispatcher_enabled": False,
                             "group": None}
    assert body["recent_errors"] == []


def test_traffic_sampler_rates_and_quantiles() -> None:
    sampler = TrafficSampler(routes={"/x"})
    assert histogram_quantile(0.95, (), ((0.1, 0.0), (1.0, 0.0), (float("inf"), 0.0))) is None
    # 100 observations in (0.1, 1]: p95 interpolates to 0.1 + 0.9 * 0.95.
    assert histogram_quantile(0.95, ((0.1, 5.0), (1.0, 5.0), (float("inf"), 5.0)),
                     ((0.1, 5.0), (1.0, 105.0), (float("inf"), 105.0))) == pytest.approx(0.955)
    stats = sampler.stats()
    assert stats["requests_per_second"] is None and sampler.series() == []


async def test_keys_usage_today_and_30_days(aiohttp_client: Any, make_settings: Any) -> None:
    client = await make_client(aiohttp_client, make_settings)
    for _ in range(2):
        assert (await client.post("/v1/chat/completions", headers=auth("realtime"), json=CHAT)).status == 200

    async def usage() -> Any:
        body = await (await client.get("/monitor/keys", headers=auth("monitor"))).json()
        rows = {r["key_id"]: r for r in body["data"]}
        row = rows.get(KEY_IDS["realtime"])
        return (body, row) if row and row["today"]["requests"] == 2 else None

    body, row = await eventually(usage)
    assert len(body["days"]) == 30 and body["days"][-1] == body["today"]
    assert row["last_days"]["requests"] == 2 and row["today"]["total_tokens"] > 0
    assert [d["day"] for d in row["daily"]] == body["days"]
    assert row["daily"][-1]["requests"] == 2 and sum(d["requests"] for d in row["daily"]) == 2
    assert row["last_used_at"] is not None


async def test_evals_lists_the_eval_runners_runs_with_progress_and_metrics(gateway: Any) -> None:
    monitor = auth("monitor")
    assert await (await gateway.get("/monitor/evals", headers=monitor)).json() == {"object": "list", "data": []}
    resp = await gateway.post("/eval/runs", headers=auth("eval"),
                              json={"harness": "eval-repo", "eval": "arithmetic", "model": "test-org/realtime-model",
                                    "options": {"limit": 3}})
    assert resp.status == 202, await resp.text()
    run_id = (await resp.json())["id"]

    async def completed() -> Any:
        runs = (await (await gateway.get("/monitor/evals", headers=monitor)).json())["data"]
        return runs[0] if runs and runs[0]["status"] == "completed" else None

    run = await eventually(completed, timeout=60, interval=0.1)
    assert run["id"] == run_id and run["eval"] == "arithmetic" and run["harness"] == "eval-repo"
    assert run["progress"] == {"total": 3, "prepared": 3, "sent": 3, "answered": 3, "scored": 3}
    assert run["metrics"] and all(isinstance(v, (int, float)) for v in run["metrics"].values())
    await login(gateway)
    text = await (await gateway.get("/dashboard/evals", headers=HTML)).text()
    assert run_id in text and '<progress max="3" value="3">' in text


def test_eval_run_view_reads_the_euroeval_shape() -> None:
    view = eval_run_view({"id": "x", "status": "failed", "error": {"message": "boom", "log_tail": []},
                          "harness": "euroeval", "dataset": ["scala-da", "angry-tweets"],
                          "progress": {"prepared": None, "sent": None, "answered": None, "scored": 2},
                          "metrics": {"mcc": 0.5}})
    assert view["error"] == "boom" and view["eval"] == "scala-da, angry-tweets"
    assert view["metrics"] == {"mcc": 0.5} and view["progress"] == {"total": 2, "prepared": 0, "sent": 0,
                                                                      "answered": 0, "scored": 2}


async def test_runtime_history_and_crash_logs(aiohttp_client: Any, make_settings: Any, tmp_path: Path) -> None:
    client = await make_client(aiohttp_client, make_settings)
    monitor = auth("monitor")
    failure_dir = client.app[SETTINGS].failure_dir
    failure_dir.mkdir(parents=True, exist_ok=True)
    (failure_dir / "20261127T120000Z-m.log").write_text("reason: exit\nCUDA out of memory\n")
    (failure_dir / "notes.txt").write_text("not a crash log")
    secret = tmp_path / "secret.log"
    secret.write_text("outside the failure dir")
    os.symlink(secret, failure_dir / "link.log")
    body = await (await client.get("/monitor/runtime", headers=monitor)).json()
    for field in ("state", "model", "since", "uptime_seconds", "last_error", "restarts", "ready_eta",
                  "last_crash_log", "realtime_model"):
        assert field in body
    assert body["state"] == "ready"
    assert [h["state"] for h in body["history"]][:2] == ["ready", "starting"]  # newest first
    assert [c["name"] for c in body["crash_logs"]] == ["20261127T120000Z-m.log"]
    log = await (await client.get("/monitor/runtime/crash_logs/20261127T120000Z-m.log", headers=monitor)).json()
    assert "CUDA out of memory" in log["content"] and not log["truncated"]
    for name in ("link.log", "..%2Fsecret.log", "notes.txt", ".hidden.log", "missing.log"):
        resp = await client.get(f"/monitor/runtime/crash_logs/{name}", headers=monitor)
        assert resp.status == 404, name
    resp = await client.get("/monitor/runtime/crash_logs/..%2F..%2Fsecret.log", headers=monitor)
    assert resp.status == 404
    await login(client)
    page = await client.get("/dashboard/runtime/crash_logs/20261127T120000Z-m.log", headers=HTML)
    assert page.status == 200 and "CUDA out of memory" in await page.text()


async def test_a_failing_runtime_shows_in_history_crash_logs_and_recent_errors(aiohttp_client: Any, make_settings: Any,
                                                                                tmp_path: Path) -> None:
    # A runtime that exits at once: the supervisor records FAILED, writes a crash log and retries with backoff.
    script = tmp_path / "crash.py"
    script.write_text("import sys\nprint('CUDA error: out of memory (simulated)', flush=True)\nsys.exit(3)\n")
    settings = make_settings(batch_dispatcher_enabled=False, runtime_backend="process",
                             runtime_command=f"{sys.executable} {script}",
                             runtime_pid_file=str(tmp_path / "runtime.pid"), runtime_start_timeout=30,
                             runtime_stop_timeout=2)
    client = await aiohttp_client(create_app(settings))
    monitor = auth("monitor")

    async def failed() -> Any:
        body = await (await client.get("/monitor/runtime", headers=monitor)).json()
        return body if body["crash_logs"] and any(h["state"] == "failed" for h in body["history"]) else None

    body = await eventually(failed, timeout=30)
    failure = next(h for h in body["history"] if h["state"] == "failed")
    assert failure["model"] == "test-org/realtime-model" and "exit" in failure["error"]
    name = body["crash_logs"][0]["name"]
    log = await (await client.get(f"/monitor/runtime/crash_logs/{name}", headers=monitor)).json()
    assert "CUDA error: out of memory (simulated)" in log["content"]
    overview = await (await client.get("/monitor/overview", headers=monitor)).json()
    runtime_errors = [e for e in overview["recent_errors"] if e["source"] == "runtime"]
    assert runtime_errors and runtime_errors[0]["message"] == failure["error"]


async def test_failed_batch_jobs_are_recent_errors(aiohttp_client: Any, make_settings: Any) -> None:
    client = await make_client(aiohttp_client, make_settings)
    queue = client.app[appkeys.BATCH_QUEUE]
    await queue.event({"id": "job_x1", "key_id": "k-batch", "model": "m-x", "status": "failed",
                       "error": "the runtime answered 400: prompt too long"}, "failed")
    await queue.event({"id": "job_x2", "key_id": "k-batch", "model": "m-x", "status": "completed"}, "completed")
    body = await (await client.get("/monitor/overview", headers=auth("monitor"))).json()
    assert [(e["source"], e["job_id"], e["message"]) for e in body["recent_errors"]] == [
        ("batch", "job_x1", "the runtime answered 400: prompt too long")]


async def test_redis_down_degrades_the_overview_and_answers_503_elsewhere(aiohttp_client: Any,
                                                                          make_settings: Any) -> None:
    from tests.conftest import free_port

    client = await make_client(aiohttp_client, make_settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    monitor = auth("monitor")
    body = await (await client.get("/monitor/overview", headers=monitor)).json()
    assert body["redis"] == "down" and body["queue"] is None and body["runtime"]["state"] == "ready"
    for path in ("/monitor/jobs", "/monitor/keys", "/monitor/jobs/job_x"):
        resp = await client.get(path, headers=monitor)
        assert resp.status == 503, path
        assert (await resp.json())["error"]["code"] == "redis_unavailable"
    assert (await client.get("/dashboard/keys", headers=monitor)).status == 503
    assert (await client.get("/dashboard", headers=monitor)).status == 200


async def test_every_monitor_route_that_changes_something_needs_csrf_with_the_cookie(aiohttp_client: Any,
                                                                                     make_settings: Any) -> None:
    # Enforced once, in the auth middleware: also covers monitor POSTs of other route families.
    from gateway.keys import Scope

    client = await make_client(aiohttp_client, make_settings)
    csrf = await login(client)
    unsafe = [(r.method, re.sub(r"\{[^}]+\}", "job_missing", r.resource.canonical))
              for r in client.app.router.routes()
              if r.method in ("POST", "PUT", "PATCH", "DELETE") and r.resource is not None
              and getattr(r.handler, "required_scope", None) is Scope.MONITOR]
    assert ("POST", "/dashboard/logout") in unsafe and ("DELETE", "/monitor/jobs/job_missing") in unsafe
    for method, path in unsafe:
        for headers in ({}, {"X-CSRF-Token": "wrong"}, {"X-CSRF-Token": "wrong-ünïcode"}):
            resp = await client.request(method, path, headers=headers, data={"csrf_token": "also-wrong"},
                                        allow_redirects=False)
            assert resp.status == 403, (method, path, headers)
            assert (await resp.json())["error"]["code"] == "csrf_failed"
    resp = await client.delete("/monitor/jobs/job_missing", headers={"X-CSRF-Token": csrf})
    assert resp.status == 404
    assert (await client.get("/monitor/runtime")).status == 200  # the session survived all that
