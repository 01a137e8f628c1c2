"""What clients may ask the GPU for: which models, and how much generation per request.

A batch request, a Batches line or an eval run names a model, and a model other than the realtime one makes
the runtime load it (with vLLM: any local path or any Hugging Face repository). So only the realtime model,
its aliases and the names or glob patterns of BATCH_MODELS are accepted (default: none, so the realtime
model only); anything else is a 400 naming the setting. Model names are bounded in length and characters
before they reach argv, a file name, a log line or a metric label. `n` and `max_tokens` are bounded by
REQUEST_MAX_N and REQUEST_MAX_TOKENS for realtime and batch alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from gateway.errors import bad_request
from gateway.settings import Settings

MODEL_NAME_MAX = 200
# Hugging Face ids (org/name), local served names, revisions after '@' or ':'; never a leading '/' or '.'
# (an absolute or relative path) and never a '..' segment.
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/:@+-]*$")
MODEL_NAME_RULE = (f"at most {MODEL_NAME_MAX} characters of letters, digits and ._/:@+-, starting with a letter, "
                   "digit or '_', with no '..'")


def shown(text: str, limit: int = 80) -> str:
    """A client-given name fit for an error message: quoted, cut short, control characters escaped."""
    cut = text[:limit]
    return repr(cut) + ("..." if len(text) > limit else "")


def valid_model_name(name: str) -> bool:
    """True when `name` is bounded and made only of the characters a model id uses."""
    return len(name) <= MODEL_NAME_MAX and _MODEL_NAME.match(name) is not None and ".." not in name


def check_model_name(name: str, param: str = "model") -> str:
    """`name`, or a 400 when it is too long or holds characters no model id has."""
    if not valid_model_name(name):
        raise bad_request(f"Model {shown(name)} is not a model name: use {MODEL_NAME_RULE} (an operator may "
                          "allow another name by listing it exactly in BATCH_MODELS).", param=param,
                          code="invalid_model")
    return name


def _bounded_int(data: dict[str, Any], field: str, high: int, setting: str) -> None:
    # Only the bound: other wrong values (types, zero) are the runtime's to refuse, with its own message.
    value = data.get(field)
    if isinstance(value, int) and not isinstance(value, bool) and value > high:
        raise bad_request(f"'{field}' may be at most {high} on this gateway ({setting}), not {value}.",
                          param=field, code="limit_exceeded")


@dataclass(frozen=True, slots=True)
class ModelPolicy:
    """The model allowlist and the per-request generation bounds, from the settings."""

    realtime_model: str
    aliases: frozenset[str]
    batch_models: tuple[str, ...]
    max_n: int
    max_tokens: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelPolicy:
        """The policy the settings describe."""
        return cls(settings.realtime_model, settings.aliases, settings.batch_model_patterns,
                   settings.request_max_n, settings.request_max_tokens)

    def batch_allows(self, model: str) -> bool:
        """True when batch work may run `model` (after alias resolution; a pattern matches only a name that
        passes `valid_model_name`, which `batch_model` checks first)."""
        return model == self.realtime_model or any(fnmatchcase(model, p) for p in self.batch_models)

    def batch_model(self, model: str, param: str = "model") -> str:
        """The model a batch request (or eval run) names, resolved from an alias, or a 400 naming BATCH_MODELS."""
        if model in self.aliases or model == self.realtime_model:
            return self.realtime_model
        if model in self.batch_models:
            return model  # named by the operator, exactly (it may be a local path)
        check_model_name(model, param)
        if not self.batch_allows(model):
            allowed = ", ".join(self.batch_models) if self.batch_models else "none"
            raise bad_request(f"Model {shown(model)} is not allowed here: batch work runs the realtime model "
                              f"'{self.realtime_model}' (or an alias) and the models of BATCH_MODELS (now: "
                              f"{allowed}); ask the operator to add it to BATCH_MODELS.", param=param,
                              code="model_not_allowed")
        return model

    def check_generation(self, data: dict[str, Any]) -> None:
        """A 400 when `n`, `best_of`, `max_tokens` or `max_completion_tokens` exceed the configured bounds."""
        check_generation(data, self.max_n, self.max_tokens)


def check_generation(data: dict[str, Any], max_n: int, max_tokens: int) -> None:
    """A 400 when `n`, `best_of`, `max_tokens` or `max_completion_tokens` exceed REQUEST_MAX_N/_TOKENS."""
    _bounded_int(data, "n", max_n, "REQUEST_MAX_N")
    _bounded_int(data, "best_of", max_n, "REQUEST_MAX_N")
    _bounded_int(data, "max_tokens", max_tokens, "REQUEST_MAX_TOKENS")
    _bounded_int(data, "max_completion_tokens", max_tokens, "REQUEST_MAX_TOKENS")
