"""The one place Redis replies become Python values: same result from bytes and from decoded replies."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from gateway.redis_codec import (
    hash_fields,
    opt_int,
    opt_text,
    stream_entries,
    text,
    text_hash,
    texts,
    to_float,
    to_int,
    xread_entries,
)
from tests.conftest import REDIS_URL


def test_scalars_from_bytes_and_text() -> None:
    assert text(b"caf\xc3\xa9") == text("café") == "café"
    assert text(3) == "3"
    assert opt_text(None) is None and opt_text(b"x") == "x"
    assert texts([b"a", "b"]) == ["a", "b"]
    assert to_int(b"12") == to_int("12") == 12
    assert to_int(None, 7) == 7 and to_int(b"", 5) == 5
    assert opt_int(None) is None and opt_int(b"-3") == -3
    assert to_float(b"1.5") == 1.5 and to_float(None, 2.0) == 2.0
    with pytest.raises(ValueError):
        to_int(b"twelve")


def test_hashes_and_streams() -> None:
    assert text_hash({b"k": b"v"}) == text_hash({"k": "v"}) == {"k": "v"}
    assert text_hash(None) == {} and text_hash({}) == {}
    assert stream_entries([(b"1-0", {b"a": b"1"}), (None, None), ("2-0", None)]) == [
        ("1-0", {"a": "1"}), ("2-0", {})]
    assert stream_entries(None) == []
    assert xread_entries([[b"s1", [(b"1-0", {b"a": b"1"})]], [b"s2", [(b"2-0", {b"b": b"2"})]]]) == [
        ("1-0", {"a": "1"}), ("2-0", {"b": "2"})]
    assert xread_entries(None) == [] and xread_entries([]) == []


async def test_round_trip_through_redis(redis_prefix: str) -> None:
    """Real replies, from a client without decode_responses (the gateway's) and with it (tests, CLI)."""
    raw, decoded = Redis.from_url(REDIS_URL), Redis.from_url(REDIS_URL, decode_responses=True)
    key, stream = f"{redis_prefix}hash", f"{redis_prefix}stream"
    try:
        await raw.hset(key, mapping=hash_fields({"n": 3, "f": 0.25, "s": "é"}))
        for client in (raw, decoded):
            got = text_hash(await client.hgetall(key))
            assert got == {"n": "3", "f": "0.25", "s": "é"}
            assert to_int(await client.hget(key, "n")) == 3 and to_float(await client.hget(key, "f")) == 0.25
            assert opt_text(await client.hget(key, "missing")) is None
        first = await raw.xadd(stream, {"event": "a"})
        await raw.xadd(stream, {"event": "b"})
        for client in (raw, decoded):
            events = stream_entries(await client.xrange(stream))
            assert [fields["event"] for _, fields in events] == ["a", "b"]
            after = xread_entries(await client.xread({stream: first}, count=10))
            assert [fields["event"] for _, fields in after] == ["b"]
    finally:
        await raw.delete(key, stream)
        await raw.aclose()
        await decoded.aclose()
