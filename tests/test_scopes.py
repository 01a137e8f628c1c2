"""The scope matrix: every route of the app against every key, no key and a wrong key."""

from __future__ import annotations

import re
from typing import Any

from gateway.bootstrap import create_app
from gateway.http.auth import accepted_scopes
from gateway.http.realtime import ENDPOINTS
from gateway.keys import Scope
from tests.conftest import KEYS, REALTIME_MODEL, TOKENS, wait_ready

_MISSING = object()


def all_routes(app: Any) -> list[tuple[str, str, Scope | None]]:
    """(method, concrete path, required scope) of every route; a route without a declared scope fails."""
    found = []
    for route in app.router.routes():
        if route.method == "*":
            continue
        scope = getattr(route.handler, "required_scope", _MISSING)
        canonical = route.resource.canonical if route.resource else "?"
        assert scope is not _MISSING, f"{route.method} {canonical} declares no scope (use requires_scope or public)"
        path = re.sub(r"\{[^}]+\}", "does-not-exist", canonical)
        found.append((route.method, path, scope))
    return found


async def test_scope_matrix_covers_every_route(aiohttp_client: Any, make_settings: Any) -> None:
    client = await aiohttp_client(create_app(make_settings()))
    await wait_ready(client.app)
    routes = all_routes(client.app)
    assert len(routes) >= 5
    realtime = {path for method, path, scope in routes if scope is Scope.REALTIME}
    assert {e.path for e in ENDPOINTS} | {"/v1/models", "/v1/models/does-not-exist"} <= realtime
    checked = 0
    accepted = {(route.method, re.sub(r"\{[^}]+\}", "does-not-exist", route.resource.canonical)):
                {x.value for x in accepted_scopes(route.handler)}
                for route in client.app.router.routes() if route.method != "*" and route.resource}
    for method, path, scope in routes:
        for role, (_key_id, _, scopes) in KEYS.items():
            headers = {"Authorization": f"Bearer {TOKENS[role]}", "Content-Type": "application/json",
                       "Tus-Resumable": "1.0.0"}
            resp = await client.request(method, path, headers=headers, data=b"{}")
            # The route's own scope, or another it accepts (batch and eval keys may read the models).
            allowed = scope is None or bool(accepted[(method, path)] & set(scopes))
            if allowed:
                assert resp.status != 401, f"{role} refused on {method} {path}"
            else:
                assert resp.status == 401, f"{role} ({scopes}) got {resp.status} on {method} {path}"
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                if method != "HEAD":
                    error = (await resp.json())["error"]
                    assert error["code"] == "missing_scope" and f"'{scope.value}'" in error["message"]
                    assert TOKENS[role] not in error["message"]
            checked += 1
        if scope is None:
            continue
        for headers, code in (({}, "missing_api_key"), ({"Authorization": "Bearer wrong-token-123"}, "invalid_api_key"),
                              ({"Authorization": "Basic dXNlcjpwYXNz"}, "missing_api_key")):
            resp = await client.request(method, path, headers=headers, data=b"{}")
            assert resp.status == 401, f"{headers} got {resp.status} on {method} {path}"
            assert "Bearer" in resp.headers["WWW-Authenticate"]
            if method != "HEAD":
                body = await resp.json()
                assert body["error"]["code"] == code
                assert "wrong-token-123" not in body["error"]["message"]
    assert checked >= len(routes) * len(KEYS)


async def test_unknown_route_is_openai_shaped_404(aiohttp_client: Any, make_settings: Any) -> None:
    client = await aiohttp_client(create_app(make_settings()))
    resp = await client.get("/v1/nothing-here")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"
    resp = await client.delete("/v1/completions", headers={"Authorization": f"Bearer {TOKENS['all']}"})
    assert resp.status == 405
    assert (await resp.json())["error"]["code"] == "method_not_allowed"


async def test_batch_and_eval_keys_may_read_the_models_only(gateway: Any) -> None:
    for role in ("realtime", "batch", "eval"):
        resp = await gateway.get("/v1/models", headers={"Authorization": f"Bearer {TOKENS[role]}"})
        assert resp.status == 200, role
        assert REALTIME_MODEL in [m["id"] for m in (await resp.json())["data"]]
    for role in ("upload", "monitor"):
        resp = await gateway.get("/v1/models", headers={"Authorization": f"Bearer {TOKENS[role]}"})
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith('Bearer realm="llm-gateway", scope="realtime batch eval"')
        message = (await resp.json())["error"]["message"]
        assert "'realtime' scope (or 'batch' or 'eval')" in message
    # Read only: a batch key still cannot run a realtime request.
    resp = await gateway.post("/v1/completions", headers={"Authorization": f"Bearer {TOKENS['batch']}"},
                              json={"model": REALTIME_MODEL, "prompt": "x"})
    assert resp.status == 401
