"""Route scope markers: every handler declares the scope it needs, and the auth middleware enforces it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from gateway.keys import Scope

Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def requires_scope(scope: Scope) -> Callable[[Handler], Handler]:
    """Mark a handler as needing `scope`; the auth middleware enforces it."""

    def mark(handler: Handler) -> Handler:
        handler.required_scope = scope  # type: ignore[attr-defined]
        return handler

    return mark


def public(handler: Handler) -> Handler:
    """Mark a handler as needing no key (liveness, readiness); it takes no request body (413)."""
    handler.required_scope = None  # type: ignore[attr-defined]
    return handler


def public_form(max_body_bytes: int) -> Callable[[Handler], Handler]:
    """Mark a handler as needing no key and taking a small body of at most `max_body_bytes` (the login
    form): an unauthenticated client can never make the gateway buffer more than that."""

    def mark(handler: Handler) -> Handler:
        handler.required_scope = None  # type: ignore[attr-defined]
        handler.max_body_bytes = max_body_bytes  # type: ignore[attr-defined]
        return handler

    return mark
