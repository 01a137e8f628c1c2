"""A fleet in one test process: several gateways (create_app) on one Redis prefix, each its own node.

The node registry and its expiry, GET /monitor/nodes and `llm-gateway nodes`, the swap slots (a limit on
nodes off the realtime model, a small queue that does not make every node swap, affinity), a batch's
owner lease with takeover and its files written once, and a node whose UPLOAD_DIR is not the shared one.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import FormData
from aiohttp.test_utils import TestClient, TestServer
from redis import asyncio as aredis
from redis.exceptions import WatchError

from gateway import metrics
from gateway.bootstrap import create_app
from gateway.fleet.store import FleetStore
from gateway.http.appkeys import BATCH_MANAGER, DISPATCHER, NODE_REGISTRY
from gateway.openai_batches.records import BatchRecords, new_batch_id
from gateway.redis_keys import RedisKeys
from gateway.settings import Settings
from tests.conftest import REALTIME_MODEL, REDIS_URL, auth, eventually, wait_ready

OTHER = "test-org/batch-model"
CHAT = "/v1/chat/completions"


@pytest.fixture
async def fleet() -> AsyncIterator[Callable[..., Any]]:
    """Start gateways on demand; `await fleet(settings)` gives a test client, each stopped at the end."""
    stack = AsyncExitStack()

    async def start(settings: Settings, ready: bool = True) -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = TestClient(TestServer(create_app(settings)))
        await client.start_server()
        stack.push_async_callback(client.close)
        if ready:
            await wait_ready(client.app, timeout=60)
        return client

    yield start
    await stack.aclose()


@pytest.fixture
async def redis(redis_prefix: str) -> AsyncIterator[aredis.Redis]:
    client = aredis.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


def swap_node(make_settings: Callable[..., Settings], tmp_path: Path, node: str, **extra: Any) -> Settings:
    """A node whose runtime (the simulator as a process) can swap models."""
    values: dict[str, Any] = {
        "node_id": node, "runtime_backend": "process", "runtime_url": "",
        "runtime_pid_file": str(tmp_path / f"runtime-{node}.pid"), "runtime_args": "--sim-ttft 0.05",
        "max_concurrent_batch": 2, "swap_realtime_idle_seconds": 0.2, "realtime_min_residency_seconds": 0,
        "swap_grace_seconds": 0, "batch_max_residency_seconds": 300, "fleet_lease_seconds": 2,
        "fleet_heartbeat_seconds": 0.2, "batch_lease_seconds": 2,
    }
    values.update(extra)
    return make_settings(**values)


async def submit(client: Any, model: str, n: int) -> list[str]:
    ids = []
    for i in range(n):
        resp = await client.post("/v1/batch/completions", json={"model": model, "prompt": f"job {i}", "max_tokens": 2},
                                 headers=auth("batch"))
        assert resp.status == 202, await resp.text()
        ids.append((await resp.json())["id"])
    return ids


async def all_done(client: Any, ids: list[str]) -> bool:
    for job_id in ids:
        resp = await client.get(f"/v1/jobs/{job_id}", headers=auth("batch"))
        if (await resp.json())["status"] != "completed":
            return False
    return True


# --- the node registry
async def test_registry_lists_nodes_and_forgets_them(fleet: Any, make_settings: Any, redis_prefix: str,
                                                     tmp_path: Path) -> None:
    a = await fleet(make_settings(node_id="node-a", fleet_heartbeat_seconds=0.2, node_address="http://a:8000"))
    b = await fleet(make_settings(node_id="node-b", fleet_heartbeat_seconds=0.2))

    async def both() -> Any:
        resp = await a.get("/monitor/nodes", headers=auth("monitor"))
        assert resp.status == 200
        body = await resp.json()
        ready = {n["node_id"] for n in body["data"] if n["runtime"]["state"] == "ready"}
        # Both listed, and with a heartbeat sent since each runtime became ready (an entry may lag by one).
        return body if ready == {"node-a", "node-b"} else None

    body = await eventually(both, timeout=10)
    entry = next(n for n in body["data"] if n["node_id"] == "node-a")
    assert entry["address"] == "http://a:8000" and entry["this_node"] is True
    assert entry["runtime"]["state"] == "ready" and entry["models"]["loaded"] == [REALTIME_MODEL]
    assert entry["version"] and entry["batch"]["enabled"] is True and entry["uploads_shared"] is True
    assert entry["heartbeat_age_seconds"] < 5
    assert (await a.get("/monitor/nodes", headers=auth("batch"))).status == 401

    # The CLI prints the same registry.
    env = {**os.environ, "REDIS_URL": REDIS_URL, "REDIS_PREFIX": redis_prefix}
    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gateway", "nodes", "--json"], env=env,
                                  capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert {n["node_id"] for n in orjson.loads(out.stdout)["data"]} == {"node-a", "node-b"}
    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gateway", "nodes"], env=env,
                                  capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0 and "node-a" in out.stdout and "node-b" in out.stdout and "SWAP_SLOT" in out.stdout

    # A clean stop leaves the registry at once.
    await b.close()
    assert await eventually(lambda: both_gone(a, "node-b"), timeout=5)


async def both_gone(client: Any, node: str) -> bool:
    body = await (await client.get("/monitor/nodes", headers=auth("monitor"))).json()
    return node not in {n["node_id"] for n in body["data"]}


async def test_an_entry_expires_without_heartbeats(redis: aredis.Redis, redis_prefix: str) -> None:
    store = FleetStore(redis, RedisKeys(redis_prefix))
    await store.heartbeat("dead-node", {"node_id": "dead-node"}, ttl_seconds=0.3)
    await store.heartbeat("live-node", {"node_id": "live-node"}, ttl_seconds=30)
    assert {n["node_id"] for n in await store.nodes()} == {"dead-node", "live-node"}
    await asyncio.sleep(0.5)
    assert [n["node_id"] for n in await store.nodes()] == ["live-node"]
    # The index forgets it too (listings read the index, never SCAN).
    assert [x.decode() for x in await redis.zrange(f"{redis_prefix}{{fleet}}:nodes", 0, -1)] == ["live-node"]
    assert await store.node_count() == 1


async def test_two_processes_with_one_node_id_are_told_apart(redis: aredis.Redis, redis_prefix: str) -> None:
    store = FleetStore(redis, RedisKeys(redis_prefix))
    assert await store.heartbeat("n", {"node_id": "n", "instance": "p1"}, ttl_seconds=30) == ""
    assert await store.heartbeat("n", {"node_id": "n", "instance": "p1"}, ttl_seconds=30) == ""
    assert await store.heartbeat("n", {"node_id": "n", "instance": "p2"}, ttl_seconds=30) == "p1"


# --- swap slots
async def test_swap_slot_rules(redis: aredis.Redis, redis_prefix: str) -> None:
    store = FleetStore(redis, RedisKeys(redis_prefix))
    kw: dict[str, Any] = {"lease_seconds": 1.0, "min_jobs": 10, "others_loaded": 0}
    # Not worth a swap alone: refused whatever the room.
    no = await store.take_swap_slot("n1", OTHER, max_slots=2, queued=3, worth_alone=False, **kw)
    assert (no.granted, no.reason) == (False, "swap_not_worth")
    first = await store.take_swap_slot("n1", OTHER, max_slots=2, queued=15, worth_alone=True, **kw)
    assert (first.granted, first.reason, first.holders) == (True, "taken", 1)
    # One node serves the model: a second swaps only for min_jobs per node.
    second = await store.take_swap_slot("n2", OTHER, max_slots=2, queued=15, worth_alone=True, **kw)
    assert (second.granted, second.reason) == (False, "other_node_has_model")
    second = await store.take_swap_slot("n2", OTHER, max_slots=2, queued=20, worth_alone=True, **kw)
    assert second.granted and second.holders == 2
    # At most max_slots nodes off the realtime model.
    third = await store.take_swap_slot("n3", "another-model", max_slots=2, queued=100, worth_alone=True, **kw)
    assert (third.granted, third.reason) == (False, "swap_slot_busy")
    # A node serving the model outside any slot (its realtime model, say) counts for affinity.
    await store.release_swap_slot("n1")
    await store.release_swap_slot("n2")
    loaded = await store.take_swap_slot("n3", OTHER, max_slots=2, queued=15, worth_alone=True,
                                        lease_seconds=1.0, min_jobs=10, others_loaded=1)
    assert (loaded.granted, loaded.reason) == (False, "other_node_has_model")
    # Renewed while held; a slot that is not renewed runs out and frees its place.
    assert (await store.take_swap_slot("n1", OTHER, max_slots=1, queued=50, worth_alone=True, **kw)).granted
    assert await store.renew_swap_slot("n1", 0.3)
    assert await store.swap_slots() == {"n1": OTHER}
    assert not (await store.take_swap_slot("n2", "m2", max_slots=1, queued=50, worth_alone=True, **kw)).granted
    await asyncio.sleep(0.5)
    assert not await store.renew_swap_slot("n1", 1.0)
    assert (await store.take_swap_slot("n2", "m2", max_slots=1, queued=50, worth_alone=True, **kw)).granted


async def watch_groups(clients: list[Any], seen: list[int], stop: asyncio.Event) -> None:
    """Record, every 10 ms, how many nodes are off the realtime model (in a group or loading one)."""
    while not stop.is_set():
        seen.append(sum(1 for c in clients if c.app[DISPATCHER].swap_slot_model is not None
                        or c.app[DISPATCHER].status().group is not None))
        await asyncio.sleep(0.01)


async def test_swap_slots_limit_swaps_across_three_nodes(fleet: Any, make_settings: Any, tmp_path: Path) -> None:
    """FLEET_MAX_SWAPPED_NODES=1: with plenty of work for another model, one node at a time swaps."""
    clients = [await fleet(swap_node(make_settings, tmp_path, f"n{i}", fleet_max_swapped_nodes=1,
                                     fleet_swap_min_jobs=1)) for i in range(3)]
    await eventually(lambda: registry_size(clients[0], 3), timeout=10)
    seen: list[int] = []
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch_groups(clients, seen, stop))
    ids = await submit(clients[0], OTHER, 30)
    await eventually(lambda: all_done(clients[0], ids), timeout=120, interval=0.2)
    stop.set()
    await watcher
    assert max(seen) == 1, "more than one node was off the realtime model at once"
    swaps = [s for c in clients for s in c.app[DISPATCHER].swaps if s["reason"] == "batch_group"]
    assert swaps and all(s["error"] is None for s in swaps)


def refusals(outcome: str) -> float:
    """This process's llm_gateway_fleet_swap_slot_requests_total{outcome} (all nodes of the test count)."""
    return metrics.REGISTRY.get_sample_value("llm_gateway_fleet_swap_slot_requests_total",
                                             {"outcome": outcome}) or 0.0


async def registry_size(client: Any, n: int) -> bool:
    return len(await client.app[NODE_REGISTRY].store.nodes()) == n


async def test_small_queue_makes_one_node_swap_not_all(fleet: Any, make_settings: Any, tmp_path: Path) -> None:
    """Ten jobs for another model (FLEET_SWAP_MIN_JOBS=20): one node swaps once the oldest has waited
    FLEET_SWAP_MAX_WAIT_SECONDS; the others leave the model to it and say why the jobs wait."""
    clients = [await fleet(swap_node(make_settings, tmp_path, f"n{i}", fleet_swap_min_jobs=20,
                                     fleet_swap_max_wait_seconds=4.0)) for i in range(3)]
    await eventually(lambda: registry_size(clients[0], 3), timeout=10)
    refused_before = refusals("swap_not_worth")
    ids = await submit(clients[0], OTHER, 10)

    async def not_worth() -> bool:
        heads = await clients[0].app[DISPATCHER].queue.ready_heads()
        return clients[0].app[DISPATCHER].waiting_reason(OTHER, heads)["code"] == "swap_not_worth"

    # Before the wait runs out no node swaps, and the queued jobs say why.
    await eventually(not_worth, timeout=10, interval=0.05)
    assert all(c.app[DISPATCHER].swap_slot_model is None for c in clients)
    assert refusals("swap_not_worth") > refused_before
    await eventually(lambda: any(c.app[DISPATCHER].status().group == OTHER for c in clients), timeout=30)
    swapped = [c for c in clients if c.app[DISPATCHER].status().group == OTHER]
    assert len(swapped) == 1
    others = [c for c in clients if c not in swapped]
    heads = await others[0].app[DISPATCHER].queue.ready_heads()
    if OTHER in heads:  # still queued jobs: the other nodes leave them to the node that has the model
        assert others[0].app[DISPATCHER].waiting_reason(OTHER, heads)["code"] == "other_node_has_model"
    await eventually(lambda: all_done(clients[0], ids), timeout=60, interval=0.2)
    swaps = [(c.app[NODE_REGISTRY].node_id, s) for c in clients for s in c.app[DISPATCHER].swaps
             if s["reason"] == "batch_group"]
    assert len(swaps) == 1, swaps


async def test_affinity_jobs_go_to_the_node_with_the_model(fleet: Any, make_settings: Any, tmp_path: Path) -> None:
    """A node whose realtime model is the jobs' model serves them; the other node does not swap for them."""
    serving = await fleet(swap_node(make_settings, tmp_path, "has-model", realtime_model=OTHER,
                                    fleet_swap_min_jobs=50))
    other = await fleet(swap_node(make_settings, tmp_path, "other", fleet_swap_min_jobs=50,
                                  fleet_swap_max_wait_seconds=0))
    await eventually(lambda: registry_size(other, 2), timeout=10)
    ids = await submit(other, OTHER, 12)
    await eventually(lambda: all_done(other, ids), timeout=60, interval=0.2)
    assert not [s for s in other.app[DISPATCHER].swaps if s["reason"] == "batch_group"]
    assert other.app[DISPATCHER].swap_slot_model is None
    del serving


# --- Batches API on several nodes
def batch_lines(n: int) -> bytes:
    rows = [{"custom_id": f"c{i}", "method": "POST", "url": CHAT,
             "body": {"model": REALTIME_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}}
            for i in range(n)]
    return b"".join(orjson.dumps(r) + b"\n" for r in rows)


async def create_batch(client: Any, n: int) -> str:
    form = FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", batch_lines(n), filename="input.jsonl", content_type="application/jsonl")
    resp = await client.post("/v1/files", data=form, headers=auth("batch"))
    assert resp.status == 200, await resp.text()
    file_id = (await resp.json())["id"]
    resp = await client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": CHAT,
                                                  "completion_window": "24h"}, headers=auth("batch"))
    assert resp.status == 200, await resp.text()
    return str((await resp.json())["id"])


async def batch_status(client: Any, batch_id: str) -> dict[str, Any]:
    resp = await client.get(f"/v1/batches/{batch_id}", headers=auth("batch"))
    assert resp.status == 200, await resp.text()
    return dict(await resp.json())


def output_files_of(upload_dir: Path, batch_id: str) -> list[str]:
    """Upload ids on disk whose metadata names the batch (every output or error file ever kept)."""
    found = []
    for info in upload_dir.glob("*.json"):
        if batch_id in info.read_text():
            found.append(info.stem)
    return found


async def test_two_nodes_drive_a_batch_once(fleet: Any, make_settings: Any, tmp_path: Path) -> None:
    """Two nodes, one shared UPLOAD_DIR: the batch has one owner, one output file, readable on both."""
    shared = tmp_path / "shared-uploads"
    a = await fleet(make_settings(node_id="a", upload_dir=str(shared), fleet_lease_seconds=1.5))
    b = await fleet(make_settings(node_id="b", upload_dir=str(shared), fleet_lease_seconds=1.5))
    batch_id = await create_batch(a, 40)

    async def completed() -> Any:
        body = await batch_status(b, batch_id)
        return body if body["status"] == "completed" else None

    done = await eventually(completed, timeout=60, interval=0.1)
    assert done["request_counts"] == {"total": 40, "completed": 40, "failed": 0}
    assert output_files_of(shared, batch_id) == [done["output_file_id"].removeprefix("file-")]
    bodies = []
    for client in (a, b):  # whichever node wrote it, both serve it (shared storage)
        resp = await client.get(f"/v1/files/{done['output_file_id']}/content", headers=auth("batch"))
        assert resp.status == 200, await resp.text()
        bodies.append(await resp.read())
    assert bodies[0] == bodies[1] and len(bodies[0].splitlines()) == 40


async def test_batch_owner_taken_over_after_a_node_dies(fleet: Any, make_settings: Any, tmp_path: Path,
                                                        redis: aredis.Redis, redis_prefix: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The owner dies (its lease is never given back): another node takes the batch over once the lease
    runs out and finishes it, with the output file written once."""
    shared = tmp_path / "shared-uploads"
    a = await fleet(make_settings(node_id="a", upload_dir=str(shared), fleet_lease_seconds=1.5,
                                  batch_dispatcher_enabled=False))
    batch_id = await create_batch(a, 20)
    records = BatchRecords(redis, RedisKeys(redis_prefix), 3600)

    async def enqueued() -> bool:
        batch = await records.get(batch_id)
        return batch is not None and batch.get("enqueue_done") == "1"

    await eventually(enqueued, timeout=30)
    first_owner = (await records.get(batch_id) or {})["owner"]
    assert first_owner == a.app[BATCH_MANAGER].owner

    async def never(*_: Any) -> None:  # what a kill -9 does: the lease is not given back
        return None

    monkeypatch.setattr(a.app[BATCH_MANAGER].records, "release_owner", never)
    await a.close()
    assert (await records.get(batch_id) or {})["owner"] == first_owner
    b = await fleet(make_settings(node_id="b", upload_dir=str(shared), fleet_lease_seconds=1.5))

    async def completed() -> Any:
        body = await batch_status(b, batch_id)
        return body if body["status"] == "completed" else None

    done = await eventually(completed, timeout=60, interval=0.1)
    assert done["request_counts"]["completed"] == 20
    record = await records.get(batch_id) or {}
    assert record["owner_epoch"] == "2"  # taken once by a, once by b
    assert output_files_of(shared, batch_id) == [done["output_file_id"].removeprefix("file-")]


async def test_a_lost_owner_writes_nothing(redis: aredis.Redis, redis_prefix: str) -> None:
    """The fence: once another manager holds the lease, the old owner's status changes are refused."""
    records = BatchRecords(redis, RedisKeys(redis_prefix), 3600)
    fence_id = new_batch_id()  # a well-formed id: the store answers nothing for any other
    await records.create({"id": fence_id, "key_id": "k", "status": "in_progress"})
    assert await records.take_owner(fence_id, "old", 0.2) == "ok"
    assert await records.take_owner(fence_id, "new", 5) == "taken"
    await asyncio.sleep(0.3)
    assert await records.take_owner(fence_id, "new", 5) == "ok"
    from gateway.openai_batches.records import BatchStatus

    assert await records.transition_owned(fence_id, "old", (BatchStatus.IN_PROGRESS,),
                                          {"status": "completed"}) == "not_owner"
    assert (await records.get(fence_id) or {})["status"] == "in_progress"
    assert await records.transition_owned(fence_id, "new", (BatchStatus.IN_PROGRESS,),
                                          {"status": "finalizing"}) == "ok"


async def test_upload_dir_not_shared_is_a_503(fleet: Any, make_settings: Any, tmp_path: Path) -> None:
    a = await fleet(make_settings(node_id="a", upload_dir=str(tmp_path / "shared")))
    b = await fleet(make_settings(node_id="b", upload_dir=str(tmp_path / "local-only")))
    assert a.app[NODE_REGISTRY].uploads_shared is True
    assert (await a.get("/v1/files", headers=auth("batch"))).status == 200
    for method, path, role in (("GET", "/v1/files", "batch"), ("GET", "/v1/batches", "batch"),
                               ("POST", "/v1/batches", "batch"), ("POST", "/v1/upload/", "upload")):
        resp = await b.request(method, path, headers={**auth(role), "Tus-Resumable": "1.0.0"})
        assert resp.status == 503, (path, await resp.text())
        error = (await resp.json())["error"]
        assert error["code"] == "upload_dir_not_shared"
        assert "UPLOAD_DIR" in error["message"] and "local-only" in error["message"]
    # The node says so in the registry too, and its batch manager drives nothing.
    entry = b.app[NODE_REGISTRY].entry()
    assert entry["uploads_shared"] is False
    batch_id = await create_batch(a, 3)
    await eventually(lambda: batch_done(a, batch_id), timeout=30)
    assert b.app[BATCH_MANAGER].driving == 0


async def batch_done(client: Any, batch_id: str) -> bool:
    return (await batch_status(client, batch_id))["status"] == "completed"


# --- failover: a restarted gateway stops what a killed one left running
async def test_restart_stops_a_leftover_batch_runtime(fleet: Any, make_settings: Any, tmp_path: Path) -> None:
    """Sleep mode starts a second runtime for batch groups; one left by a gateway killed mid-group is
    stopped when the next gateway starts, not only at its next swap."""
    leftover = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    try:
        cmdline = Path(f"/proc/{leftover.pid}/cmdline")
        # Until the child has exec'd, its cmdline is still this test process's.
        await eventually(lambda: b"time.sleep(300)" in cmdline.read_bytes(), timeout=10)
        argv = [a.decode() for a in cmdline.read_bytes().split(b"\0") if a]
        pid_file = tmp_path / "runtime.pid"
        Path(f"{pid_file}.batch").write_bytes(orjson.dumps({"pid": leftover.pid, "argv": argv, "model": OTHER}))
        client = await fleet(make_settings(runtime_backend="process", runtime_url="", runtime_pid_file=str(pid_file),
                                           runtime_sleep_mode=True, runtime_stop_timeout=2))
        assert client.app[DISPATCHER].sleep_mode
        assert await asyncio.to_thread(leftover.wait, 30) is not None
        assert not Path(f"{pid_file}.batch").exists()
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()


async def test_a_batch_created_on_one_node_is_driven_by_another(fleet: Any, make_settings: Any, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The node that drives a batch need not be the one its file was uploaded to: the input is read from
    the shared directory (not failed as input_file_missing), and files of either node list on both."""
    shared = tmp_path / "shared-uploads"
    b = await fleet(make_settings(node_id="b", upload_dir=str(shared), fleet_lease_seconds=1.5))
    a = await fleet(make_settings(node_id="a", upload_dir=str(shared), fleet_lease_seconds=1.5,
                                  batch_dispatcher_enabled=False))

    async def never_mine(*_: Any) -> str:  # a's manager always finds the batch owned by someone else
        return "taken"

    monkeypatch.setattr(a.app[BATCH_MANAGER].records, "take_owner", never_mine)
    batch_id = await create_batch(a, 5)  # uploaded through a, after b started

    async def completed() -> Any:
        body = await batch_status(a, batch_id)
        return body if body["status"] in ("completed", "failed") else None

    done = await eventually(completed, timeout=60, interval=0.1)
    assert done["status"] == "completed", done["errors"]
    assert done["request_counts"]["completed"] == 5
    for client in (a, b):
        listed = await (await client.get("/v1/files", headers=auth("batch"))).json()
        ids = {f["id"] for f in listed["data"]}
        assert {done["input_file_id"], done["output_file_id"]} <= ids


async def test_an_owner_that_loses_the_lease_while_finalizing_leaves_no_file(
        fleet: Any, make_settings: Any, tmp_path: Path, redis: aredis.Redis, redis_prefix: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another node takes the batch while this one writes its files: the final status change is refused,
    this node's files are removed, and the batch ends with the one set the new owner writes."""
    shared = tmp_path / "shared-uploads"
    a = await fleet(make_settings(node_id="a", upload_dir=str(shared), fleet_lease_seconds=1.5))
    manager = a.app[BATCH_MANAGER]
    records = manager.records
    key = RedisKeys(redis_prefix).openai_batch
    real = records.transition_owned
    stolen: list[str] = []

    async def steal_then_transition(batch_id: str, owner: str, allowed: Any, fields: dict[str, str]) -> str:
        if "output_file_id" in fields and not stolen:
            # Another node took the lease after this one wrote its files (its lease "ran out").
            stolen.append(fields["output_file_id"])
            await redis.hset(key(batch_id), mapping={"owner": "thief", "owner_until": "99999999999999"})
        return await real(batch_id, owner, allowed, fields)

    monkeypatch.setattr(records, "transition_owned", steal_then_transition)
    batch_id = await create_batch(a, 6)
    await eventually(lambda: bool(stolen), timeout=60)
    await eventually(lambda: output_files_of(shared, batch_id) == [], timeout=10)
    assert (await batch_status(a, batch_id))["status"] == "finalizing"
    # The "thief" dies too: its lease runs out and the batch is finished, once.
    await redis.hset(key(batch_id), mapping={"owner_until": "0"})

    async def completed() -> Any:
        body = await batch_status(a, batch_id)
        return body if body["status"] == "completed" else None

    done = await eventually(completed, timeout=30, interval=0.1)
    assert done["output_file_id"] != stolen[0]
    assert output_files_of(shared, batch_id) == [done["output_file_id"].removeprefix("file-")]


async def test_a_takeover_between_renewal_and_exec_writes_nothing_of_the_chunk(
        redis_backend: Any, redis_prefix: str) -> None:
    """The enqueue fence, on one Redis and on a cluster: a chunk's transaction (owned_transaction) runs
    only if nobody took the batch over after its owner was read, so no two nodes enqueue one line."""
    client = redis_backend.async_client()
    try:
        records = BatchRecords(client, RedisKeys(redis_prefix), 3600)
        batch_id = new_batch_id()
        await records.create({"id": batch_id, "key_id": "k", "status": "in_progress"})
        assert await records.take_owner(batch_id, "old", 0.2) == "ok"
        assert await records.owned_transaction(batch_id, "new") is None  # not the owner: nothing to fence
        fenced = await records.owned_transaction(batch_id, "old")
        assert fenced is not None and fenced[1] == "in_progress"
        pipe, _ = fenced
        await asyncio.sleep(0.3)  # the old owner stalls past its lease; another node takes the batch over
        assert await records.take_owner(batch_id, "new", 5) == "ok"
        records.add_enqueued(pipe, batch_id, ["job_" + "0" * 24], [], 7, 0)
        with pytest.raises(WatchError):
            await pipe.execute()
        assert await records.counter(batch_id, "enqueued_line") == 0
        assert [ids async for ids in records.job_id_chunks(batch_id, 10)] in ([], [[]])
        # The new owner's own chunk goes through.
        fenced = await records.owned_transaction(batch_id, "new")
        assert fenced is not None
        records.add_enqueued(fenced[0], batch_id, ["job_" + "1" * 24], [], 7, 0)
        await fenced[0].execute()
        assert await records.counter(batch_id, "enqueued_line") == 7
    finally:
        await client.aclose()
