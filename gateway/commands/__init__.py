"""The operator sub-commands of `llm-gateway`, one module per family (docs/operations.md, "CLI").

keys edit AUTH_KEYS_FILE; jobs and usage read and change Redis through the stores that own those
schemas, with the service's settings (REDIS_URL, REDIS_PREFIX); runtime talks to a running gateway's
HTTP API with a monitor token; nodes reads the fleet's node registry.
"""

from __future__ import annotations

from typing import Any

from gateway.commands import fleet, jobs, keys, runtime, usage
from gateway.commands.common import CliError, RunAsync

__all__ = ["CliError", "add_commands"]


def add_commands(sub: Any, run_async: RunAsync) -> None:
    """Add keys, jobs, usage, runtime and nodes to the `llm-gateway` sub-parsers."""
    keys.add_parser(sub)
    jobs.add_parser(sub, run_async)
    usage.add_parser(sub, run_async)
    runtime.add_parser(sub, run_async)
    fleet.add_parser(sub, run_async)
