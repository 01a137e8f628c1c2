"""Scoped bearer keys: the keys file, the keyring that reloads it, and the scope check.

Tokens are only ever hashed (sha256) and compared by digest; the rest of the gateway sees a key id.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import orjson
import structlog

log = structlog.get_logger(component="auth")

MIN_TOKEN_CHARS = 20
# Key ids reach Redis key names (usage hashes are `<id>:<day>`), metric labels and logs: a colon could make
# one key's id collide with another's usage hash, so ids are short words of letters, digits and `._-`.
KEY_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")
# The example keys file's plain tokens end so; they are public, so never served off loopback.
DEMO_TOKEN_SUFFIX = "-change-me"
KEY_ID_RULE = "1-64 characters of letters, digits, '.', '_' and '-', not starting with '.' or '-'"


class Scope(StrEnum):
    """What a key may do."""

    REALTIME = "realtime"
    BATCH = "batch"
    EVAL = "eval"
    UPLOAD = "upload"
    MONITOR = "monitor"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An authenticated caller: its id and scopes (never its token)."""

    id: str
    scopes: frozenset[Scope]

    def allows(self, scope: Scope) -> bool:
        """True when this key carries `scope`."""
        return scope in self.scopes


class KeysFileError(ValueError):
    """The keys file cannot be used; the message says why and where."""


def hash_token(token: str) -> str:
    """The sha256 hex digest under which a token is stored and looked up."""
    return hashlib.sha256(token.encode()).hexdigest()


def session_tag(digest: str) -> str:
    """What a dashboard session cookie carries of its key's token: a digest of the token's digest, so a
    cookie dies with the token it was made with (rotated, or the key revoked and recreated)."""
    return hashlib.sha256(b"dashboard-session:" + digest.encode()).hexdigest()[:32]


def parse_keys(data: Any, source: str = "keys file") -> dict[str, ApiKey]:
    """Validate the keys document and map token digest -> key.

    Accepted shapes: `{"keys": [...]}` or a bare list; each entry has `id`, `scopes` and either
    `token` (plain, for development) or `token_sha256` (for production files).
    """
    entries = data.get("keys") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise KeysFileError(f"{source}: expected {{\"keys\": [...]}} or a list of keys")
    by_digest: dict[str, ApiKey] = {}
    ids: set[str] = set()
    valid_scopes = ", ".join(s.value for s in Scope)
    for n, entry in enumerate(entries):
        where = f"{source}: key #{n + 1}"
        if not isinstance(entry, dict):
            raise KeysFileError(f"{where}: must be an object")
        key_id = entry.get("id")
        if not isinstance(key_id, str) or not key_id.strip():
            raise KeysFileError(f"{where}: needs a non-empty string 'id'")
        where = f"{source}: key {key_id!r}"
        if not KEY_ID.match(key_id):
            raise KeysFileError(f"{where}: an id must be {KEY_ID_RULE}")
        if key_id in ids:
            raise KeysFileError(f"{where}: duplicate id")
        ids.add(key_id)
        token, digest = entry.get("token"), entry.get("token_sha256")
        if (token is None) == (digest is None):
            raise KeysFileError(f"{where}: give exactly one of 'token' or 'token_sha256'")
        if token is not None:
            if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS:
                raise KeysFileError(f"{where}: 'token' must be a string of at least {MIN_TOKEN_CHARS} characters "
                                    "(`llm-gateway keys create` makes one)")
            digest = hash_token(token)
        elif not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef"
                                                                     for c in digest.lower()):
            raise KeysFileError(f"{where}: 'token_sha256' must be 64 hex digits")
        digest = digest.lower()
        if digest in by_digest:
            raise KeysFileError(f"{where}: same token as key {by_digest[digest].id!r}")
        scopes = entry.get("scopes")
        if not isinstance(scopes, list) or not scopes:
            raise KeysFileError(f"{where}: 'scopes' must be a non-empty list of: {valid_scopes}")
        try:
            parsed = frozenset(Scope(s) for s in scopes)
        except ValueError:
            bad = [s for s in scopes if s not in Scope.__members__.values()]
            raise KeysFileError(f"{where}: unknown scope {bad[0]!r}; use {valid_scopes}") from None
        if entry.get("disabled") is True:
            continue
        by_digest[digest] = ApiKey(id=key_id, scopes=parsed)
    return by_digest


class Keyring:
    """The current keys, loaded from AUTH_KEYS_FILE; `reload()` swaps them atomically."""

    def __init__(self, path: str | Path, *, refuse_demo_tokens: bool = False) -> None:
        self.path = Path(path)
        self.refuse_demo_tokens = refuse_demo_tokens
        self._keys: dict[str, ApiKey] = {}
        self._internal: dict[str, ApiKey] = {}
        # Internal tokens standing in for a key of the file (an eval run's): dropped with that key.
        self._internal_owner: dict[str, str] = {}
        self._tags: dict[str, str] = {}

    def load(self) -> None:
        """Load the file; raises KeysFileError with a clear message if it cannot be used."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            raise KeysFileError(f"AUTH_KEYS_FILE {self.path} does not exist; copy "
                                "config/example.keys.json there to start") from None
        except OSError as exc:
            raise KeysFileError(f"AUTH_KEYS_FILE {self.path}: {exc.strerror}") from None
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise KeysFileError(f"AUTH_KEYS_FILE {self.path} is not valid JSON: {exc}") from None
        keys = parse_keys(data, str(self.path))
        if self.refuse_demo_tokens:
            entries: list[Any] = (data.get("keys") if isinstance(data, dict) else data) or []
            demo = [e["id"] for e in entries if isinstance(e, dict) and isinstance(e.get("token"), str)
                    and e["token"].endswith(DEMO_TOKEN_SUFFIX) and not e.get("disabled")]
            if demo:
                raise KeysFileError(f"AUTH_KEYS_FILE {self.path}: key(s) {', '.join(demo)} use the public demo "
                                    f"tokens (ending {DEMO_TOKEN_SUFFIX!r}) while LISTEN_HOST is not a loopback "
                                    "address: create real keys with `llm-gateway keys create`, or listen on "
                                    "127.0.0.1")
        self._keys = keys
        self._tags = {key.id: session_tag(digest) for digest, key in keys.items()}
        ids = {key.id for key in keys.values()}
        for digest, owner in list(self._internal_owner.items()):
            if owner not in ids:
                self._internal.pop(digest, None)
                del self._internal_owner[digest]

    def reload(self) -> bool:
        """Reload the file; on any error keep the old keys, log why and return False."""
        try:
            self.load()
        except KeysFileError as exc:
            log.error("keys_reload_failed", error=str(exc), kept_keys=len(self._keys))
            return False
        log.info("keys_reloaded", keys=len(self._keys))
        return True

    def add_internal(self, token: str, key: ApiKey, *, owner: str | None = None) -> None:
        """Register a key that lives only in this process (e.g. an eval run's own token). With `owner`, the
        token stops working as soon as a reload no longer finds the file's key of that id."""
        digest = hash_token(token)
        self._internal[digest] = key
        if owner is not None:
            self._internal_owner[digest] = owner

    def remove_internal(self, token: str) -> None:
        """Revoke a token registered with `add_internal` (nothing happens for an unknown one)."""
        digest = hash_token(token)
        self._internal.pop(digest, None)
        self._internal_owner.pop(digest, None)

    @property
    def internal_count(self) -> int:
        """How many in-process tokens are registered now."""
        return len(self._internal)

    def session_tag(self, key_id: str) -> str | None:
        """The session tag of the current token of key `key_id` (see `session_tag`), or None."""
        return self._tags.get(key_id)

    def authenticate(self, token: str) -> ApiKey | None:
        """The key for this bearer token, or None."""
        # Lookup is by sha256 digest, so timing reveals nothing useful about a stored token.
        digest = hash_token(token)
        return self._keys.get(digest) or self._internal.get(digest)

    def by_id(self, key_id: str) -> ApiKey | None:
        """The current key with this id, or None (revoked, disabled or never known)."""
        for key in (*self._keys.values(), *self._internal.values()):
            if key.id == key_id:
                return key
        return None

    def __len__(self) -> int:
        return len(self._keys)
