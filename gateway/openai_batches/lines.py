"""Reading a batch input file line by line and checking each line, without holding the file in memory."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from gateway.batch.jobs import Endpoint, Submission, parse_submission
from gateway.errors import ApiError
from gateway.policy import ModelPolicy

READ_SIZE = 256 * 1024
CUSTOM_ID_MAX = 512
YIELD_LINES = 2048
"""Lines scanned (blank ones included) between two yields to the event loop: a block of READ_SIZE blank
lines is 256 Ki lines, far too long a stretch of CPU work for the loop that serves realtime traffic."""
_NEWLINES = re.compile(rb"\n+")


@dataclass(frozen=True, slots=True)
class RawLine:
    """One line of the input file: its 1-based number and bytes (None when longer than the limit)."""

    number: int
    data: bytes | None


async def read_lines(path: Path, size: int, max_line_bytes: int) -> AsyncIterator[RawLine]:
    """Yield the non-blank lines of the first `size` bytes of `path`.

    Memory stays bounded by READ_SIZE + max_line_bytes: a longer line is skipped up to its newline and
    reported with data=None. Reads are page-cache reads of a local file. The loop gets control back after
    every block and every YIELD_LINES lines scanned, blank or not, so no input (10 MiB of newlines, say)
    holds it for long; the consumer also yields every few lines it checks.
    """
    number = 0
    scanned = 0
    carry = bytearray()
    overflow = False
    remaining = size
    with path.open("rb") as f:
        while remaining > 0:
            block = f.read(min(READ_SIZE, remaining))
            if not block:
                break
            remaining -= len(block)
            start = 0
            while True:
                end = block.find(b"\n", start)
                if end < 0:
                    if not overflow:
                        carry += block[start:]
                        if len(carry) > max_line_bytes:
                            overflow = True
                            carry.clear()
                    break
                if end == start and not carry and not overflow:
                    # An empty line, maybe the first of a run: the run is counted at C speed rather than
                    # one Python turn per line.
                    run = _NEWLINES.match(block, start).end() - start  # type: ignore[union-attr]
                    number += run
                    scanned += run
                    start += run
                    if scanned >= YIELD_LINES:
                        scanned = 0
                        await asyncio.sleep(0)
                    continue
                number += 1
                scanned += 1
                if scanned >= YIELD_LINES:
                    scanned = 0
                    await asyncio.sleep(0)
                if overflow:
                    overflow = False
                    yield RawLine(number, None)
                else:
                    if carry:
                        carry += block[start:end]
                        line = bytes(carry)
                        carry.clear()
                    else:
                        line = block[start:end]
                    if len(line) > max_line_bytes:
                        yield RawLine(number, None)
                    elif line.strip():
                        yield RawLine(number, line)
                start = end + 1
            await asyncio.sleep(0)
    if overflow:
        yield RawLine(number + 1, None)
    elif carry.strip():
        yield RawLine(number + 1, bytes(carry))


@dataclass(frozen=True, slots=True)
class LineError:
    """Why one input line cannot run: becomes one line of the error file."""

    line: int
    custom_id: str | None
    code: str
    message: str
    param: str | None = None
    json_object: bool = True
    """False when the line is not even a JSON object (decides whether the file as a whole is JSONL)."""

    def to_output(self, batch_id: str) -> bytes:
        """This error as an error-file line (OpenAI's output-line format)."""
        return orjson.dumps({
            "id": f"{batch_id}_line_{self.line}", "custom_id": self.custom_id, "response": None,
            "error": {"code": self.code, "message": self.message, "param": self.param, "line": self.line},
        })


@dataclass(frozen=True, slots=True)
class GoodLine:
    """A line that will run: its custom_id and the job to enqueue."""

    line: int
    custom_id: str
    submission: Submission


@dataclass(frozen=True, slots=True)
class LineRules:
    """What every line of one batch is checked against."""

    endpoint: Endpoint
    priority: int
    batch_id: str
    max_metadata_items: int
    model_aliases: frozenset[str]
    realtime_model: str
    policy: ModelPolicy | None = None


def check_line(raw: RawLine, rules: LineRules, seen: set[str], max_line_bytes: int) -> GoodLine | LineError:
    """Check one line: a JSON object with a unique custom_id, method POST, url = the endpoint, a valid body.

    `seen` collects the custom_ids of earlier lines (a later duplicate is the bad one).
    """
    n = raw.number
    if raw.data is None:
        return LineError(n, None, "line_too_long", f"Line {n} is longer than {max_line_bytes} bytes "
                         "(MAX_BODY_BYTES).", json_object=False)
    try:
        data: Any = orjson.loads(raw.data)
    except orjson.JSONDecodeError as exc:
        return LineError(n, None, "invalid_json", f"Line {n} is not valid JSON: {exc}.", json_object=False)
    if not isinstance(data, dict):
        return LineError(n, None, "invalid_json", f"Line {n} must be a JSON object, not {type(data).__name__}.",
                         json_object=False)
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > CUSTOM_ID_MAX:
        return LineError(n, None, "invalid_custom_id", f"Line {n}: 'custom_id' must be a string of 1 to "
                         f"{CUSTOM_ID_MAX} characters.", param="custom_id")
    if custom_id in seen:
        return LineError(n, custom_id, "duplicate_custom_id", f"Line {n}: custom_id {custom_id!r} was already "
                         "used by an earlier line; custom_ids must be unique within a batch.", param="custom_id")
    seen.add(custom_id)
    if data.get("method") != "POST":
        return LineError(n, custom_id, "invalid_method", f"Line {n}: 'method' must be \"POST\".", param="method")
    if data.get("url") != rules.endpoint.value:
        return LineError(n, custom_id, "invalid_url", f"Line {n}: 'url' must be the batch's endpoint "
                         f"{rules.endpoint.value!r}, not {data.get('url')!r}.", param="url")
    body = data.get("body")
    if not isinstance(body, dict):
        return LineError(n, custom_id, "invalid_body", f"Line {n}: 'body' must be a JSON object (the request "
                         f"for {rules.endpoint.value}).", param="body")
    # `priority` and `metadata` are job fields to parse_submission; here they come from the batch.
    body = {k: v for k, v in body.items() if k not in ("priority", "metadata")}
    try:
        parsed = parse_submission(body, rules.endpoint, max_metadata_items=rules.max_metadata_items,
                                  model_aliases=rules.model_aliases, realtime_model=rules.realtime_model,
                                  policy=rules.policy)
    except ApiError as exc:
        param = f"body.{exc.param}" if exc.param else "body"
        return LineError(n, custom_id, "invalid_body", f"Line {n}: {exc.message}", param=param)
    submission = Submission(endpoint=parsed.endpoint, model=parsed.model, priority=rules.priority,
                            metadata={"openai_batch_id": rules.batch_id, "custom_id": custom_id, "line": str(n)},
                            body=parsed.body)
    return GoodLine(n, custom_id, submission)
