"""Typed decoding of Redis replies, in one place.

The gateway's clients run with ``decode_responses=False`` (job bodies and logs are bytes), so redis-py
types every reply as ``bytes | str``. Stores turn replies into Python values only through these helpers,
which accept either form, so a client built with ``decode_responses=True`` (tests, the CLI) reads the
same. Writes go through :func:`hash_fields`, which gives a ``dict[str, ...]`` the mapping type ``hset`` asks for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, cast

from redis.typing import EncodableT, FieldT

#: A single reply value as redis-py types it.
Reply = bytes | str
#: A hash reply (HGETALL), from a client with or without decode_responses.
RawHash = Mapping[bytes | str, bytes | str] | Mapping[bytes, bytes] | Mapping[str, str]
#: One stream entry as XRANGE/XREVRANGE/XREAD return it: (id, fields).
RawStreamEntry = tuple[bytes | str | None, Mapping[bytes | str, bytes | str] | None] | list[Any]


def text(value: bytes | str | int | float) -> str:
    """A reply value as text (UTF-8)."""
    if isinstance(value, bytes):
        return value.decode()
    return value if isinstance(value, str) else str(value)


def as_bytes(value: bytes | str) -> bytes:
    """A reply value as bytes (a client with decode_responses gives text)."""
    return value if isinstance(value, bytes) else value.encode()


def opt_text(value: bytes | str | int | float | None) -> str | None:
    """A reply value as text, keeping a missing value (``None``) missing."""
    return None if value is None else text(value)


def texts(values: Iterable[bytes | str]) -> list[str]:
    """Every member of a list/set reply as text, in the reply's order."""
    return [text(v) for v in values]


def text_hash(raw: RawHash | None) -> dict[str, str]:
    """A hash reply (HGETALL) with text keys and values; an absent hash reads as ``{}``."""
    if not raw:
        return {}
    return {text(k): text(v) for k, v in raw.items()}


def opt_int(value: bytes | str | int | None, default: int | None = None) -> int | None:
    """A reply value as an int, or ``default`` when it is missing or empty."""
    if value is None or value in (b"", ""):
        return default
    return value if isinstance(value, int) else int(value)


def to_int(value: bytes | str | int | None, default: int = 0) -> int:
    """A reply value as an int, ``default`` when it is missing or empty."""
    result = opt_int(value, default)
    return default if result is None else result


def to_float(value: bytes | str | float | int | None, default: float = 0.0) -> float:
    """A reply value as a float, ``default`` when it is missing or empty."""
    if value is None or value in (b"", ""):
        return default
    return float(value)


def hash_fields(mapping: Mapping[str, EncodableT]) -> Mapping[FieldT, EncodableT]:
    """A text-keyed mapping as the ``mapping=`` argument of HSET (its key type is invariant)."""
    return cast(Mapping[FieldT, EncodableT], mapping)


def stream_entries(entries: Iterable[RawStreamEntry] | None) -> list[tuple[str, dict[str, str]]]:
    """The entries of an XRANGE/XREVRANGE reply as (id, fields) in text, in the reply's order."""
    out: list[tuple[str, dict[str, str]]] = []
    for entry_id, raw in entries or ():
        if entry_id is not None:
            out.append((text(entry_id), text_hash(raw)))
    return out


def xread_entries(reply: Any) -> list[tuple[str, dict[str, str]]]:
    """Every entry of an XREAD reply over all its streams, oldest first per stream. The gateway speaks
    RESP2, where the reply is a list of [stream, entries] (None when the read timed out)."""
    return [entry for _, entries in reply or () for entry in stream_entries(entries)]
