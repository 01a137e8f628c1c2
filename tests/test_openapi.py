"""The OpenAPI document stays true to the app, and Schemathesis fuzzes a live gateway against it."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.bootstrap import create_app
from gateway.http.auth import accepted_scopes
from gateway.http.openapi import build_spec
from tests.conftest import KEYS, REALTIME_MODEL, TOKENS
from tests.liveproc import gateway_env, start_gateway, stop_gateway

_METHODS = {"get", "post", "put", "patch", "delete", "head", "options"}
# Destructive operator actions: fuzzing them would restart or swap the runtime under the other
# operations (every later realtime call would then rightly answer 503). Their own tests cover them.
_NOT_FUZZED = {("POST", "/monitor/runtime/restart"), ("POST", "/monitor/runtime/swap")}
# A TUS PATCH body is raw bytes, as Schemathesis already sends for application/octet-stream.
schemathesis.serializer.alias("application/offset+octet-stream", "application/octet-stream")
_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _spec_routes(spec: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in spec["paths"].items() for method in item if method in _METHODS}


async def test_spec_lists_exactly_the_routes_of_the_app(make_settings: Any) -> None:
    app = create_app(make_settings())
    spec = build_spec(REALTIME_MODEL)
    in_spec = _spec_routes(spec)
    in_app: set[tuple[str, str]] = set()
    for route in app.router.routes():
        if route.method == "*" or route.resource is None:
            continue
        in_app.add((route.method, route.resource.canonical))
    # aiohttp registers HEAD beside every GET (same handler, no body): the GET documents both. A HEAD of
    # its own (the TUS upload offset) must be in the spec like any other route.
    implicit_head = {("HEAD", path) for method, path in in_app if method == "GET"}
    missing = in_app - in_spec - implicit_head
    assert not missing, f"routes missing from gateway/http/openapi.py: {sorted(missing)}"
    extra = in_spec - in_app
    assert not extra, f"the spec lists routes the app lacks: {sorted(extra)}"
    # Scopes in the spec agree with the handlers' declarations.
    for route in app.router.routes():
        if route.method in ("*", "HEAD") or route.resource is None:
            continue
        operation = spec["paths"][route.resource.canonical][route.method.lower()]
        scope = route.handler.required_scope
        assert operation.get("x-required-scope") == (scope.value if scope else None), route
        accepted = sorted(s.value for s in accepted_scopes(route.handler))
        assert sorted(operation.get("x-accepted-scopes", accepted if len(accepted) == 1 else [])) == accepted, route
        assert bool(operation["security"]) == (scope is not None), route


@pytest.mark.slow
async def test_openapi_json_is_public_and_valid(gateway: Any) -> None:
    resp = await gateway.get("/openapi.json")
    assert resp.status == 200
    spec = await resp.json()
    assert spec["openapi"].startswith("3.")
    assert spec == build_spec(REALTIME_MODEL)
    # Schemathesis validates the document when it loads it.
    schema = schemathesis.openapi.from_dict(spec)
    assert sum(1 for result in schema.get_all_operations() if result.ok()) == len(_spec_routes(spec))


def _fuzz_operation(operation: Any, base: str, headers: dict[str, str], mode: GenerationMode, examples: int,
                    failures: list[str], statuses: Counter[int]) -> None:
    """Run `examples` generated cases of one operation; record the first failing one, if any."""

    @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        response = case.call(base_url=base, headers=headers, timeout=30)
        statuses[response.status_code] += 1
        case.validate_response(response, checks=_CHECKS)

    try:
        run()
    except Unsatisfiable:
        # Negative mode on an operation with no input (e.g. GET /health): there is nothing to break.
        if mode is not GenerationMode.NEGATIVE:
            raise
    except Exception as exc:  # one line per failing (operation, token, mode), with Schemathesis' reason
        failures.append(f"{operation.method.upper()} {operation.path} [{mode.value}, "
                        f"{headers.get('Authorization', 'no key')[:20]}]: {str(exc)[:1500]}")


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_fuzz_every_route_with_every_kind_of_key(tmp_path: Path, sim_url: str, redis_prefix: str,
                                                 keys_file: Path) -> None:
    # The fuzzer sends hundreds of unknown tokens from one address: the failed-auth throttle (tested in
    # test_hardening) would answer 429 to everything after AUTH_FAIL_MAX of them.
    env = gateway_env(tmp_path, redis_prefix, keys_file, sim_url, AUTH_FAIL_MAX="1000000")
    proc, base, log_path = start_gateway(tmp_path, "fuzz", env)
    failures: list[str] = []
    statuses: Counter[int] = Counter()
    started = time.monotonic()
    try:
        schema = schemathesis.openapi.from_url(base + "/openapi.json")
        scope_roles = {scopes[0]: role for role, (_, _, scopes) in KEYS.items() if len(scopes) == 1}
        operations = [r.ok() for r in schema.get_all_operations()]
        fuzzed = 0
        for operation in operations:
            if (operation.method.upper(), operation.path) in _NOT_FUZZED:
                continue
            fuzzed += 1
            scope = operation.definition.raw.get("x-required-scope")
            runs: list[tuple[dict[str, str], GenerationMode, int]] = [
                ({"Authorization": f"Bearer {TOKENS['all']}"}, GenerationMode.POSITIVE, 30),
                ({"Authorization": f"Bearer {TOKENS['all']}"}, GenerationMode.NEGATIVE, 15),
                ({"Authorization": "Bearer not-a-known-token-42"}, GenerationMode.POSITIVE, 2),
                ({}, GenerationMode.POSITIVE, 2),
            ]
            if scope:
                wrong = next(role for s, role in scope_roles.items() if s != scope)
                runs += [({"Authorization": f"Bearer {TOKENS[scope_roles[scope]]}"}, GenerationMode.POSITIVE, 2),
                         ({"Authorization": f"Bearer {TOKENS[wrong]}"}, GenerationMode.POSITIVE, 1)]
            for headers, mode, examples in runs:
                _fuzz_operation(operation, base, headers, mode, examples, failures, statuses)
        assert fuzzed >= 50
        # The gateway is still healthy after the whole run.
        assert requests.get(base + "/ready", timeout=10).status_code == 200
    finally:
        code = stop_gateway(proc)
    elapsed = time.monotonic() - started
    total = sum(statuses.values())
    print(f"fuzz: {total} requests over {fuzzed} operations in {elapsed:.1f} s; statuses {sorted(statuses.items())}")
    assert not failures, "\n\n".join(failures)
    assert total >= fuzzed * 8
    # The run reached the handlers (successes, validation errors, unknown ids), not only the auth wall.
    assert statuses[200] and statuses[401] and statuses[400] and statuses[404] and statuses[202]
    assert code == 0
    assert "unhandled_error" not in log_path.read_text()
