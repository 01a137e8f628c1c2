"""FleetStore: the only owner of the fleet's Redis keys (the node registry and the swap slots).

- Node registry: each node's entry is a JSON string that expires FLEET_NODE_TTL_SECONDS after its last
  heartbeat, indexed by a sorted set scored by that expiry (listings read the index, never SCAN).
- Swap slots: a counting semaphore of TTL'd leases (a sorted set scored by lease deadline, plus the
  model each slot was taken for). One Lua script decides a take, so two idle nodes that see the same
  queue at the same moment cannot both get a slot the rule gives to one of them.
- The shared UPLOAD_DIR: the id in the first node's marker file is recorded here; a node whose own
  marker differs is not on the shared storage.

Every key carries the `{fleet}` hash tag, so each script and MGET stays in one slot on a Redis Cluster.
Deadlines come from the Redis server's clock (TIME), so nodes with skewed clocks agree on expiry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from gateway.redis_keys import RedisKeys

# KEYS: node entry, index. ARGV: node id, entry JSON, ttl ms, instance. Returns the instance of the entry
# it replaced ('' when none or ours): another live process under the same node id is a misconfiguration.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
local previous = ''
local old = redis.call('GET', KEYS[1])
if old then
  local ok, decoded = pcall(cjson.decode, old)
  if ok and type(decoded) == 'table' and type(decoded['instance']) == 'string' and decoded['instance'] ~= ARGV[4] then
    previous = decoded['instance']
  end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
return previous
"""

# KEYS: slots, slot models. ARGV: node, model, max slots, ttl ms, queued jobs, min jobs, others loaded,
# worth alone (1: the queue is worth a swap when no node serves the model). Returns {1, 'held'|'taken',
# holders} or {0, reason, holders}.
_TAKE_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  redis.call('HDEL', KEYS[2], id)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local deadline = now + tonumber(ARGV[4])
local holders = redis.call('ZRANGE', KEYS[1], 0, -1)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], deadline, ARGV[1])
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  return {1, 'held', #holders}
end
if #holders >= tonumber(ARGV[3]) then
  return {0, 'swap_slot_busy', #holders}
end
local same = tonumber(ARGV[7])
for _, id in ipairs(holders) do
  if redis.call('HGET', KEYS[2], id) == ARGV[2] then same = same + 1 end
end
if same > 0 and tonumber(ARGV[5]) < tonumber(ARGV[6]) * (same + 1) then
  return {0, 'other_node_has_model', #holders}
end
if same == 0 and ARGV[8] ~= '1' then
  return {0, 'swap_not_worth', #holders}
end
redis.call('ZADD', KEYS[1], deadline, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return {1, 'taken', #holders + 1}
"""

# KEYS: slots. ARGV: node, ttl ms. 1 when still held (and extended), 0 when it was lost.
_RENEW_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) < now then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return 1
"""

# KEYS: slots, slot models. ARGV: node.
_RELEASE_SLOT = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""


@dataclass(frozen=True, slots=True)
class SlotAnswer:
    """The outcome of asking for a swap slot."""

    granted: bool
    reason: str
    """held | taken, or why not: swap_slot_busy | other_node_has_model | swap_not_worth."""
    holders: int
    """Nodes holding a slot after the call."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class FleetStore:
    """Every Redis operation on the fleet's keys."""

    def __init__(self, redis: Redis, keys: RedisKeys) -> None:
        self.redis = redis
        self.keys = keys
        self._heartbeat = redis.register_script(_HEARTBEAT)
        self._take_slot = redis.register_script(_TAKE_SLOT)
        self._renew_slot = redis.register_script(_RENEW_SLOT)
        self._release_slot = redis.register_script(_RELEASE_SLOT)

    # --- node registry
    async def heartbeat(self, node_id: str, entry: dict[str, Any], ttl_seconds: float) -> str:
        """Write (or refresh) a node's entry; it expires `ttl_seconds` after this call.

        Returns the `instance` of a live entry written by another process under the same node id (two
        gateways sharing a NODE_ID), else ''.
        """
        previous = await self._heartbeat(keys=[self.keys.fleet_node(node_id), self.keys.fleet_nodes],
                                         args=[node_id, orjson.dumps(entry), max(1, int(ttl_seconds * 1000)),
                                               str(entry.get("instance") or "")])
        return _text(previous)

    async def remove(self, node_id: str) -> None:
        """Take a node out of the registry (a clean stop); the two writes are each harmless alone."""
        await self.redis.zrem(self.keys.fleet_nodes, node_id)
        await self.redis.delete(self.keys.fleet_node(node_id))

    async def node_count(self) -> int:
        """Nodes whose entry has not expired (from the index alone: one command)."""
        now_s, now_us = await self.redis.time()
        return int(await self.redis.zcount(self.keys.fleet_nodes, int(now_s) * 1000 + int(now_us) // 1000, "+inf"))

    async def nodes(self) -> list[dict[str, Any]]:
        """The live nodes' entries, by node id. An id whose entry expired is skipped (and dropped)."""
        ids = sorted(_text(x) for x in await self.redis.zrange(self.keys.fleet_nodes, 0, -1))
        if not ids:
            return []
        raw = await self.redis.mget([self.keys.fleet_node(i) for i in ids])
        found: list[dict[str, Any]] = []
        gone: list[str] = []
        for node_id, value in zip(ids, raw, strict=True):
            if value is None:
                gone.append(node_id)
                continue
            entry: dict[str, Any] = orjson.loads(value)
            found.append(entry)
        if gone:
            await self.redis.zrem(self.keys.fleet_nodes, *gone)
        return found

    # --- swap slots
    async def take_swap_slot(self, node_id: str, model: str, *, max_slots: int, lease_seconds: float,
                             queued: int, min_jobs: int, others_loaded: int, worth_alone: bool) -> SlotAnswer:
        """Take (or keep) a swap slot for `model`.

        Refused (`reason`) when `max_slots` nodes hold one already (swap_slot_busy); when other nodes
        already serve `model` (`others_loaded` outside the slots, plus the slot holders for it) and the
        `queued` jobs are fewer than `min_jobs` for each of them and this node (other_node_has_model);
        or when no node serves it and the queue is not `worth_alone` (swap_not_worth).
        """
        granted, reason, holders = await self._take_slot(
            keys=[self.keys.fleet_swap_slots, self.keys.fleet_swap_models],
            args=[node_id, model, max_slots, max(1, int(lease_seconds * 1000)), queued, min_jobs, others_loaded,
                  "1" if worth_alone else "0"])
        return SlotAnswer(bool(int(granted)), _text(reason), int(holders))

    async def renew_swap_slot(self, node_id: str, lease_seconds: float) -> bool:
        """Extend this node's slot; False when it had run out (another node may have it now)."""
        return bool(await self._renew_slot(keys=[self.keys.fleet_swap_slots],
                                           args=[node_id, max(1, int(lease_seconds * 1000))]))

    async def release_swap_slot(self, node_id: str) -> None:
        """Give the slot back (the node serves its realtime model again)."""
        await self._release_slot(keys=[self.keys.fleet_swap_slots, self.keys.fleet_swap_models], args=[node_id])

    async def swap_slots(self) -> dict[str, str]:
        """Node id -> model, for every slot whose lease has not run out."""
        now_s, now_us = await self.redis.time()
        now_ms = int(now_s) * 1000 + int(now_us) // 1000
        ids = [_text(x) for x in await self.redis.zrangebyscore(self.keys.fleet_swap_slots, now_ms, "+inf")]
        if not ids:
            return {}
        models = await self.redis.hmget(self.keys.fleet_swap_models, ids)
        return {node: _text(m) if m is not None else "" for node, m in zip(ids, models, strict=True)}

    # --- the shared upload directory
    async def claim_upload_dir_id(self, marker_id: str) -> str:
        """Record `marker_id` as the shared directory's id unless one is recorded; the recorded id."""
        await self.redis.set(self.keys.fleet_upload_dir_id, marker_id, nx=True)
        recorded = await self.redis.get(self.keys.fleet_upload_dir_id)
        return _text(recorded) if recorded is not None else marker_id


async def fleet_view(store: FleetStore, this_node: str | None = None) -> dict[str, Any]:
    """Every live node's registry entry with its heartbeat age, and the swap slots held (for
    GET /monitor/nodes, the dashboard and `llm-gateway nodes`)."""
    nodes = await store.nodes()
    now = time.time()
    for node in nodes:
        node["heartbeat_age_seconds"] = round(max(0.0, now - float(node.get("heartbeat_at") or now)), 1)
        node["this_node"] = node.get("node_id") == this_node
    return {"object": "list", "data": nodes, "swap_slots": await store.swap_slots(), "this_node": this_node}
