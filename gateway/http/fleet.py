"""The fleet's HTTP side: GET /monitor/nodes, and the guard that keeps Files and Batches off a node whose
UPLOAD_DIR is not the fleet's shared directory (docs/fleet.md)."""

from __future__ import annotations

import functools
from typing import Any

from aiohttp import web

from gateway.errors import ApiError
from gateway.fleet.store import fleet_view
from gateway.http.appkeys import FLEET, NODE_REGISTRY, SETTINGS
from gateway.http.auth import Handler, requires_scope
from gateway.http.errors import json_response
from gateway.keys import Scope


def requires_shared_uploads(handler: Handler) -> Handler:
    """Answer 503 upload_dir_not_shared instead of running `handler` when UPLOAD_DIR is not the shared
    one (files written through other nodes would be 404s here, and ours invisible to them)."""

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> Any:
        registry = request.app.get(NODE_REGISTRY)
        if registry is not None and registry.uploads_shared is None:
            # Redis was away at start-up: check now. While it stays away the handler runs as on a single
            # node (files are on local disk; whatever needs Redis answers 503 redis_unavailable).
            await registry.check_upload_dir_quietly()
        if registry is not None and registry.uploads_shared is False:
            raise ApiError(503, registry.upload_dir_problem, type="server_error", code="upload_dir_not_shared")
        return await handler(request)

    return guarded  # type: ignore[return-value]


@requires_scope(Scope.MONITOR)
async def list_nodes(request: web.Request) -> web.Response:
    """GET /monitor/nodes: the fleet's node registry (every gateway on this Redis and prefix)."""
    return json_response(await fleet_view(request.app[FLEET], request.app[SETTINGS].node_id))


def setup(app: web.Application) -> None:
    """Add the fleet's monitor route."""
    app.router.add_get("/monitor/nodes", list_nodes)
