"""Typed `web.AppKey`s for everything the app factory builds, so handlers reach it without globals."""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from redis.asyncio import Redis

from gateway.activity import RealtimeActivity
from gateway.http.auth import ApiKey, Keyring
from gateway.http.upstream import UpstreamPool
from gateway.redis_keys import RedisKeys
from gateway.settings import Settings

if TYPE_CHECKING:
    from gateway.actors.supervisor import RuntimeSupervisor
    from gateway.actors.usage import UsageAccountant
    from gateway.actors.dispatcher import BatchDispatcher
    from gateway.actors.evals import EvalRunner
    from gateway.batch.queue import JobQueue
    from gateway.uploads import UploadStore, UploadSweeper

SETTINGS = web.AppKey("settings", Settings)
KEYRING = web.AppKey("keyring", Keyring)
REDIS = web.AppKey("redis", Redis)
REDIS_KEYS = web.AppKey("redis_keys", RedisKeys)
UPSTREAM = web.AppKey("upstream", aiohttp.ClientSession)
# The realtime hot path's lean HTTP/1.1 client (gateway/http/upstream.py); UPSTREAM serves everything else.
UPSTREAM_POOL = web.AppKey("upstream_pool", UpstreamPool)
ACTIVITY = web.AppKey("activity", RealtimeActivity)
SUPERVISOR: web.AppKey["RuntimeSupervisor"] = web.AppKey("supervisor")
ACCOUNTANT: web.AppKey["UsageAccountant"] = web.AppKey("accountant")
UPLOADS: web.AppKey["UploadStore"] = web.AppKey("uploads")
UPLOAD_SWEEPER: web.AppKey["UploadSweeper"] = web.AppKey("upload_sweeper")
BATCH_QUEUE: web.AppKey["JobQueue"] = web.AppKey("batch_queue")
DISPATCHER: web.AppKey["BatchDispatcher"] = web.AppKey("dispatcher")
EVAL_RUNNER: web.AppKey["EvalRunner"] = web.AppKey("eval_runner")

# Per-request storage set by the middleware.
REQUEST_ID = web.RequestKey("request_id", str)
API_KEY = web.RequestKey("api_key", ApiKey)
