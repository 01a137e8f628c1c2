"""Typed `web.AppKey`s for every component the composition root builds, so handlers reach it without globals."""

from __future__ import annotations

import aiohttp
from aiohttp import web
from redis.asyncio import Redis

from gateway.activity import RealtimeActivity
from gateway.actors.dispatcher import BatchDispatcher
from gateway.actors.evals import EvalRunner
from gateway.actors.job_feed import JobEventFeed
from gateway.actors.queue_depth import QueueDepthSampler
from gateway.actors.registry import NodeRegistry
from gateway.actors.supervisor import RuntimeSupervisor
from gateway.actors.traffic import TrafficSampler
from gateway.actors.usage import UsageAccountant
from gateway.batch.queue import JobQueue
from gateway.fleet.store import FleetStore
from gateway.http.throttle import AuthThrottle
from gateway.keys import ApiKey, Keyring
from gateway.openai_batches.manager import BatchManager
from gateway.redis_keys import RedisKeys
from gateway.settings import Settings
from gateway.uploads import UploadStore, UploadSweeper
from gateway.upstream import UpstreamPool
from gateway.usage_store import UsageStore

SETTINGS = web.AppKey("settings", Settings)
KEYRING = web.AppKey("keyring", Keyring)
REDIS = web.AppKey("redis", Redis)
REDIS_KEYS = web.AppKey("redis_keys", RedisKeys)
# The aiohttp client for everything but the realtime hot path (batch requests, /v1/models, probes).
UPSTREAM = web.AppKey("upstream", aiohttp.ClientSession)
# The realtime hot path's lean HTTP/1.1 client (gateway/upstream.py).
UPSTREAM_POOL = web.AppKey("upstream_pool", UpstreamPool)
ACTIVITY = web.AppKey("activity", RealtimeActivity)
SUPERVISOR = web.AppKey("supervisor", RuntimeSupervisor)
ACCOUNTANT = web.AppKey("accountant", UsageAccountant)
USAGE = web.AppKey("usage_store", UsageStore)
UPLOADS = web.AppKey("uploads", UploadStore)
UPLOAD_SWEEPER = web.AppKey("upload_sweeper", UploadSweeper)
BATCH_QUEUE = web.AppKey("batch_queue", JobQueue)
DISPATCHER = web.AppKey("dispatcher", BatchDispatcher)
EVAL_RUNNER = web.AppKey("eval_runner", EvalRunner)
JOB_FEED = web.AppKey("job_event_feed", JobEventFeed)
BATCH_MANAGER = web.AppKey("openai_batch_manager", BatchManager)
QUEUE_DEPTH_SAMPLER = web.AppKey("queue_depth_sampler", QueueDepthSampler)
TRAFFIC = web.AppKey("traffic_sampler", TrafficSampler)
FLEET = web.AppKey("fleet_store", FleetStore)
NODE_REGISTRY = web.AppKey("node_registry", NodeRegistry)

# Failed-authentication counts per client address (gateway/http/throttle.py).
AUTH_THROTTLE = web.AppKey("auth_throttle", AuthThrottle)

# Per-request storage set by the middleware.
REQUEST_ID = web.RequestKey("request_id", str)
API_KEY = web.RequestKey("api_key", ApiKey)
