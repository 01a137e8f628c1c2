"""The eval-repo harness: `run_eval.py list | prepare | score` as subprocesses (eval-repo/PROTOCOL.md)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson
import structlog

from gateway.evals.process import run_program

log = structlog.get_logger(component="eval_repo")

PROTOCOL_VERSION = 2

# API option name -> run_eval.py flag. `prepare` and `score` take the same options (PROTOCOL.md, Options).
OPTION_FLAGS: dict[str, str] = {
    "limit": "--limit",
    "seed": "--seed",
    "max_tokens": "--max-tokens",
    "few_shot": "--few-shot",
    "temperature": "--temperature",
    "json_mode": "--json-mode",
}


class EvalRepoError(Exception):
    """run_eval.py failed: PROTOCOL.md's error code (or `unavailable` / `bad_output`), its exit code, message."""

    def __init__(self, message: str, *, code: str, exit_code: int | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.exit_code = exit_code
        self.stderr = stderr


def option_args(options: Mapping[str, Any]) -> list[str]:
    """The command-line flags for validated options (booleans are flags, the rest take a value)."""
    args: list[str] = []
    for name, flag in OPTION_FLAGS.items():
        value = options.get(name)
        if value is None or value is False:
            continue
        if value is True:
            args.append(flag)
        else:
            args.extend((flag, repr(value) if isinstance(value, float) else str(value)))
    return args


class EvalRepo:
    """Calls one eval-repo checkout's run_eval.py; the `list` output is read once and cached."""

    def __init__(self, repo_dir: str | Path, *, python: str = sys.executable, timeout: float = 300.0) -> None:
        self.repo_dir = Path(repo_dir)
        self.python = python
        self.timeout = timeout
        self._evals: list[dict[str, Any]] | None = None

    @property
    def script(self) -> Path:
        """The protocol's entry point."""
        return self.repo_dir / "run_eval.py"

    async def list_evals(self) -> list[dict[str, Any]]:
        """The `list` output (every eval with its metadata); cached after the first success."""
        if self._evals is None:
            data = orjson.loads(await self._call(["list"]))
            if not isinstance(data, list) or not all(isinstance(e, dict) and isinstance(e.get("name"), str)
                                                     for e in data):
                raise EvalRepoError("run_eval.py list did not print a list of evals", code="bad_output")
            self._evals = data
        return self._evals

    async def eval_info(self, name: str) -> dict[str, Any] | None:
        """The `list` entry of one eval, or None when there is no such eval."""
        for info in await self.list_evals():
            if info["name"] == name:
                return info
        return None

    async def prepare(self, eval_name: str, model: str, options: Mapping[str, Any]) -> list[bytes]:
        """The request lines `prepare` prints (each `{id, endpoint, body}`), in run order, as raw JSON."""
        out = await self._call(["prepare", eval_name, model, *option_args(options)])
        lines = [line for line in out.splitlines() if line.strip()]
        for n, line in enumerate(lines, 1):
            try:
                request = orjson.loads(line)
            except orjson.JSONDecodeError:
                raise EvalRepoError(f"run_eval.py prepare printed invalid JSON on line {n}",
                                    code="bad_output") from None
            if not (isinstance(request, dict) and isinstance(request.get("id"), str)
                    and isinstance(request.get("endpoint"), str) and isinstance(request.get("body"), dict)):
                raise EvalRepoError(f"run_eval.py prepare line {n} is not an {{id, endpoint, body}} object",
                                    code="bad_output")
        return lines

    async def score(self, eval_name: str, options: Mapping[str, Any], lines: Iterable[bytes]) -> dict[str, Any]:
        """The score document for the `{id, response}` / `{id, error}` lines.

        The run answered every sample its options select (a failed request is an `{id, error}` line), so
        it asks `score` to hold stdin to that selection: a lost answer is an error, not a smaller n.
        """
        stdin = b"".join(line.rstrip(b"\n") + b"\n" for line in lines)
        out = await self._call(["score", eval_name, *option_args(options), "--same-selection"], stdin=stdin)
        try:
            result = orjson.loads(out)
        except orjson.JSONDecodeError:
            raise EvalRepoError("run_eval.py score did not print a JSON document", code="bad_output") from None
        if not isinstance(result, dict) or not isinstance(result.get("metrics"), dict):
            raise EvalRepoError("run_eval.py score printed no metrics", code="bad_output")
        version = result.get("protocol_version")
        if version != PROTOCOL_VERSION:
            raise EvalRepoError(f"run_eval.py speaks protocol version {version!r}; this gateway knows "
                                f"{PROTOCOL_VERSION}", code="protocol_version")
        return result

    async def _call(self, args: list[str], stdin: bytes | None = None) -> bytes:
        if not self.script.is_file():
            raise EvalRepoError(f"{self.script} does not exist (set EVAL_REPO_DIR to the eval-repo checkout)",
                                code="unavailable")
        try:
            done = await run_program([self.python, str(self.script), *args], stdin=stdin, timeout=self.timeout)
        except TimeoutError:
            raise EvalRepoError(f"run_eval.py {args[0]} did not finish within {self.timeout:g} s",
                                code="timeout") from None
        except OSError as exc:
            raise EvalRepoError(f"cannot run {self.python}: {exc}", code="unavailable") from None
        if done.returncode == 0:
            return done.stdout
        stderr = done.stderr.decode(errors="replace").strip()
        code, message = "internal", ""
        try:
            error = orjson.loads(done.stdout).get("error")
            code, message = str(error["code"]), str(error["message"])
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
            # Not the protocol's error document (a crash, a wrong script): the last stderr line says most.
            message = stderr.splitlines()[-1] if stderr else f"exited with status {done.returncode}"
        log.info("run_eval_failed", command=args[0], exit_code=done.returncode, code=code, message=message)
        raise EvalRepoError(f"run_eval.py {args[0]} failed ({code}, exit {done.returncode}): {message}",
                            code=code, exit_code=done.returncode, stderr=stderr[-2000:])
