"""Is this node's UPLOAD_DIR the fleet's shared one? A marker file whose id is recorded in Redis says.

The first node to start writes a random id into `<UPLOAD_DIR>/.fleet-id` and records it in Redis. Every
later node reads its own marker: the same id means the same storage. A missing or different marker
means a local directory (a mount that failed, a forgotten volume), where files uploaded through other
nodes would answer 404: such a node refuses Files, uploads and Batches with 503 upload_dir_not_shared.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from gateway.fleet.store import FleetStore
from gateway.uploads.store import SHARED_MARKER as MARKER_NAME


@dataclass(frozen=True, slots=True)
class SharedDirCheck:
    """The outcome of the start-up check."""

    shared: bool
    marker_id: str | None
    fleet_id: str
    message: str
    """Empty when shared; otherwise what is wrong and what to do, for the 503 and the log."""


def _read_or_create_marker(directory: Path, create: bool) -> str | None:
    path = directory / MARKER_NAME
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        if not create:
            return None
    directory.mkdir(parents=True, exist_ok=True)
    new_id = secrets.token_hex(16)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:  # another node on the same storage wrote it first: theirs is the id
        return path.read_text().strip() or None
    with os.fdopen(fd, "w") as f:
        f.write(new_id + "\n")
        f.flush()
        os.fsync(f.fileno())
    return new_id


async def check_upload_dir(store: FleetStore, directory: str | Path) -> SharedDirCheck:
    """Compare the marker in `directory` with the fleet's recorded id (recording ours if none is)."""
    directory = Path(directory)
    recorded = await store.redis.get(store.keys.fleet_upload_dir_id)
    mine = await asyncio.to_thread(_read_or_create_marker, directory, recorded is None)
    if recorded is None and mine is not None:
        fleet_id = await store.claim_upload_dir_id(mine)
    else:
        fleet_id = recorded.decode() if isinstance(recorded, bytes) else str(recorded or "")
    if mine == fleet_id:
        return SharedDirCheck(True, mine, fleet_id, "")
    seen = f"holds id {mine}" if mine else "is missing"
    message = (f"This node's UPLOAD_DIR ({directory}) is not the fleet's shared upload directory: its marker "
               f"file {MARKER_NAME} {seen}, while the fleet's directory has id {fleet_id}. Mount the shared "
               "storage at UPLOAD_DIR on every node (see docs/fleet.md); Files, uploads and Batches are "
               "refused on this node until then.")
    return SharedDirCheck(False, mine, fleet_id, message)
