"""Uploads on local disk: one data file and one info file per upload, plus tombstones of expired ones.

Layout under UPLOAD_DIR, for an upload id `<id>`:
    <id>.bin   the bytes received so far (may hold an unacknowledged tail after a crash)
    <id>.json  the upload's info; its `offset` is the truth about how many bytes are acknowledged
    <id>.gone  a tombstone of an expired upload (so clients get 410, not 404, for a while)

Crash consistency: a chunk is written to `<id>.bin`, fsynced, and only then is the new offset
persisted by writing `<id>.json.tmp`, fsyncing it and renaming it over `<id>.json` (plus an fsync
of the directory). A crash at any point leaves the old or the new info file, never a torn one, and
whenever the data file is longer than the persisted offset the tail is cut off (on start-up and
before every write), so every acknowledged byte is kept and nothing beyond it.

All bookkeeping happens on the event loop; only the fsync + rename of a commit runs in a worker
thread, because an fsync can stall for a long time and asyncio has no non-blocking file API.
The index of uploads lives in memory (rebuilt from the info files by `load()`), which makes
quota checks and ownership look-ups free of disk access.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

import orjson
import structlog

from gateway import metrics
from gateway.uploads.errors import (
    BodyInterrupted,
    ChecksumMismatch,
    FinalUploadImmutable,
    InsufficientStorage,
    InvalidUploadRequest,
    OffsetMismatch,
    QuotaExceeded,
    UploadCountExceeded,
    UploadGone,
    UploadLocked,
    UploadNotFinished,
    UploadNotFound,
    UploadTooLarge,
)
from gateway.uploads.metadata import UploadMetadata
from gateway.uploads.protocol import Checksum

log = structlog.get_logger(component="uploads")

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{32}$")
"""Upload ids: 24 random bytes, URL-safe base64 (no padding). Anything else is rejected unread."""

_INFO_VERSION = 1
SHARED_MARKER = ".fleet-id"
"""The marker file that tells whether an UPLOAD_DIR is a fleet's shared one (gateway/fleet/shared_dir.py)."""
_CONCAT_KINDS = (None, "partial", "final")
_COPY_PIECE = 1024 * 1024


def new_upload_id() -> str:
    """A fresh random, URL-safe upload id."""
    return secrets.token_urlsafe(24)


def valid_upload_id(upload_id: str) -> bool:
    """True for a well-formed id; path separators, dots and the like can never pass."""
    return ID_PATTERN.fullmatch(upload_id) is not None


@dataclass(frozen=True, slots=True)
class UploadInfo:
    """One upload as persisted in its info file."""

    id: str
    key_id: str
    length: int | None
    """Total size in bytes; None while the client defers it (creation-defer-length)."""
    offset: int
    """Bytes received and acknowledged."""
    metadata: UploadMetadata = field(default_factory=UploadMetadata)
    created_at: float = 0.0
    updated_at: float = 0.0
    expires_at: float | None = None
    """When the upload expires unless it is finished first: moved on by each PATCH that adds bytes, never
    past UPLOAD_MAX_LIFETIME_SECONDS after creation. None once finished, except for a partial upload,
    which exists only to be concatenated and so expires finished or not."""
    completed_at: float | None = None
    concat: str | None = None
    """`partial` (created with Upload-Concat: partial), `final` (the concatenation of `parts`) or None."""
    parts: tuple[str, ...] = ()
    """A final upload's partial uploads, in order (they are gone: concatenation consumes them)."""

    @property
    def finished(self) -> bool:
        """True once every byte of the declared length has arrived."""
        return self.length is not None and self.offset == self.length

    @property
    def is_file(self) -> bool:
        """True when the Files API may use it: finished, and not a partial upload awaiting concatenation."""
        return self.finished and self.concat != "partial"

    @property
    def size(self) -> int:
        """Bytes stored (the full size once finished)."""
        return self.offset

    @property
    def reserved_bytes(self) -> int:
        """What the upload counts against its key's quota: its declared length, else what it holds."""
        return self.length if self.length is not None else self.offset

    def to_json(self) -> bytes:
        """The info file's content."""
        return orjson.dumps({
            "version": _INFO_VERSION, "id": self.id, "key_id": self.key_id, "length": self.length,
            "offset": self.offset, "metadata_header": self.metadata.header, "metadata": self.metadata.values,
            "created_at": self.created_at, "updated_at": self.updated_at, "expires_at": self.expires_at,
            "completed_at": self.completed_at, "concat": self.concat, "parts": list(self.parts),
        })

    @classmethod
    def from_json(cls, raw: bytes) -> UploadInfo:
        """Parse an info file; raises ValueError (or KeyError/TypeError) when it is not one."""
        data = orjson.loads(raw)
        if not isinstance(data, dict) or data.get("version") != _INFO_VERSION:
            raise ValueError("not an upload info file of a known version")
        length = data["length"]
        offset = data["offset"]
        if not isinstance(offset, int) or offset < 0 or (length is not None and not isinstance(length, int)):
            raise ValueError("bad offset or length")
        concat = data.get("concat")
        if concat not in _CONCAT_KINDS:
            raise ValueError("bad concat kind")
        return cls(id=str(data["id"]), key_id=str(data["key_id"]), length=length, offset=offset,
                   metadata=UploadMetadata(header=str(data.get("metadata_header", "")),
                                           values=dict(data.get("metadata") or {})),
                   created_at=float(data["created_at"]), updated_at=float(data["updated_at"]),
                   expires_at=data.get("expires_at"), completed_at=data.get("completed_at"),
                   concat=concat, parts=tuple(str(part) for part in data.get("parts") or ()))


@dataclass(frozen=True, slots=True)
class Tombstone:
    """What is remembered about an expired upload: whose it was and when it expired."""

    key_id: str
    expired_at: float


async def _no_chunks() -> AsyncIterator[bytes]:
    """An empty body (a PATCH that only sets the length)."""
    empty: tuple[bytes, ...] = ()
    for piece in empty:
        yield piece


class UploadStore:
    """Every upload on disk under one directory, with per-key bounds and expiry of unfinished uploads.

    Per key: at most `key_quota` bytes (reserved before they are written, so concurrent requests cannot
    overshoot it together) and at most `key_max_uploads` uploads; metadata of at most
    `metadata_max_chars`. Read side (for the TUS routes and the Files API): `lookup`, `get`,
    `list_for_key`, `usage`, `count`, `open_finished`, `iter_finished`, `data_path`. Write side:
    `create`, `append`, `concatenate`, `put`, `delete`, `sweep`. Call `load()` once before use.
    """

    def __init__(self, directory: str | Path, *, max_size: int, key_quota: int, expiry_seconds: float,
                 max_lifetime_seconds: float = float("inf"), key_max_uploads: int | None = None,
                 metadata_max_chars: int | None = None, clock: Callable[[], float] = time.time) -> None:
        self.directory = Path(directory)
        self.max_size = max_size
        self.key_quota = key_quota
        self.expiry_seconds = expiry_seconds
        self.max_lifetime_seconds = max_lifetime_seconds
        self.key_max_uploads = key_max_uploads
        self.metadata_max_chars = metadata_max_chars
        self.tombstone_seconds = expiry_seconds
        """How long an expired upload still answers 410 before it becomes an unknown 404."""
        self.clock = clock
        self._index: dict[str, UploadInfo] = {}
        self._usage: dict[str, int] = {}
        """Per key: the bytes its uploads count (see UploadInfo.reserved_bytes) plus those that requests
        writing right now have reserved."""
        self._counts: dict[str, int] = {}
        self._gone: dict[str, Tombstone] = {}
        self._busy: set[str] = set()

    # --- paths
    def data_path(self, upload_id: str) -> Path:
        """The data file of an upload (read it only up to `UploadInfo.size`)."""
        return self.directory / f"{upload_id}.bin"

    def _info_path(self, upload_id: str) -> Path:
        return self.directory / f"{upload_id}.json"

    def _tombstone_path(self, upload_id: str) -> Path:
        return self.directory / f"{upload_id}.gone"

    # --- start-up
    def load(self) -> None:
        """Rebuild the index from disk, repairing what a crash may have left half done."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._index.clear()
        self._usage.clear()
        self._counts.clear()
        self._gone.clear()
        infos: set[str] = set()
        datas: set[str] = set()
        tombs: set[str] = set()
        for entry in os.scandir(self.directory):
            stem, _, ext = entry.name.partition(".")
            if ext in ("json.tmp", "gone.tmp"):
                # A commit that never reached its rename: the old info file is still the truth.
                Path(entry.path).unlink(missing_ok=True)
            elif entry.name == SHARED_MARKER:
                continue  # the fleet's shared-directory marker (gateway/fleet/shared_dir.py)
            elif not valid_upload_id(stem):
                log.warning("upload_dir_unknown_file", file=entry.name)
            elif ext == "json":
                infos.add(stem)
            elif ext == "bin":
                datas.add(stem)
            elif ext == "gone":
                tombs.add(stem)
        now = self.clock()
        for upload_id in tombs:
            tomb = self._read_tombstone(upload_id)
            if tomb is None or tomb.expired_at + self.tombstone_seconds <= now:
                self._tombstone_path(upload_id).unlink(missing_ok=True)
            else:
                self._gone[upload_id] = tomb
        for upload_id in infos:
            if upload_id in self._gone:
                self._remove_files(upload_id)  # the sweeper crashed between tombstone and removal
                continue
            info = self._read_info(upload_id)
            if info is None:
                continue  # logged; left on disk for an operator rather than guessed at
            info = self._recover(info)
            if info is not None:
                self._set(upload_id, info)
        for upload_id in datas - infos:
            # Created but never committed: no client was ever told about it.
            self.data_path(upload_id).unlink(missing_ok=True)
        for final in [i for i in self._index.values() if i.concat == "final"]:
            # A crash after a concatenation committed but before its partial uploads were removed.
            for part in self._consumable_parts(final):
                log.info("upload_concat_part_removed", upload_id=part.id, final_id=final.id)
                self._remove_files(part.id)
                self._set(part.id, None)
        log.info("uploads_loaded", uploads=len(self._index), tombstones=len(self._gone),
                 directory=str(self.directory))

    def _recover(self, info: UploadInfo) -> UploadInfo | None:
        path = self.data_path(info.id)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            if info.offset:
                log.error("upload_data_missing", upload_id=info.id, offset=info.offset)
                self._info_path(info.id).unlink(missing_ok=True)
                return None
            path.touch()
            return info
        if size > info.offset:
            os.truncate(path, info.offset)
        elif size < info.offset:
            # Only a disk that lied about fsync gets here; resuming from what is really there is the
            # best left to do (TUS clients ask HEAD for the offset before they resume).
            log.error("upload_data_short", upload_id=info.id, offset=info.offset, size=size)
            now = self.clock()
            info = replace(info, offset=size, completed_at=None, expires_at=self._expiry(info, now))
            self._write_info(info, fsync_data=False)
        return info

    # --- queries
    def get(self, upload_id: str) -> UploadInfo | None:
        """The upload with this id whoever owns it, or None."""
        return self._shared_view(upload_id) if valid_upload_id(upload_id) else None

    def _shared_view(self, upload_id: str) -> UploadInfo | None:
        """The index entry, brought up to date with the disk for finished files.

        On a fleet's shared UPLOAD_DIR other nodes write and delete files too: a finished file this
        process has not seen is read from its info file, and one whose info file is gone is dropped.
        Unfinished uploads stay with the node that serves their PATCHes.
        """
        info = self._index.get(upload_id)
        if info is not None:
            if info.finished and upload_id not in self._busy and not self._info_path(upload_id).exists():
                self._set(upload_id, None)
                return None
            return info
        if upload_id in self._gone:
            return None
        found = self._read_info(upload_id)
        if found is None or not found.finished or not self.data_path(upload_id).exists():
            return None
        self._set(upload_id, found)
        return found

    def lookup(self, upload_id: str, key_id: str) -> UploadInfo:
        """The upload if `key_id` owns it; UploadNotFound (404) or UploadGone (410, expired) otherwise."""
        if valid_upload_id(upload_id):
            info = self._shared_view(upload_id)
            if info is not None and info.key_id == key_id:
                if self.expired(info):
                    raise UploadGone(f"Upload {upload_id} expired before it was finished; start a new "
                                     "upload.")
                return info
            tomb = self._gone.get(upload_id)
            if tomb is not None and tomb.key_id == key_id:
                raise UploadGone(f"Upload {upload_id} expired before it was finished and was removed; "
                                 "start a new upload.")
        raise UploadNotFound("No such upload for this API key.")

    def expired(self, info: UploadInfo) -> bool:
        """True when an unfinished (or partial) upload is past its expiry time."""
        return (info.expires_at is not None and (not info.finished or info.concat == "partial")
                and info.expires_at <= self.clock())

    def list_for_key(self, key_id: str) -> list[UploadInfo]:
        """The uploads a key owns, oldest first (with the finished files other nodes wrote or removed
        on a shared directory since this process looked)."""
        self._sync_shared()
        return sorted((i for i in self._index.values() if i.key_id == key_id), key=lambda i: i.created_at)

    def _sync_shared(self) -> None:
        """One pass over the directory: adopt finished files this process has not seen, drop finished
        ones whose info file is gone (one scandir; an info file is read only for a new id)."""
        try:
            on_disk = {entry.name[:-5] for entry in os.scandir(self.directory) if entry.name.endswith(".json")}
        except OSError:
            return
        for upload_id in [u for u, i in self._index.items() if i.finished and u not in on_disk
                          and u not in self._busy]:
            self._set(upload_id, None)
        for upload_id in on_disk - self._index.keys():
            if valid_upload_id(upload_id):
                self._shared_view(upload_id)

    def usage(self, key_id: str) -> int:
        """Bytes counted against the key's quota (including those reserved by writes in progress)."""
        return self._usage.get(key_id, 0)

    def count(self, key_id: str) -> int:
        """Uploads the key holds, finished or not."""
        return self._counts.get(key_id, 0)

    def busy(self, upload_id: str) -> bool:
        """True while a request is writing to the upload."""
        return upload_id in self._busy

    def repair(self, info: UploadInfo) -> None:
        """Cut an unacknowledged tail off the data file (left by a crash mid-write), unless one is writing."""
        if info.id in self._busy:
            return
        path = self.data_path(info.id)
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size > info.offset:
                os.truncate(path, info.offset)

    def open_finished(self, upload_id: str) -> BinaryIO:
        """Open a finished upload's bytes for reading (the caller closes the file)."""
        info = self._index.get(upload_id) if valid_upload_id(upload_id) else None
        if info is None:
            raise UploadNotFound("No such upload.")
        if not info.finished:
            raise UploadNotFinished(f"Upload {upload_id} has {info.offset} of "
                                    f"{info.length if info.length is not None else 'an unknown number of'} "
                                    "bytes; finish it first.")
        self.repair(info)
        return self.data_path(upload_id).open("rb")

    async def iter_finished(self, upload_id: str, chunk_size: int = 256 * 1024) -> AsyncGenerator[bytes, None]:
        """Stream a finished upload's bytes in pieces, yielding to the event loop between them."""
        with self.open_finished(upload_id) as f:
            while piece := f.read(chunk_size):
                yield piece
                await asyncio.sleep(0)

    # --- changes
    async def create(self, key_id: str, length: int | None, metadata: UploadMetadata | None = None, *,
                     partial: bool = False) -> UploadInfo:
        """Create an empty upload owned by `key_id` (length None = deferred; `partial` for a later
        concatenation); 413 on size or quota, 403 when the key holds its most uploads."""
        metadata = metadata or UploadMetadata()
        if length is not None and length > self.max_size:
            raise UploadTooLarge(f"Upload-Length {length} is above the maximum upload size of "
                                 f"{self.max_size} bytes (Tus-Max-Size).")
        self._check_new(key_id, metadata)
        self._check_quota(key_id, length or 0)
        upload_id = self._new_id()
        now = self.clock()
        finished = length == 0
        info = UploadInfo(id=upload_id, key_id=key_id, length=length, offset=0, metadata=metadata,
                          created_at=now, updated_at=now,
                          expires_at=None if finished and not partial else min(now + self.expiry_seconds,
                                                                               now + self.max_lifetime_seconds),
                          completed_at=now if finished else None, concat="partial" if partial else None)
        # In the index before the first await, so concurrent creations see this reservation.
        self._busy.add(upload_id)
        self._set(upload_id, info)
        try:
            fd = os.open(self.data_path(upload_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.close(fd)
            await self._persist(info, fsync_data=False)
        except BaseException as exc:
            self._resync(upload_id)
            _raise_if_no_space(exc, upload_id)
            raise
        finally:
            self._busy.discard(upload_id)
        metrics.UPLOADS_CREATED.inc()
        if finished:
            metrics.UPLOADS_COMPLETED.inc()
        log.info("upload_created", upload_id=upload_id, key_id=key_id, length=length,
                 filename=info.metadata.filename)
        return info

    async def append(self, upload_id: str, *, offset: int, chunks: AsyncIterable[bytes],
                     content_length: int | None = None, length: int | None = None,
                     checksum: Checksum | None = None) -> UploadInfo:
        """Write `chunks` at `offset` and acknowledge them durably; returns the updated upload.

        `length` sets a deferred Upload-Length. With a `checksum`, the chunk is kept only if it matches
        (else ChecksumMismatch, 460). Without one, a body cut short (BodyInterrupted from `chunks`, or
        the handler cancelled because the client went away) keeps the bytes that did arrive, as TUS
        asks, and the interruption is re-raised after the commit. Every other failure leaves the
        upload exactly at its previous acknowledged offset.
        """
        info = self._index.get(upload_id)
        if info is None:
            raise UploadNotFound("No such upload for this API key.")
        if info.concat == "final":
            raise FinalUploadImmutable(f"Upload {upload_id} is the concatenation of partial uploads; it takes no "
                                       "bytes of its own.")
        if upload_id in self._busy:
            raise UploadLocked("Another request is writing to this upload; retry once it has finished.")
        if self.expired(info):
            raise UploadGone(f"Upload {upload_id} expired before it was finished; start a new upload.")
        if offset != info.offset:
            raise OffsetMismatch(f"Upload-Offset {offset} does not match the upload's offset {info.offset}; "
                                 "ask with HEAD and resume from there.")
        key_id = info.key_id
        target = info.length
        # Bytes this request holds against the quota on top of what the upload already counts. They are
        # reserved before a byte is written, so requests streaming at once can never overshoot together.
        reserve = 0
        if length is not None:
            if target is None:
                if length < info.offset:
                    raise InvalidUploadRequest(f"Upload-Length {length} is smaller than the {info.offset} bytes "
                                               "already received.", code="invalid_upload_length")
                if length > self.max_size:
                    raise UploadTooLarge(f"Upload-Length {length} is above the maximum upload size of "
                                         f"{self.max_size} bytes (Tus-Max-Size).")
                target = length
                reserve = length - info.offset
            elif length != target:
                raise InvalidUploadRequest(f"The upload's length is {target}; it cannot be changed to {length}.",
                                           code="invalid_upload_length")
        elif target is None and content_length is not None:
            reserve = content_length  # the body says how much it brings: hold it all before reading any

        def too_large(total: int) -> UploadTooLarge:
            if target is not None:
                return UploadTooLarge(f"The chunk would take the upload to {total} bytes, beyond its "
                                      f"Upload-Length of {target}; the chunk was discarded.")
            return UploadTooLarge(f"The chunk would take the upload to {total} bytes, above the maximum "
                                  f"upload size of {self.max_size} bytes; the chunk was discarded.")

        if content_length is not None and offset + content_length > (target if target is not None else
                                                                     self.max_size):
            raise too_large(offset + content_length)
        self._hold(key_id, reserve)
        held = reserve

        def admit(total: int) -> None:
            """Allow the upload to grow to `total` bytes, reserving quota first where it is not yet held."""
            nonlocal held
            if total > (target if target is not None else self.max_size):
                raise too_large(total)
            if target is None and total - offset > held:
                self._hold(key_id, total - offset - held)
                held = total - offset

        self._busy.add(upload_id)
        committed = False
        try:
            pos, interrupted, cancelled = await self._write_chunks(upload_id, offset, chunks, admit, checksum)
            now = self.clock()
            finished = target is not None and pos == target
            if finished and info.concat != "partial":
                expires_at = None
            elif pos > offset:
                expires_at = self._expiry(info, now)
            else:
                expires_at = info.expires_at  # no progress, no more time: an empty PATCH cannot keep it alive
            new = replace(info, offset=pos, length=target, updated_at=now, expires_at=expires_at,
                          completed_at=(info.completed_at or now) if finished else None)
            await self._persist(new, fsync_data=pos > offset)
            committed = True
            self._release(key_id, held)
            held = 0
            self._set(upload_id, new)
        except BaseException as exc:
            self._release(key_id, held)
            held = 0
            if not committed:
                self._resync(upload_id)
            _raise_if_no_space(exc, upload_id)
            raise
        finally:
            self._busy.discard(upload_id)
        metrics.UPLOAD_BYTES_RECEIVED.inc(pos - offset)
        if finished and not info.finished:
            metrics.UPLOADS_COMPLETED.inc()
            log.info("upload_completed", upload_id=upload_id, key_id=info.key_id, size=pos)
        if cancelled:
            raise asyncio.CancelledError
        if interrupted:
            raise BodyInterrupted(f"the body ended early; {pos - offset} bytes were kept")
        return new

    async def concatenate(self, key_id: str, part_ids: Sequence[str],
                          metadata: UploadMetadata | None = None) -> UploadInfo:
        """Join finished partial uploads of `key_id`, in order, into a new finished (final) upload.

        The partial uploads are consumed: once the final upload is durable they are removed, so their
        bytes count once, as the final's (the key's usage does not change). The bytes are copied, so for
        a moment the disk holds them twice. A crash before the final upload is committed leaves the parts
        as they were; one after it is finished by `load()`.
        """
        metadata = metadata or UploadMetadata()
        self._check_metadata(metadata)
        parts = [self.lookup(part_id, key_id) for part_id in part_ids]
        for part in parts:
            if part.concat != "partial":
                raise InvalidUploadRequest(f"Upload {part.id} was not created with Upload-Concat: partial; only "
                                           "partial uploads can be concatenated.", code="invalid_upload_concat")
            if not part.finished:
                raise InvalidUploadRequest(f"Partial upload {part.id} has {part.offset} of "
                                           f"{part.length if part.length is not None else 'an unknown number of'}"
                                           " bytes; finish every partial upload before concatenating.",
                                           code="partial_upload_not_finished")
            if part.id in self._busy:
                raise UploadLocked(f"Partial upload {part.id} is being written to; retry once it has finished.")
        size = sum(part.size for part in parts)
        if size > self.max_size:
            raise UploadTooLarge(f"The partial uploads add up to {size} bytes, above the maximum upload size of "
                                 f"{self.max_size} bytes (Tus-Max-Size).")
        now = self.clock()
        final = UploadInfo(id=self._new_id(), key_id=key_id, length=size, offset=size, metadata=metadata,
                           created_at=now, updated_at=now, expires_at=None, completed_at=now, concat="final",
                           parts=tuple(part.id for part in parts))
        ids = {part.id for part in parts}
        self._busy.update(ids)
        try:
            fut = asyncio.ensure_future(asyncio.to_thread(self._write_final, final, parts))
            try:
                await asyncio.shield(fut)
            except asyncio.CancelledError:
                # The copy cannot be stopped: let it end, keep what it committed, then stop as asked.
                await asyncio.wait({fut})
                if not fut.cancelled() and fut.exception() is None:
                    self._consume(final, parts)
                raise
        except BaseException as exc:
            if final.id not in self._index:
                self._remove_files(final.id)
                (self.directory / f"{final.id}.json.tmp").unlink(missing_ok=True)
            _raise_if_no_space(exc, final.id)
            raise
        finally:
            self._busy.difference_update(ids)
        self._consume(final, parts)
        metrics.UPLOADS_CREATED.inc()
        metrics.UPLOADS_COMPLETED.inc()
        log.info("upload_concatenated", upload_id=final.id, key_id=key_id, parts=len(parts), size=size,
                 filename=metadata.filename)
        return final

    async def put(self, key_id: str, chunks: AsyncIterable[bytes],
                  metadata: UploadMetadata | None = None) -> UploadInfo:
        """Store a whole stream as a finished upload in one go (e.g. a multipart file of the Files API).

        The size need not be known in advance; UPLOAD_MAX_SIZE and the key's quota still apply. On any
        failure (including a body cut short) nothing is left behind.
        """
        info = await self.create(key_id, None, metadata)
        try:
            info = await self.append(info.id, offset=0, chunks=chunks)
            return await self.append(info.id, offset=info.offset, chunks=_no_chunks(), length=info.offset)
        except BaseException:
            await self.delete(info.id)
            raise

    async def _write_chunks(self, upload_id: str, offset: int, chunks: AsyncIterable[bytes],
                            admit: Callable[[int], None], checksum: Checksum | None) -> tuple[int, bool, bool]:
        """Write the chunk at `offset`, asking `admit` before each piece (it raises an UploadError to refuse
        it); returns (new offset, body cut short, handler cancelled)."""
        hasher = checksum.hasher() if checksum is not None else None
        pos = offset
        interrupted = cancelled = False
        fd = os.open(self.data_path(upload_id), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, offset)  # whatever lies past the acknowledged offset was never acknowledged
            try:
                async for piece in chunks:
                    admit(pos + len(piece))
                    view = memoryview(piece)
                    while view:
                        # Page-cache writes are short; the slow part (fsync) happens in a thread.
                        written = os.pwrite(fd, view, pos)
                        view = view[written:]
                        pos += written
                    if hasher is not None:
                        hasher.update(piece)
            except BodyInterrupted:
                interrupted = True
            except asyncio.CancelledError:
                # Under handler_cancellation a client that drops the connection cancels the handler:
                # what arrived is kept just as for a body cut short, then the cancellation goes on.
                interrupted = cancelled = True
        finally:
            os.close(fd)
        if checksum is not None and hasher is not None:
            if cancelled:
                raise asyncio.CancelledError  # a checksummed chunk is kept whole or not at all
            if interrupted:
                raise BodyInterrupted("the body ended early; a checksummed chunk is kept whole or not at all")
            if hasher.digest() != checksum.digest:
                raise ChecksumMismatch(f"The chunk's {checksum.algorithm} checksum does not match "
                                       "Upload-Checksum; the chunk was discarded, resend it.")
        return pos, interrupted, cancelled

    async def delete(self, upload_id: str) -> bool:
        """Remove an upload and its bytes (termination, or a deleted file); False if there was none."""
        if not valid_upload_id(upload_id) or upload_id not in self._index:
            return False
        if upload_id in self._busy:
            raise UploadLocked("Another request is writing to this upload; retry once it has finished.")
        info = self._index[upload_id]
        self._remove_files(upload_id)
        self._set(upload_id, None)
        log.info("upload_deleted", upload_id=upload_id, key_id=info.key_id)
        return True

    def sweep(self) -> int:
        """Remove unfinished uploads past their expiry (leaving tombstones) and old tombstones."""
        now = self.clock()
        removed = 0
        for info in list(self._index.values()):
            if info.id in self._busy or not self.expired(info):
                continue
            tomb = Tombstone(key_id=info.key_id, expired_at=now)
            # Tombstone first: a crash before the removal is finished by the next load().
            self._write_tombstone(info.id, tomb)
            self._gone[info.id] = tomb
            self._remove_files(info.id)
            self._set(info.id, None)
            removed += 1
            metrics.UPLOADS_EXPIRED.inc()
            log.info("upload_expired", upload_id=info.id, key_id=info.key_id, offset=info.offset,
                     length=info.length)
        for upload_id, tomb in list(self._gone.items()):
            if tomb.expired_at + self.tombstone_seconds <= now:
                self._tombstone_path(upload_id).unlink(missing_ok=True)
                del self._gone[upload_id]
        return removed

    # --- internals
    def _new_id(self) -> str:
        upload_id = new_upload_id()
        while upload_id in self._index or upload_id in self._gone:
            upload_id = new_upload_id()
        return upload_id

    def _expiry(self, info: UploadInfo, now: float) -> float:
        """When an upload that made progress at `now` expires: a full expiry period later, but never past
        its maximum lifetime (so a trickle of bytes cannot keep an unfinished upload forever)."""
        return min(now + self.expiry_seconds, info.created_at + self.max_lifetime_seconds)

    def _check_metadata(self, metadata: UploadMetadata) -> None:
        if self.metadata_max_chars is not None and len(metadata.header) > self.metadata_max_chars:
            raise InvalidUploadRequest(f"Invalid Upload-Metadata: the header is longer than {self.metadata_max_chars} "
                                       "characters (UPLOAD_METADATA_MAX_BYTES).", code="invalid_upload_metadata")

    def _check_new(self, key_id: str, metadata: UploadMetadata) -> None:
        """Refuse a new upload whose metadata is too long, or for a key that holds its most uploads."""
        self._check_metadata(metadata)
        if self.key_max_uploads is not None and self.count(key_id) >= self.key_max_uploads:
            raise UploadCountExceeded(f"Key '{key_id}' holds {self.count(key_id)} uploads, the most it may "
                                      f"(UPLOAD_KEY_MAX_UPLOADS={self.key_max_uploads}); delete finished or "
                                      "abandoned uploads first.")

    def _check_quota(self, key_id: str, extra: int) -> None:
        total = self.usage(key_id) + extra
        if total > self.key_quota:
            raise self._quota_error(key_id, total)

    def _hold(self, key_id: str, extra: int) -> None:
        """Reserve `extra` bytes of the key's quota for a write about to happen (QuotaExceeded if no room)."""
        if extra <= 0:
            return
        self._check_quota(key_id, extra)
        self._usage[key_id] = self._usage.get(key_id, 0) + extra
        metrics.UPLOAD_STORED_BYTES.set(sum(self._usage.values()))

    def _release(self, key_id: str, held: int) -> None:
        """Give back a reservation of `_hold` (the bytes kept are then counted by the upload itself)."""
        if held <= 0:
            return
        self._usage[key_id] = self._usage.get(key_id, 0) - held
        if self._usage[key_id] <= 0:
            del self._usage[key_id]
        metrics.UPLOAD_STORED_BYTES.set(sum(self._usage.values()))

    def _consumable_parts(self, final: UploadInfo) -> list[UploadInfo]:
        """The partial uploads of a committed final upload that are still in the index."""
        parts = (self._index.get(part_id) for part_id in final.parts)
        return [p for p in parts if p is not None and p.concat == "partial" and p.key_id == final.key_id]

    def _consume(self, final: UploadInfo, parts: list[UploadInfo]) -> None:
        """After the final upload is durable: drop its parts, then index it (its bytes are theirs)."""
        for part in parts:
            self._remove_files(part.id)
            self._set(part.id, None)
        self._set(final.id, final)

    def _write_final(self, final: UploadInfo, parts: list[UploadInfo]) -> None:
        """Copy the parts' acknowledged bytes into the final upload and commit it (runs in a worker thread)."""
        with self.data_path(final.id).open("xb") as out:
            for part in parts:
                with self.data_path(part.id).open("rb") as source:
                    remaining = part.size
                    while remaining:
                        piece = source.read(min(_COPY_PIECE, remaining))
                        if not piece:
                            raise OSError(errno.EIO, f"partial upload {part.id} is shorter than its offset")
                        out.write(piece)
                        remaining -= len(piece)
            out.flush()
            os.fsync(out.fileno())
        self._write_info(final, fsync_data=False)

    def _quota_error(self, key_id: str, total: int) -> QuotaExceeded:
        return QuotaExceeded(f"Key '{key_id}' would hold {total} bytes of uploads, above its quota of "
                             f"{self.key_quota} bytes (UPLOAD_KEY_QUOTA_BYTES); delete finished or abandoned "
                             f"uploads first (it holds {self.usage(key_id)} bytes now).")

    def _set(self, upload_id: str, info: UploadInfo | None) -> None:
        """Replace the index entry and keep the per-key usage in step."""
        old = self._index.pop(upload_id, None)
        if old is not None:
            self._usage[old.key_id] = self._usage.get(old.key_id, 0) - old.reserved_bytes
            if self._usage[old.key_id] <= 0:
                del self._usage[old.key_id]
            self._counts[old.key_id] -= 1
            if not self._counts[old.key_id]:
                del self._counts[old.key_id]
        if info is not None:
            self._index[upload_id] = info
            self._usage[info.key_id] = self._usage.get(info.key_id, 0) + info.reserved_bytes
            self._counts[info.key_id] = self._counts.get(info.key_id, 0) + 1
        metrics.UPLOAD_STORED_BYTES.set(sum(self._usage.values()))

    def _resync(self, upload_id: str) -> None:
        """After a failed write: take the info file as the truth and cut the data file to its offset."""
        info = self._read_info(upload_id)
        self._set(upload_id, info)
        if info is None:
            self.data_path(upload_id).unlink(missing_ok=True)
            return
        with contextlib.suppress(FileNotFoundError):
            if self.data_path(upload_id).stat().st_size > info.offset:
                os.truncate(self.data_path(upload_id), info.offset)

    async def _persist(self, info: UploadInfo, *, fsync_data: bool) -> None:
        fut = asyncio.ensure_future(asyncio.to_thread(self._write_info, info, fsync_data))
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            # A thread cannot be stopped: let the commit land (or fail) so the caller's resync reads
            # the final state of the info file, then stop as asked.
            await asyncio.wait({fut})
            if not fut.cancelled():
                fut.exception()  # retrieved: the resync decides what the disk now says
            raise

    def _write_info(self, info: UploadInfo, fsync_data: bool) -> None:
        """Durably replace the info file (runs in a worker thread)."""
        if fsync_data:
            fd = os.open(self.data_path(info.id), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        tmp = self.directory / f"{info.id}.json.tmp"
        with tmp.open("wb") as f:
            f.write(info.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._info_path(info.id))
        self._fsync_directory()

    def _fsync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _read_info(self, upload_id: str) -> UploadInfo | None:
        try:
            raw = self._info_path(upload_id).read_bytes()
        except FileNotFoundError:
            return None
        try:
            info = UploadInfo.from_json(raw)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("upload_info_unreadable", upload_id=upload_id, error=str(exc))
            return None
        if info.id != upload_id:
            log.error("upload_info_unreadable", upload_id=upload_id, error="id does not match the file name")
            return None
        return info

    def _write_tombstone(self, upload_id: str, tomb: Tombstone) -> None:
        # No fsync: losing a tombstone in a crash only turns a later 410 into a 404.
        tmp = self.directory / f"{upload_id}.gone.tmp"
        tmp.write_bytes(orjson.dumps({"key_id": tomb.key_id, "expired_at": tomb.expired_at}))
        os.replace(tmp, self._tombstone_path(upload_id))

    def _read_tombstone(self, upload_id: str) -> Tombstone | None:
        try:
            data = orjson.loads(self._tombstone_path(upload_id).read_bytes())
            return Tombstone(key_id=str(data["key_id"]), expired_at=float(data["expired_at"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _remove_files(self, upload_id: str) -> None:
        # Info first: a crash in between leaves an orphan data file, which load() deletes.
        self._info_path(upload_id).unlink(missing_ok=True)
        self.data_path(upload_id).unlink(missing_ok=True)


def _raise_if_no_space(exc: BaseException, upload_id: str) -> None:
    """Turn a full disk (after the upload was put back at its acknowledged offset) into a clean 507."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        log.error("upload_storage_full", upload_id=upload_id)
        raise InsufficientStorage("The upload store is out of disk space; the upload keeps its last "
                                  "acknowledged offset (ask HEAD) and can resume once space is freed.") from None
