"""Runtime backends (docker, process, external) and the factory that picks one from settings."""

from __future__ import annotations

from gateway.backends.base import BackendError, ExitInfo, RuntimeBackend
from gateway.settings import RuntimeBackend as BackendKind
from gateway.settings import Settings

__all__ = ["BackendError", "ExitInfo", "RuntimeBackend", "make_backend"]


def make_backend(settings: Settings) -> RuntimeBackend:
    """The backend RUNTIME_BACKEND names, for RUNTIME_TYPE's flavour."""
    kind = BackendKind(settings.runtime_backend)
    if kind is BackendKind.DOCKER:
        from gateway.backends.docker import DockerBackend
        return DockerBackend(settings)
    if kind is BackendKind.EXTERNAL:
        from gateway.backends.external import ExternalBackend
        return ExternalBackend(settings)
    from gateway.backends.process import ProcessBackend
    return ProcessBackend(settings)
