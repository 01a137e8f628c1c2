"""structlog set-up: JSON (orjson) in production, console on a TTY, context variables merged first."""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog

_OURS = "_llm_gateway_handler"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _WithholdRequestText(logging.Filter):
    """aiohttp logs a malformed request with the offending header line quoted, which may hold a bearer
    token: keep the event and the error class, drop the quoted text (secrets never reach the logs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.getMessage()}: {type(record.exc_info[1]).__name__} (request text withheld)"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at the time (test runners swap and close it)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog once per process; safe to call again (tests do)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    if use_json:
        processors.append(structlog.processors.JSONRenderer(serializer=orjson.dumps))
        factory: structlog.types.WrappedLogger = structlog.BytesLoggerFactory(sys.stderr.buffer)
    else:
        processors.append(structlog.dev.ConsoleRenderer())
        factory = structlog.PrintLoggerFactory(sys.stderr)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,  # type: ignore[arg-type, unused-ignore]
        cache_logger_on_first_use=True,
    )
    # Standard-library loggers (aiohttp's, asyncio's, redis') go through structlog's renderer too, so the
    # log stays one JSON object per line; they keep their own level (warnings and up by default).
    foreign: list[structlog.types.Processor] = [
        structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True), structlog.processors.format_exc_info,
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer(serializer=lambda obj, **_: orjson.dumps(obj).decode()) if use_json
        else structlog.dev.ConsoleRenderer())
    handler = _StderrHandler()
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        foreign_pre_chain=foreign))
    setattr(handler, _OURS, True)
    root = logging.getLogger()
    for old_handler in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(old_handler)
    root.addHandler(handler)
    root.setLevel(max(_LEVELS[level], logging.WARNING))
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _WithholdRequestText) for f in server_log.filters):
        server_log.addFilter(_WithholdRequestText())


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A cached structlog logger carrying the component name."""
    return structlog.get_logger(component=name)  # type: ignore[no-any-return]
