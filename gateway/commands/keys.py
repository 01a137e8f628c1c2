"""`llm-gateway keys`: create, list and revoke keys in AUTH_KEYS_FILE.

The file is edited atomically, under a lock; a new token is printed once and stored as its sha256.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import secrets
import signal
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from gateway.commands.common import CliError, print_json, table
from gateway.keys import KEY_ID, KEY_ID_RULE, KeysFileError, Scope, hash_token, parse_keys
from gateway.settings import load_settings


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock beside the keys file, so two CLI runs never lose each other's change."""
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_keys(path: Path, *, missing_ok: bool) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return {"keys": []}
        raise CliError(f"AUTH_KEYS_FILE {path} does not exist") from None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise CliError(f"AUTH_KEYS_FILE {path} is not valid JSON: {exc}") from None
    if isinstance(data, list):
        data = {"keys": data}
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise CliError(f"AUTH_KEYS_FILE {path}: expected {{\"keys\": [...]}}")
    return data


def write_keys_atomically(path: Path, data: dict[str, Any]) -> None:
    """Validate, then replace the keys file in one rename (a reader sees the old or the new file)."""
    parse_keys(data, str(path))  # never write a file the gateway would refuse
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o640
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _keys_path(args: argparse.Namespace) -> Path:
    if args.keys_file:
        return Path(args.keys_file)
    return Path(load_settings().auth_keys_file)


def _reload(args: argparse.Namespace) -> None:
    pid: int | None = args.reload_pid
    if args.reload_pid_file:
        try:
            pid = int(Path(args.reload_pid_file).read_text().strip())
        except (OSError, ValueError) as exc:
            raise CliError(f"cannot read a pid from {args.reload_pid_file}: {exc}") from None
    if pid is None:
        print("The keys file changed; a running gateway picks it up on `systemctl reload llm-gateway` "
              "(or `kill -HUP <pid>`, `docker compose kill -s HUP orchestrator`).", file=sys.stderr)
        return
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        raise CliError(f"keys file written, but SIGHUP to pid {pid} failed: {exc.strerror}") from None
    print(f"Sent SIGHUP to pid {pid}: the gateway reloads the keys.", file=sys.stderr)


def _parse_scopes(raw: str) -> list[str]:
    scopes = sorted({s.strip().lower() for s in raw.split(",") if s.strip()})
    valid = {s.value for s in Scope}
    bad = [s for s in scopes if s not in valid]
    if not scopes or bad:
        raise CliError(f"--scopes must be a comma list of: {', '.join(s.value for s in Scope)}"
                       + (f" (unknown: {', '.join(bad)})" if bad else ""))
    return scopes


def keys_create(args: argparse.Namespace) -> int:
    """Add a key with a new random token; print the token once, store only its sha256."""
    path = _keys_path(args)
    scopes = _parse_scopes(args.scopes)
    key_id = args.id.strip()
    if not KEY_ID.match(key_id):
        raise CliError(f"the key id must be {KEY_ID_RULE}")
    token = f"{args.prefix}{secrets.token_urlsafe(32)}"
    with _locked(path):
        data = _read_keys(path, missing_ok=True)
        if any(isinstance(e, dict) and e.get("id") == key_id for e in data["keys"]):
            raise CliError(f"a key with id {key_id!r} already exists in {path}; revoke it first or pick another id")
        entry: dict[str, Any] = {"id": key_id, "token_sha256": hash_token(token), "scopes": scopes,
                                 "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
        if args.description:
            entry["description"] = args.description
        data["keys"].append(entry)
        try:
            write_keys_atomically(path, data)
        except KeysFileError as exc:
            raise CliError(str(exc)) from None
    print(f"Created key {key_id!r} with scopes {', '.join(scopes)} in {path}. The token is shown only now:",
          file=sys.stderr)
    print(token)
    _reload(args)
    return 0


def keys_list(args: argparse.Namespace) -> int:
    """List the keys (ids, scopes, how each token is stored; never a token)."""
    path = _keys_path(args)
    data = _read_keys(path, missing_ok=False)
    try:
        parse_keys(data, str(path))
    except KeysFileError as exc:
        print(f"warning: the gateway would refuse this file: {exc}", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    for entry in data["keys"]:
        if not isinstance(entry, dict):
            continue
        rows.append({"id": str(entry.get("id")), "scopes": entry.get("scopes") or [],
                     "stored": "sha256" if "token_sha256" in entry else "plain",
                     "disabled": entry.get("disabled") is True, "created_at": entry.get("created_at"),
                     "description": entry.get("description")})
    if args.json:
        print_json(rows)
    else:
        table([[r["id"], ",".join(r["scopes"]), r["stored"], "yes" if r["disabled"] else "no",
                 r["created_at"] or "-"] for r in rows], ["ID", "SCOPES", "TOKEN", "DISABLED", "CREATED"])
    return 0


def keys_revoke(args: argparse.Namespace) -> int:
    """Remove a key from the file (its token stops working once the gateway reloads)."""
    path = _keys_path(args)
    with _locked(path):
        data = _read_keys(path, missing_ok=False)
        kept = [e for e in data["keys"] if not (isinstance(e, dict) and e.get("id") == args.id)]
        if len(kept) == len(data["keys"]):
            raise CliError(f"no key with id {args.id!r} in {path}")
        data["keys"] = kept
        try:
            write_keys_atomically(path, data)
        except KeysFileError as exc:
            raise CliError(str(exc)) from None
    print(f"Revoked key {args.id!r} in {path}.", file=sys.stderr)
    _reload(args)
    return 0




def add_parser(sub: Any) -> None:
    """Add `keys create|list|revoke`."""
    keys = sub.add_parser("keys", help="create, list and revoke API keys in AUTH_KEYS_FILE")
    keys_sub = keys.add_subparsers(dest="keys_command")

    def keys_parser(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = keys_sub.add_parser(name, help=help_text)
        p.add_argument("--keys-file", help="the keys file (default: AUTH_KEYS_FILE)")
        return p

    def reload_options(p: argparse.ArgumentParser) -> None:
        group = p.add_mutually_exclusive_group()
        group.add_argument("--reload-pid", type=int, help="send SIGHUP to this gateway pid afterwards")
        group.add_argument("--reload-pid-file", help="send SIGHUP to the pid written in this file")

    create = keys_parser("create", "add a key; prints its new token once (only its sha256 is stored)")
    create.add_argument("id", help="key id (what usage, metrics and logs show)")
    create.add_argument("--scopes", required=True, help=f"comma list of: {', '.join(s.value for s in Scope)}")
    create.add_argument("--description", help="free text kept beside the key")
    create.add_argument("--prefix", default="llmgw-", help="token prefix (default llmgw-)")
    reload_options(create)
    create.set_defaults(func=keys_create)
    listing = keys_parser("list", "list key ids and scopes (never tokens)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=keys_list)
    revoke = keys_parser("revoke", "remove a key")
    revoke.add_argument("id")
    reload_options(revoke)
    revoke.set_defaults(func=keys_revoke)
