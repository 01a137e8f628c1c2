"""The keys file: validation with clear messages, hashed tokens, reload keeping the old keys on error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.keys import Keyring, KeysFileError, Scope, hash_token, parse_keys

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("key_id", ["x::20261202", "a:b", "-x", ".x", "a b", "a/b", "x" * 65, "ü"])
def test_key_ids_that_could_collide_or_inject_are_refused(key_id: str) -> None:
    with pytest.raises(KeysFileError) as info:
        parse_keys([{"id": key_id, "token": "t" * 24, "scopes": ["batch"]}])
    assert "letters, digits" in str(info.value)


@pytest.mark.parametrize(("doc", "needle"), [
    ({"nope": 1}, "expected"),
    ({"keys": [{"token": "abcdefgh12abcdefgh12", "scopes": ["realtime"]}]}, "'id'"),
    ({"keys": [{"id": "a", "scopes": ["realtime"]}]}, "exactly one of"),
    ({"keys": [{"id": "a", "token": "short", "scopes": ["realtime"]}]}, "at least 20"),
    ({"keys": [{"id": "a", "token_sha256": "xyz", "scopes": ["realtime"]}]}, "64 hex"),
    ({"keys": [{"id": "a", "token": "abcdefgh12abcdefgh12", "scopes": ["admin"]}]}, "unknown scope 'admin'"),
    ({"keys": [{"id": "a", "token": "abcdefgh12abcdefgh12", "scopes": []}]}, "non-empty list"),
    ({"keys": [{"id": "a", "token": "abcdefgh12abcdefgh12", "scopes": ["batch"]},
               {"id": "a", "token": "abcdefgh13abcdefgh13", "scopes": ["batch"]}]}, "duplicate id"),
    ({"keys": [{"id": "a", "token": "abcdefgh12abcdefgh12", "scopes": ["batch"]},
               {"id": "b", "token": "abcdefgh12abcdefgh12", "scopes": ["batch"]}]}, "same token"),
])
def test_bad_documents_are_explained(doc: object, needle: str) -> None:
    with pytest.raises(KeysFileError) as info:
        parse_keys(doc)
    assert needle in str(info.value)
    assert "abcdefgh12abcdefgh12" not in str(info.value)  # tokens never appear in messages


def test_plain_and_hashed_tokens() -> None:
    keys = parse_keys([{"id": "a", "token": "plain-token-1-aaaaaaaa", "scopes": ["realtime", "batch"]},
                       {"id": "b", "token_sha256": hash_token("hashed-token-1"), "scopes": ["monitor"]},
                       {"id": "c", "token": "disabled-token-aaaaaaa", "scopes": ["batch"], "disabled": True}])
    assert keys[hash_token("plain-token-1-aaaaaaaa")].scopes == {Scope.REALTIME, Scope.BATCH}
    assert keys[hash_token("hashed-token-1")].id == "b"
    assert hash_token("disabled-token-aaaaaaa") not in keys


def test_example_keys_file_is_valid() -> None:
    ring = Keyring(ROOT / "config" / "example.keys.json")
    ring.load()
    assert ring.authenticate("rt-demo-token-change-me").id == "demo-realtime"  # type: ignore[union-attr]
    assert ring.authenticate("wrong") is None


def test_demo_tokens_are_refused_off_loopback(tmp_path: Path) -> None:
    from gateway.settings import Settings

    example = ROOT / "config" / "example.keys.json"
    with pytest.raises(KeysFileError) as info:
        Keyring(example, refuse_demo_tokens=True).load()
    assert "demo-realtime" in str(info.value) and "loopback" in str(info.value)
    assert "change-me" not in str(info.value).replace("'-change-me'", "")  # names no token
    for host, loopback in (("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("127.0.0.1", True),
                           ("::1", True), ("localhost", True)):
        assert Settings(_env_file=None, listen_host=host).listens_on_loopback_only is loopback  # type: ignore[call-arg]


def test_reload_keeps_old_keys_on_error(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps([{"id": "a", "token": "token-aaaa-1-aaaaaaaaa", "scopes": ["realtime"]}]))
    ring = Keyring(path)
    ring.load()
    path.write_text("{ not json")
    assert ring.reload() is False
    assert ring.authenticate("token-aaaa-1-aaaaaaaaa") is not None
    path.write_text(json.dumps([{"id": "b", "token": "token-bbbb-1-bbbbbbbbb", "scopes": ["batch"]}]))
    assert ring.reload() is True
    assert ring.authenticate("token-aaaa-1-aaaaaaaaa") is None
    assert ring.authenticate("token-bbbb-1-bbbbbbbbb").id == "b"  # type: ignore[union-attr]
