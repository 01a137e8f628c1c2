"""NodeRegistry: this gateway's entry in the fleet's node registry, refreshed on a heartbeat.

The entry (docs/fleet.md) says who the node is and what it is doing: its address and version, the
runtime's state, the models it has loaded or asleep, realtime load, batch in flight and the swap slot
it holds. It expires FLEET_NODE_TTL_SECONDS after the last heartbeat, so a dead node drops out on its
own; a clean stop removes it at once. At start the registry also checks that UPLOAD_DIR is the fleet's
shared directory (gateway/fleet/shared_dir.py); Files and Batches ask `uploads_shared`.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

from gateway import __version__, metrics
from gateway.activity import RealtimeActivity
from gateway.actors.base import Service
from gateway.actors.supervisor import RuntimeState, RuntimeSupervisor
from gateway.batch.queue import instance_id
from gateway.fleet.shared_dir import check_upload_dir
from gateway.fleet.store import FleetStore
from gateway.redis_client import REDIS_OR_OS_ERRORS
from gateway.settings import Settings

if TYPE_CHECKING:
    from gateway.actors.dispatcher import BatchDispatcher


class NodeRegistry(Service):
    """Keeps this node's registry entry fresh; `entry()` is what it writes."""

    name = "node_registry"

    def __init__(self, settings: Settings, store: FleetStore, supervisor: RuntimeSupervisor,
                 activity: RealtimeActivity, dispatcher: BatchDispatcher | None) -> None:
        super().__init__()
        self.settings = settings
        self.store = store
        self.supervisor = supervisor
        self.activity = activity
        self.dispatcher = dispatcher
        self.node_id = settings.node_id
        self.instance = instance_id()
        """This process (node ids are per host; two gateways with one NODE_ID are told apart by it)."""
        self.started_at = time.time()
        self.uploads_shared: bool | None = None
        """True when UPLOAD_DIR is the fleet's shared directory; None until Redis could be asked."""
        self.upload_dir_problem = ""
        self.heartbeats = 0
        self._last_check = float("-inf")

    async def start(self) -> None:
        """Check UPLOAD_DIR and write the first entry before requests arrive, then keep it fresh."""
        with contextlib.suppress(*REDIS_OR_OS_ERRORS):
            await self._check_upload_dir()
            await self._beat()
        await super().start()

    async def run(self) -> None:
        """Heartbeat every FLEET_HEARTBEAT_SECONDS until stopped."""
        while True:
            try:
                if self.uploads_shared is None:
                    await self._check_upload_dir()
                await self._beat()
                metrics.FLEET_NODES.set(await self.store.node_count())
            except REDIS_OR_OS_ERRORS as exc:  # the entry expires meanwhile; the next beat writes it again
                self.log.warning("node_heartbeat_failed", error=str(exc))
            if await self.pause(self.settings.fleet_heartbeat_seconds):
                return

    async def on_stop(self) -> None:
        """Leave the registry at once rather than after the TTL."""
        try:
            await self.store.remove(self.node_id)
        except REDIS_OR_OS_ERRORS as exc:
            self.log.warning("node_deregister_failed", error=str(exc))

    async def _beat(self) -> None:
        other = await self.store.heartbeat(self.node_id, self.entry(), self.settings.fleet_node_ttl_seconds)
        self.heartbeats += 1
        if other:
            # Two processes write one entry and share one swap slot: the fleet's limits no longer hold.
            self.log.error("node_id_conflict", node_id=self.node_id, other_instance=other,
                           message="another live gateway uses the same NODE_ID; give each gateway its own")

    async def check_upload_dir_quietly(self) -> None:
        """Check UPLOAD_DIR now if it was not yet (at most every 5 s); a Redis failure leaves it None."""
        if self.uploads_shared is None and time.monotonic() - self._last_check >= 5.0:
            self._last_check = time.monotonic()
            with contextlib.suppress(*REDIS_OR_OS_ERRORS):
                await self._check_upload_dir()

    async def _check_upload_dir(self) -> None:
        check = await check_upload_dir(self.store, self.settings.upload_dir)
        self.uploads_shared = check.shared
        self.upload_dir_problem = check.message
        if not check.shared:
            self.log.error("upload_dir_not_shared", upload_dir=self.settings.upload_dir, message=check.message)

    def entry(self) -> dict[str, Any]:
        """This node's registry entry (no I/O)."""
        snap = self.supervisor.snapshot
        realtime = self.settings.realtime_model
        status = self.dispatcher.status() if self.dispatcher is not None else None
        loaded: list[str] = []
        sleeping: list[str] = []
        if snap.state is RuntimeState.SLEEPING:
            sleeping.append(snap.model or realtime)
        elif snap.ready and snap.model:
            loaded.append(snap.model)
        if status is not None and status.group and status.group not in loaded:
            loaded.append(status.group)  # sleep mode: a second runtime serves the group
        idle = self.activity.idle_for()
        return {
            "node_id": self.node_id,
            "instance": self.instance,
            "address": self.settings.node_url,
            "version": __version__,
            "started_at": round(self.started_at, 3),
            "heartbeat_at": round(time.time(), 3),
            "realtime_model": realtime,
            "runtime": {"state": snap.state.value, "model": snap.model, "ready": snap.ready,
                        "backend": self.settings.runtime_backend.value},
            "models": {"loaded": loaded, "sleeping": sleeping},
            "realtime": {"in_flight": self.activity.in_flight,
                         "idle_seconds": round(idle, 1) if idle != float("inf") else None},
            "batch": ({"enabled": True, "in_flight": status.in_flight, "sending": status.sending,
                       "group": status.group, "limit": status.limit, "slots": status.slots,
                       "swap_slot": self.dispatcher.swap_slot_model if self.dispatcher is not None else None}
                      if status is not None else {"enabled": False, "in_flight": 0, "sending": 0, "group": None,
                                                  "limit": 0, "slots": 0, "swap_slot": None}),
            "uploads_shared": self.uploads_shared,
        }
