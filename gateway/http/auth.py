"""Route scope markers: every handler declares the scope it needs, and the auth middleware enforces it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from gateway.keys import Scope

Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])

MODEL_READERS = (Scope.REALTIME, Scope.BATCH, Scope.EVAL)
"""Who may list and look up the served models (read only): realtime keys, and batch and eval keys, whose
jobs and runs name a model and whose clients check connectivity with `models.list()`."""


def requires_scope(scope: Scope, *also: Scope) -> Callable[[Handler], Handler]:
    """Mark a handler as needing `scope` (or any of `also`); the auth middleware enforces it.

    `required_scope` is the route's own scope (documented as x-required-scope); `accepted_scopes` is every
    scope that lets a key in.
    """

    def mark(handler: Handler) -> Handler:
        handler.required_scope = scope  # type: ignore[attr-defined]
        handler.accepted_scopes = frozenset((scope, *also))  # type: ignore[attr-defined]
        return handler

    return mark


def reads_models(handler: Handler) -> Handler:
    """Mark a read-only model route (GET /v1/models, GET /v1/models/{id}): any of MODEL_READERS may call it."""
    return requires_scope(*MODEL_READERS)(handler)


def accepted_scopes(handler: object) -> frozenset[Scope]:
    """The scopes that let a key call `handler` (empty for a public or undeclared route)."""
    accepted = getattr(handler, "accepted_scopes", None)
    if isinstance(accepted, frozenset):
        return accepted
    scope = getattr(handler, "required_scope", None)
    return frozenset({scope}) if isinstance(scope, Scope) else frozenset()


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
