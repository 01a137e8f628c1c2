"""structlog set-up: JSON (orjson) in production, console on a TTY, context variables merged first."""

from __future__ import annotations

import logging
import sys

import orjson
import structlog

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
    logging.basicConfig(level=max(_LEVELS[level], logging.WARNING), stream=sys.stderr)
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _WithholdRequestText) for f in server_log.filters):
        server_log.addFilter(_WithholdRequestText())


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A cached structlog logger carrying the component name."""
    return structlog.get_logger(component=name)  # type: ignore[no-any-return]
