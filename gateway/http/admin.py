"""Operator actions on the runtime (monitor scope) and the queue depth sampler's lifecycle.

POST /monitor/runtime/restart and POST /monitor/runtime/swap are what `llm-gateway runtime restart|swap`
call. Both go through the RuntimeSupervisor like every other runtime change (a swap is
`ensure_model`), answer once the change has begun (or finished within `wait` seconds), and let the
caller follow progress on GET /monitor/runtime.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog
from aiohttp import web

from gateway import metrics
from gateway.actors.supervisor import RuntimeSnapshot, RuntimeState, RuntimeUnavailable
from gateway.errors import ApiError, bad_request
from gateway.http.appkeys import API_KEY, DISPATCHER, SETTINGS, SUPERVISOR
from gateway.http.auth import requires_scope
from gateway.http.errors import json_response, parse_json_object
from gateway.keys import Scope
from gateway.policy import ModelPolicy

log = structlog.get_logger(component="admin")

_MAX_WAIT = 600.0
_MAX_MODEL_CHARS = 256


def _view(snap: RuntimeSnapshot, realtime_model: str) -> dict[str, Any]:
    return {"state": snap.state.value, "model": snap.model, "since": snap.since,
            "uptime_seconds": round(time.time() - snap.since, 3), "last_error": snap.last_error,
            "restarts": snap.restarts, "ready_eta": snap.ready_eta, "last_crash_log": snap.last_crash_log,
            "realtime_model": realtime_model}


def _wait_param(request: web.Request, default: float) -> float:
    raw = request.query.get("wait", "")
    if not raw:
        return default
    try:
        wait = float(raw)
    except ValueError:
        raise bad_request(f"'wait' must be seconds from 0 to {_MAX_WAIT:g}.", param="wait") from None
    if not 0 <= wait <= _MAX_WAIT:
        raise bad_request(f"'wait' must be seconds from 0 to {_MAX_WAIT:g}.", param="wait")
    return wait


def _refused(action: str, status: int, message: str, code: str) -> ApiError:
    metrics.OPERATOR_ACTIONS.labels(action, "refused").inc()
    return ApiError(status, message, type="invalid_request_error" if status < 500 else "server_error", code=code)


@requires_scope(Scope.MONITOR)
async def restart_runtime(request: web.Request) -> web.Response:
    """POST /monitor/runtime/restart: restart the runtime with its current model (202 once begun)."""
    supervisor = request.app[SUPERVISOR]
    settings = request.app[SETTINGS]
    if not supervisor.running:
        raise _refused("restart", 503, "The runtime supervisor is not running (the gateway is stopping).",
                       "supervisor_stopped")
    if supervisor.desired_model is None:
        raise _refused("restart", 409, "The runtime is stopped on purpose; nothing to restart. A realtime "
                       "request (or a swap) starts it.", "runtime_stopped")
    await supervisor.restart()
    metrics.OPERATOR_ACTIONS.labels("restart", "accepted").inc()
    log.info("operator_runtime_restart", key_id=request[API_KEY].id)
    return json_response({"action": "restart", **_view(supervisor.snapshot, settings.realtime_model)}, status=202)


@requires_scope(Scope.MONITOR)
async def swap_runtime(request: web.Request) -> web.Response:
    """POST /monitor/runtime/swap {"model": ...}[?wait=seconds]: serve another model (or the realtime one back).

    200 when the runtime serves the model within `wait` seconds (default 1), else 202 while it loads.
    With the batch dispatcher on, a model other than REALTIME_MODEL is run as a batch group: its queued
    jobs run, then the realtime model comes back (as it does when realtime traffic asks for it).
    """
    supervisor = request.app[SUPERVISOR]
    settings = request.app[SETTINGS]
    data = parse_json_object(await request.read())
    model = data.get("model")
    if not isinstance(model, str) or not model.strip() or len(model) > _MAX_MODEL_CHARS:
        raise bad_request(f"'model' is required: the model name to load (at most {_MAX_MODEL_CHARS} "
                          "characters).", param="model")
    # The same allowlist as batch work: a swap makes the runtime load the model.
    model = ModelPolicy.from_settings(settings).batch_model(model.strip())
    wait = _wait_param(request, 1.0)
    if not supervisor.running:
        raise _refused("swap", 503, "The runtime supervisor is not running (the gateway is stopping).",
                       "supervisor_stopped")
    if not supervisor.backend.can_swap and model != settings.realtime_model:
        raise _refused("swap", 409, f"The runtime is external (RUNTIME_BACKEND=external) and serves "
                       f"{settings.realtime_model}; it cannot be switched to {model}.", "runtime_not_swappable")
    dispatcher = request.app.get(DISPATCHER)
    group = dispatcher.status().group if dispatcher is not None else None
    if group is not None and group != model and model != settings.realtime_model:
        # Changing the model under a running batch group would only make the dispatcher swap back.
        raise _refused("swap", 409, f"A batch group for {group} is running; swap to {settings.realtime_model} "
                       "to end it, or retry when it is done.", "batch_group_running")
    metrics.OPERATOR_ACTIONS.labels("swap", "accepted").inc()
    log.info("operator_runtime_swap", key_id=request[API_KEY].id, model=model, previous=supervisor.snapshot.model)
    try:
        # ensure_model records the wish before its first await: after a timeout the swap goes on.
        snap = await supervisor.ensure_model(model, timeout=max(wait, 0.001))
        return json_response({"action": "swap", **_view(snap, settings.realtime_model)}, status=200)
    except RuntimeUnavailable as exc:
        # The supervisor applies the wish on its next turn: wait briefly for the swap to show, so the
        # answer describes it rather than the state before it.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2.0
        snap = supervisor.snapshot
        while (supervisor.desired_model != model or snap.model != model) and loop.time() < deadline:
            snap = await supervisor.wait_changed(deadline - loop.time(), since=snap)
        if supervisor.desired_model == model and snap.model == model and snap.state is not RuntimeState.FAILED:
            return json_response({"action": "swap", **_view(snap, settings.realtime_model)}, status=202)
        raise ApiError(409 if supervisor.desired_model != model else 503, f"The swap to {model} did not "
                       f"happen: {exc}", type="server_error", code="swap_failed",
                       headers={"Retry-After": str(snap.retry_after())}) from None


def setup(app: web.Application) -> None:
    """Add the operator routes."""
    app.router.add_post("/monitor/runtime/restart", restart_runtime)
    app.router.add_post("/monitor/runtime/swap", swap_runtime)
