"""Hardening (issue 14): what a hostile client tried, each as a regression test kept small and bounded.

Limits before work (no body read or 100 Continue before authorisation), login form hygiene, failed-auth
throttling, and what the server says about itself.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from tests.conftest import REALTIME_MODEL, TOKENS

BIG = 4_194_000


async def _exchange(client: Any, head: bytes, body: bytes = b"", *, read_timeout: float = 5.0) -> bytes:
    """Send a raw request head (and optional body) on a fresh connection; return what comes back until the
    server closes the connection or `read_timeout` passes."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(head + body)
        await writer.drain()
        chunks: list[bytes] = []
        try:
            async with asyncio.timeout(read_timeout):
                while piece := await reader.read(65536):
                    chunks.append(piece)
        except TimeoutError:
            pass
        return b"".join(chunks)
    finally:
        writer.close()


def _head(method: str, path: str, *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: x", *headers, "", ""]
    return "\r\n".join(lines).encode()


def _statuses(raw: bytes) -> list[int]:
    return [int(m) for m in re.findall(rb"^HTTP/1\.1 (\d{3})", raw, flags=re.M)]


# --- 1: nothing unauthenticated is read, and no 100 Continue before authorisation
@pytest.mark.parametrize("method,path", [("POST", "/nope"), ("DELETE", "/health"), ("PUT", "/v1/completions")])
async def test_unmatched_routes_answer_without_reading_the_announced_body(gateway: Any, method: str,
                                                                          path: str) -> None:
    raw = await _exchange(gateway, _head(method, path, f"Content-Length: {BIG}", "Content-Type: application/json",
                                         "Expect: 100-continue"))
    # The answer comes without the client sending a byte of the body, with no 100 Continue, and the
    # connection is closed (the server read to the end of the response: no keep-alive wait).
    assert _statuses(raw) in ([404], [405]), raw[:300]
    assert b"100 Continue" not in raw
    assert b"connection: close" in raw.lower()


@pytest.mark.parametrize("path", ["/health", "/ready", "/openapi.json", "/dashboard/login"])
async def test_public_routes_take_no_body(gateway: Any, path: str) -> None:
    method = "POST" if path == "/dashboard/login" else "GET"
    raw = await _exchange(gateway, _head(method, path, f"Content-Length: {BIG}",
                                         "Content-Type: application/x-www-form-urlencoded", "Expect: 100-continue"))
    assert _statuses(raw) == [413], raw[:300]
    assert b"100 Continue" not in raw


async def test_login_form_body_is_capped_even_when_chunked(gateway: Any) -> None:
    head = _head("POST", "/dashboard/login", "Transfer-Encoding: chunked",
                 "Content-Type: application/x-www-form-urlencoded")
    chunk = b"token=" + b"a" * 8000
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunk), chunk)
    raw = await _exchange(gateway, head, body)
    assert _statuses(raw) == [413], raw[:300]
    # A small form still works (wrong token: the form again with 401).
    resp = await gateway.post("/dashboard/login", data={"token": "x" * 30})
    assert resp.status == 401


async def test_no_100_continue_before_authorisation(gateway: Any) -> None:
    raw = await _exchange(gateway, _head("POST", "/v1/completions", f"Content-Length: {BIG}",
                                         "Content-Type: application/json", "Expect: 100-continue",
                                         "Authorization: Bearer not-a-key-at-all-000000"))
    assert _statuses(raw) == [401]
    assert b"100 Continue" not in raw and b"connection: close" in raw.lower()


async def test_100_continue_after_authorisation_then_the_body(gateway: Any) -> None:
    body = b'{"model": "%s", "prompt": "hi", "max_tokens": 2}' % REALTIME_MODEL.encode()
    reader, writer = await asyncio.open_connection(gateway.server.host, gateway.server.port)
    try:
        writer.write(_head("POST", "/v1/completions", f"Content-Length: {len(body)}",
                           "Content-Type: application/json", "Expect: 100-continue",
                           f"Authorization: Bearer {TOKENS['realtime']}", "Connection: close"))
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        writer.write(body)
        await writer.drain()
        rest = await asyncio.wait_for(reader.read(), 10)
        assert _statuses(rest) == [200], rest[:300]
    finally:
        writer.close()


# --- 9: control characters in the login form's `next`
@pytest.mark.parametrize("target", ["/dashboard\r\nSet-Cookie: x=1", "/dashboard\x00", "/dashboard\x7f",
                                    "/dashboard/\u00e9", "/dashboard/ x"])
async def test_login_next_with_control_characters_redirects_cleanly(gateway: Any, target: str) -> None:
    resp = await gateway.post("/dashboard/login", data={"token": TOKENS["monitor"], "next": target},
                              allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"] == "/dashboard"
    resp = await gateway.get("/dashboard/login", params={"next": target})
    assert resp.status == 200


# --- 13: failed authentication is throttled per client address
async def test_failed_authentication_is_throttled(aiohttp_client: Any, make_settings: Any) -> None:
    from gateway.bootstrap import create_app

    client = await aiohttp_client(create_app(make_settings(auth_fail_max=5, auth_fail_window_seconds=3600)))
    statuses = []
    for n in range(8):
        resp = await client.get("/v1/models", headers={"Authorization": f"Bearer guess-{n:020d}"})
        statuses.append(resp.status)
    assert statuses == [401] * 5 + [429] * 3
    assert int(resp.headers["Retry-After"]) > 0
    body = await resp.json()
    assert body["error"]["code"] == "auth_throttled" and "AUTH_FAIL_MAX" in body["error"]["message"]
    # Even the right token waits: the address is refused before any token is looked up.
    resp = await client.get("/v1/models", headers={"Authorization": f"Bearer {TOKENS['realtime']}"})
    assert resp.status == 429
    # The login form counts too.
    resp = await client.post("/dashboard/login", data={"token": "y" * 30})
    assert resp.status == 429


async def test_x_forwarded_for_is_honoured_only_from_trusted_proxies(aiohttp_client: Any,
                                                                     make_settings: Any) -> None:
    from gateway.bootstrap import create_app

    untrusted = await aiohttp_client(create_app(make_settings(auth_fail_max=2)))
    for n in range(3):
        resp = await untrusted.get("/v1/models", headers={"Authorization": "Bearer nope-nope-nope-nope-0",
                                                          "X-Forwarded-For": f"10.0.0.{n}"})
    assert resp.status == 429  # the forged header did not spread the failures over three addresses

    trusted = await aiohttp_client(create_app(make_settings(auth_fail_max=2, trusted_proxies="127.0.0.1,::1")))
    for n in range(3):
        resp = await trusted.get("/v1/models", headers={"Authorization": "Bearer nope-nope-nope-nope-0",
                                                        "X-Forwarded-For": f"10.0.0.{n}"})
        assert resp.status == 401
    resp = await trusted.get("/v1/models", headers={"Authorization": "Bearer nope-nope-nope-nope-0",
                                                    "X-Forwarded-For": "10.0.0.1"})
    resp = await trusted.get("/v1/models", headers={"Authorization": "Bearer nope-nope-nope-nope-0",
                                                    "X-Forwarded-For": "10.0.0.1"})
    assert resp.status == 429


def test_the_throttle_table_is_bounded() -> None:
    from gateway.http.throttle import AuthThrottle

    throttle = AuthThrottle(max_failures=1, window_seconds=60, table_max=100)
    for n in range(10_000):
        throttle.failed(f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}", now=0)
    assert len(throttle) == 100
    assert throttle.retry_after("10.0.39.15", now=1) == 59  # the newest are kept
    assert throttle.retry_after("10.0.0.0", now=1) == 0
    assert throttle.retry_after("10.0.39.15", now=61) == 0  # a window ends


async def test_server_header_names_no_version(gateway: Any) -> None:
    for resp in (await gateway.get("/health"), await gateway.get("/nope")):
        assert resp.headers["Server"] == "llm-gateway"


# --- 10: by-id routes check the id's shape: another kind of key under a crafted id is a 404, not a 503
async def test_ids_naming_other_redis_keys_are_404_not_503(gateway: Any, redis_prefix: str) -> None:
    import redis.asyncio as aredis

    from gateway.redis_keys import RedisKeys
    from tests.conftest import REDIS_URL, auth

    keys = RedisKeys(redis_prefix)
    run_id, job_id, batch_id = "evalrun_" + "a" * 22, "job_" + "b" * 24, "batch_" + "c" * 24
    r = aredis.Redis.from_url(REDIS_URL)
    try:
        # Strings where a hash would be read: what `<id>:lease` and the like name.
        for name in (keys.eval_run_lease(run_id), keys.job(job_id) + ":lease", keys.openai_batch(batch_id) + ":x"):
            await r.set(name, "x")
        routes = [("GET", f"/eval/runs/{run_id}:lease", "eval"), ("POST", f"/eval/runs/{run_id}:lease/cancel", "eval"),
                  ("GET", f"/v1/jobs/{job_id}:lease", "batch"), ("DELETE", f"/v1/jobs/{job_id}:lease", "batch"),
                  ("GET", f"/monitor/jobs/{job_id}:lease", "monitor"),
                  ("DELETE", f"/monitor/jobs/{job_id}:lease", "monitor"),
                  ("GET", f"/v1/batches/{batch_id}:x", "batch"), ("POST", f"/v1/batches/{batch_id}:x/cancel", "batch")]
        for method, path, role in routes:
            resp = await gateway.request(method, path, headers=auth(role))
            body = await resp.json()
            assert resp.status == 404, (method, path, resp.status, body)
            assert body["error"]["code"] != "redis_unavailable"
    finally:
        await r.aclose()


# --- 5: a model allowlist for batch work, and bounded model names
async def test_batch_models_default_to_the_realtime_model_only(aiohttp_client: Any, make_settings: Any) -> None:
    from gateway.bootstrap import create_app
    from tests.conftest import auth

    client = await aiohttp_client(create_app(make_settings(batch_models="", model_aliases="short")))
    for model in ("/etc", "../../etc", "some-org/other-model", "a" * 300_000):
        for path in ("/v1/batch/completions", "/eval/runs"):
            body = ({"model": model, "prompt": "hi", "max_tokens": 2} if path.startswith("/v1")
                    else {"harness": "eval-repo", "eval": "arithmetic", "model": model})
            resp = await client.post(path, json=body, headers=auth("all"))
            text = await resp.text()
            assert resp.status == 400, (path, model[:20], text[:300])
            assert "BATCH_MODELS" in text or "not a model name" in text
            assert len(text) < 2000, "the model name is not echoed in full"
    # An operator's swap makes the runtime load the model too: the same allowlist.
    resp = await client.post("/monitor/runtime/swap", json={"model": "/etc"}, headers=auth("monitor"))
    assert resp.status == 400 and "BATCH_MODELS" in await resp.text()
    for model in (REALTIME_MODEL, "short"):
        resp = await client.post("/v1/batch/completions", json={"model": model, "prompt": "hi", "max_tokens": 2},
                                 headers=auth("batch"))
        assert resp.status == 202, await resp.text()
        assert (await resp.json())["model"] == REALTIME_MODEL
    # The realtime routes never echo a long model name either.
    resp = await client.post("/v1/completions", json={"model": "m" * 100_000, "prompt": "hi"}, headers=auth("realtime"))
    assert resp.status == 404 and len(await resp.read()) < 2000


async def test_batch_models_names_and_patterns(aiohttp_client: Any, make_settings: Any) -> None:
    from gateway.bootstrap import create_app
    from tests.conftest import auth

    client = await aiohttp_client(create_app(make_settings(batch_models="org/exact, google/gemma-3-*")))
    cases = {"org/exact": 202, "google/gemma-3-4b-it": 202, "google/gemma-2-9b": 400, "google/gemma-3-../../x": 400,
             "org/exact2": 400}
    for model, status in cases.items():
        resp = await client.post("/v1/batch/completions", json={"model": model, "prompt": "hi", "max_tokens": 2},
                                 headers=auth("batch"))
        assert resp.status == status, (model, await resp.text())
        if status == 400:
            assert (await resp.json())["error"]["code"] in ("model_not_allowed", "invalid_model")


def test_policy_unit() -> None:
    from gateway.errors import ApiError
    from gateway.policy import ModelPolicy, valid_model_name

    policy = ModelPolicy("rt/model", frozenset({"rt"}), ("/models/local", "org/*"), 4, 100)
    assert policy.batch_model("rt") == "rt/model"
    assert policy.batch_model("/models/local") == "/models/local"  # an exact entry may be a path
    assert policy.batch_model("org/a") == "org/a"
    for bad in ("/models/other", "org/../../etc", "org/a b", "org/\x00", "org/" + "a" * 300):
        with pytest.raises(ApiError):
            policy.batch_model(bad)
    assert not valid_model_name("-x") and not valid_model_name(".hidden") and valid_model_name("a/b:rev@1")


# --- 8: bounds on n and max_tokens, realtime and batch
async def test_n_and_max_tokens_are_bounded(aiohttp_client: Any, make_settings: Any) -> None:
    from gateway.bootstrap import create_app
    from tests.conftest import auth, wait_ready

    client = await aiohttp_client(create_app(make_settings(request_max_n=4, request_max_tokens=64)))
    await wait_ready(client.app)
    for path, role in (("/v1/completions", "realtime"), ("/v1/batch/completions", "batch")):
        for extra, setting in (({"n": 100_000_000, "max_tokens": 1}, "REQUEST_MAX_N"),
                               ({"best_of": 5}, "REQUEST_MAX_N"),
                               ({"max_tokens": 65}, "REQUEST_MAX_TOKENS")):
            resp = await client.post(path, json={"model": REALTIME_MODEL, "prompt": "hi", **extra},
                                     headers=auth(role))
            body = await resp.json()
            assert resp.status == 400 and setting in body["error"]["message"], (path, extra, body)
        resp = await client.post(path, json={"model": REALTIME_MODEL, "prompt": "hi", "n": 4, "max_tokens": 64},
                                 headers=auth(role))
        assert resp.status in (200, 202), await resp.text()


# --- 3: dashboard sessions die with their token, and logout ends them server-side
async def _login(client: Any, token: str) -> str:
    from gateway.http.session import COOKIE_NAME

    resp = await client.post("/dashboard/login", data={"token": token}, allow_redirects=False)
    assert resp.status == 303, await resp.text()
    return str(resp.cookies[COOKIE_NAME].value)


async def test_sessions_end_when_the_key_is_recreated_or_its_token_rotated(aiohttp_client: Any, make_settings: Any,
                                                                             keys_file: Any) -> None:
    import json

    from gateway.bootstrap import create_app
    from gateway.http.appkeys import KEYRING
    from gateway.http.session import COOKIE_NAME

    client = await aiohttp_client(create_app(make_settings()))
    cookie = await _login(client, TOKENS["monitor"])
    assert (await client.get("/monitor/runtime", cookies={COOKIE_NAME: cookie})).status == 200
    original = json.loads(keys_file.read_text())
    for step in ("revoke", "recreate"):
        doc = json.loads(keys_file.read_text())
        if step == "revoke":
            doc["keys"] = [k for k in doc["keys"] if k["id"] != "k-monitor"]
        else:  # `keys create k-monitor`: the same id with a new token
            doc["keys"].append({"id": "k-monitor", "token": "a-brand-new-monitor-token-0001", "scopes": ["monitor"]})
        keys_file.write_text(json.dumps(doc))
        assert client.app[KEYRING].reload()
        resp = await client.get("/monitor/runtime", cookies={COOKIE_NAME: cookie})
        assert resp.status == 401, step
        resp = await client.delete("/monitor/jobs/job_" + "0" * 24, cookies={COOKIE_NAME: cookie},
                                   headers={"X-CSRF-Token": "whatever"})
        assert resp.status == 401, step
    # Back to the original token: a fresh login works, the new token's sessions too.
    keys_file.write_text(json.dumps(original))
    assert client.app[KEYRING].reload()
    assert (await client.get("/monitor/runtime", cookies={COOKIE_NAME: await _login(client, TOKENS["monitor"])}
                             )).status == 200


async def test_logout_revokes_the_session_server_side(gateway: Any) -> None:
    import re as _re

    from gateway.http.session import COOKIE_NAME

    cookie = await _login(gateway, TOKENS["monitor"])
    page = await gateway.get("/dashboard", cookies={COOKIE_NAME: cookie}, headers={"Accept": "text/html"})
    csrf = _re.search(r'name="csrf_token" value="([^"]+)"', await page.text())
    assert csrf is not None
    resp = await gateway.post("/dashboard/logout", data={"csrf_token": csrf.group(1)}, cookies={COOKIE_NAME: cookie},
                              allow_redirects=False)
    assert resp.status == 303
    # The browser may keep the cookie (or an attacker may have copied it): it no longer works.
    gateway.session.cookie_jar.clear()
    resp = await gateway.get("/monitor/runtime", cookies={COOKIE_NAME: cookie})
    assert resp.status == 401


# --- 12: per-key cap on held jobs; cancelled jobs give their request bodies back at once
async def test_a_key_holds_at_most_batch_key_max_jobs(aiohttp_client: Any, make_settings: Any,
                                                      redis_prefix: str) -> None:
    import redis.asyncio as aredis

    from gateway.bootstrap import create_app
    from gateway.redis_keys import RedisKeys
    from tests.conftest import REDIS_URL, auth

    client = await aiohttp_client(create_app(make_settings(batch_key_max_jobs=3, batch_dispatcher_enabled=False)))
    body = {"model": REALTIME_MODEL, "prompt": "x" * 1000, "max_tokens": 2}
    ids = []
    for _ in range(3):
        resp = await client.post("/v1/batch/completions", json=body, headers=auth("batch"))
        assert resp.status == 202
        ids.append((await resp.json())["id"])
    resp = await client.post("/v1/batch/completions", json=body, headers=auth("batch"))
    err = (await resp.json())["error"]
    assert resp.status == 429 and err["code"] == "too_many_jobs" and "BATCH_KEY_MAX_JOBS" in err["message"]
    # Another key is not affected.
    assert (await client.post("/v1/batch/completions", json=body, headers=auth("batch2"))).status == 202
    # Cancelling deletes the stored request body at once (not after BATCH_JOB_TTL_SECONDS).
    r = aredis.Redis.from_url(REDIS_URL)
    try:
        job_key = RedisKeys(redis_prefix).job(ids[0])
        assert await r.hexists(job_key, "request")
        assert (await client.delete(f"/v1/jobs/{ids[0]}", headers=auth("batch"))).status == 200
        assert not await r.hexists(job_key, "request")
        assert (await client.get(f"/v1/jobs/{ids[0]}", headers=auth("batch"))).status == 200
        # An expired job no longer counts: its id is pruned from the index when the cap is reached.
        await r.delete(RedisKeys(redis_prefix).job(ids[1]))
        assert (await client.post("/v1/batch/completions", json=body, headers=auth("batch"))).status == 202
    finally:
        await r.aclose()


# --- 13: aiohttp's own 400 answers name no request bytes
@pytest.mark.parametrize("bad_line", [b"Authorization: Bearer sekrit-value-0123456789\x00",
                                      b"Authorization: Bearer sekrit-value-0123456789\nX-Evil: 1",
                                      b"X-Sekrit-Value-0123456789 : no-colon-space"])
async def test_malformed_requests_get_a_400_that_echoes_nothing(make_settings: Any, bad_line: bytes) -> None:
    from aiohttp import web

    from gateway.bootstrap import create_app
    from gateway.http.server import GatewayRunner
    from tests.conftest import free_port

    # The runner `llm-gateway serve` uses (aiohttp's test server has aiohttp's own).
    runner = GatewayRunner(create_app(make_settings()), handler_cancellation=True, access_log=None)
    await runner.setup()
    port = free_port()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + bad_line + b"\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    finally:
        await runner.cleanup()
    assert re.match(rb"HTTP/1\.[01] 400 ", raw), raw[:300]
    assert b"ekrit" not in raw.lower(), raw
    assert b"server: llm-gateway" in raw.lower() and b"aiohttp" not in raw.lower()
    assert b'"code":"malformed_request"' in raw


def test_aiohttp_log_lines_are_json_like_the_rest(capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import logging

    from gateway.logging import configure_logging

    try:
        configure_logging("info", "json")
        logging.getLogger("aiohttp.server").error("Error handling request from %s", "10.1.2.3",
                                                  exc_info=ValueError("Invalid header b'Bearer sekrit-0123'"))
        logging.getLogger("aiohttp.web").warning("plain %s line", "aiohttp")
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
    finally:
        with capsys.disabled():  # back to the session's stderr, not this test's (closed after it)
            configure_logging("warning", "console")
    assert [(e["logger"], e["level"]) for e in lines] == [("aiohttp.server", "error"), ("aiohttp.web", "warning")]
    assert "sekrit" not in json.dumps(lines) and lines[1]["event"] == "plain aiohttp line"
