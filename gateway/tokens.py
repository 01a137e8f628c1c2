"""How many tokens a runtime answer used, whatever the endpoint that produced it.

The OpenAI endpoints report usage in two vocabularies: completions, chat completions and embeddings say
`prompt_tokens` / `completion_tokens` (embeddings only the former), the Responses API says
`input_tokens` / `output_tokens`. Accounting (realtime, batch jobs, OpenAI batches) reads both through
this one module, so a new endpoint is taught here once.
"""

from __future__ import annotations

from typing import Any


def _count(value: Any) -> int:
    # bool is an int subclass; a runtime sending `true` as a count is treated as no count.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return 0
    return int(value)


def usage_tokens(usage: Any) -> tuple[int, int]:
    """(input, output) tokens of a `usage` object of any endpoint; (0, 0) when it is absent or malformed.

    Input is `prompt_tokens` (completions, chat, embeddings) or `input_tokens` (Responses); output is
    `completion_tokens` or `output_tokens`. An embeddings answer has no output tokens.
    """
    if not isinstance(usage, dict):
        return 0, 0
    if "input_tokens" in usage or "output_tokens" in usage:
        return _count(usage.get("input_tokens")), _count(usage.get("output_tokens"))
    return _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))


def response_tokens(body: Any) -> tuple[int, int]:
    """(input, output) tokens of a runtime's JSON answer (a parsed body) of any endpoint.

    The usage sits at the top level (`{"usage": {...}}`) for every endpoint's answer, and under
    `response` in the Responses API's stream events (`response.completed`).
    """
    if not isinstance(body, dict):
        return 0, 0
    usage = body.get("usage")
    if usage is None and isinstance(body.get("response"), dict):
        usage = body["response"].get("usage")
    return usage_tokens(usage)
