"""Shared pieces of the evals: the Eval base class, samples, a portable PRNG, response readers.

Standard library only and Python 3.9 syntax: run_eval.py must run on any machine with a python3.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, TypeVar

T = TypeVar("T")

DATA_DIR = Path(__file__).resolve().parent / "data"

# The raw model text echoed back per sample is cut here so a score document stays small.
OUTPUT_CHARS = 500


class MalformedResponse(Exception):
    """A response body that is not the OpenAI shape the eval needs (no choices, wrong types...)."""


@dataclass(frozen=True)
class Sample:
    """One eval item: a stable id, what the prompt needs, and the expected answer (JSON-able)."""

    id: str
    data: Dict[str, Any]
    expected: Any


@dataclass(frozen=True)
class Options:
    """Options after defaults are filled in; what prepare and score both see."""

    seed: int
    limit: Optional[int]
    max_tokens: int
    few_shot: int
    temperature: float
    json_mode: bool = False


@dataclass
class SampleResult:
    """The score of one sample: a value per metric, the parsed answer and the raw output."""

    scores: Dict[str, float]
    got: Any = None
    output: Optional[str] = None
    error: Optional[str] = None


class Rng:
    """A counter-mode SHA-256 generator.

    Python's `random` is stable in practice, but a hash of explicit bytes is stable by
    construction on every Python version and platform, which is what sample ids and
    generated data must be.
    """

    def __init__(self, *key: object) -> None:
        self._key = ":".join(str(part) for part in key)
        self._counter = 0

    def _next64(self) -> int:
        digest = hashlib.sha256(f"{self._key}:{self._counter}".encode("utf-8")).digest()
        self._counter += 1
        return int.from_bytes(digest[:8], "big")

    def randint(self, low: int, high: int) -> int:
        """An integer in [low, high]; the modulo bias over 2**64 is negligible for small spans."""
        return low + self._next64() % (high - low + 1)

    def choice(self, items: Sequence[T]) -> T:
        """One element of a non-empty sequence."""
        return items[self.randint(0, len(items) - 1)]

    def shuffled(self, items: Sequence[T]) -> List[T]:
        """A Fisher-Yates shuffled copy."""
        out = list(items)
        for i in range(len(out) - 1, 0, -1):
            j = self.randint(0, i)
            out[i], out[j] = out[j], out[i]
        return out


def hash_key(*parts: object) -> str:
    """A sort key that orders items pseudo-randomly but reproducibly for the given parts."""
    return hashlib.sha256(":".join(str(p) for p in parts).encode("utf-8")).hexdigest()


def read_jsonl(name: str) -> List[Dict[str, Any]]:
    """The records of a data file shipped in evals/data/."""
    records = []
    with open(DATA_DIR / name, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                records.append(json.loads(line))
    return records


class Eval:
    """Base class of an eval: metadata, its samples, how to ask, how to score one answer.

    Subclasses set the class attributes and implement `build_samples`, `request_body` and
    `score_response`. Changing anything that changes samples, ids, prompts or scoring means
    bumping `version` (see PROTOCOL.md, "Versioning").
    """

    name: str = ""
    version: int = 1
    description: str = ""
    request_type: str = "chat"  # "chat" or "completion"
    suits_base_models: bool = False
    metrics: Tuple[str, ...] = ("accuracy",)
    primary_metric: str = "accuracy"
    default_max_tokens: int = 32
    default_few_shot: int = 0
    default_temperature: float = 0.0
    # Options beyond the common ones that this eval understands (argparse dest names).
    extra_options: Tuple[str, ...] = ()

    def __init__(self) -> None:
        self._loaded: Optional[Tuple[List[Sample], List[Sample]]] = None

    @property
    def endpoint(self) -> str:
        """The OpenAI endpoint path the requests go to."""
        return "/v1/chat/completions" if self.request_type == "chat" else "/v1/completions"

    def _load(self) -> Tuple[List[Sample], List[Sample]]:
        if self._loaded is None:
            self._loaded = self.build_samples()
        return self._loaded

    @property
    def samples(self) -> List[Sample]:
        """The scored samples in canonical order."""
        return self._load()[0]

    @property
    def few_shot_pool(self) -> List[Sample]:
        """Solved examples for few-shot prompts; never among the scored samples."""
        return self._load()[1]

    def describe(self) -> Dict[str, Any]:
        """The entry of this eval in `run_eval.py list`."""
        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "request_type": self.request_type,
            "endpoint": self.endpoint,
            "suits_base_models": self.suits_base_models,
            "num_samples": len(self.samples),
            "metrics": list(self.metrics),
            "primary_metric": self.primary_metric,
            "defaults": {
                "max_tokens": self.default_max_tokens,
                "few_shot": self.default_few_shot,
                "temperature": self.default_temperature,
            },
            "max_few_shot": len(self.few_shot_pool),
            "extra_options": ["--" + opt.replace("_", "-") for opt in self.extra_options],
        }

    def build_samples(self) -> Tuple[List[Sample], List[Sample]]:
        """(scored samples, few-shot pool), deterministic."""
        raise NotImplementedError

    def request_body(self, sample: Sample, shots: List[Sample], options: Options) -> Dict[str, Any]:
        """The OpenAI request body without "model" (the caller adds it first)."""
        raise NotImplementedError

    def score_response(self, sample: Sample, body: Dict[str, Any]) -> SampleResult:
        """Score one successful response body; raise MalformedResponse if it has the wrong shape."""
        raise NotImplementedError

    def zero(self) -> Dict[str, float]:
        """Every metric at 0: the score of a sample whose request failed."""
        return {metric: 0.0 for metric in self.metrics}


def sampling_fields(options: Options) -> Dict[str, Any]:
    """The request fields every eval sets the same way."""
    return {
        "max_tokens": options.max_tokens,
        "temperature": options.temperature,
        "seed": options.seed,
    }


def _first_choice(body: Dict[str, Any]) -> Dict[str, Any]:
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        raise MalformedResponse("no choices in the response")
    choice = choices[0]
    if not isinstance(choice, dict):
        raise MalformedResponse("choices[0] is not an object")
    return choice


def chat_content(body: Dict[str, Any]) -> str:
    """choices[0].message.content of a chat completion ("" when the content is null)."""
    message = _first_choice(body).get("message")
    if not isinstance(message, dict):
        raise MalformedResponse("choices[0].message is missing or not an object")
    content = message.get("content")
    if content is None:
        return ""
    if not isinstance(content, str):
        raise MalformedResponse("choices[0].message.content is not a string")
    return content


def completion_text(body: Dict[str, Any]) -> str:
    """choices[0].text of a completion."""
    text = _first_choice(body).get("text")
    if not isinstance(text, str):
        raise MalformedResponse("choices[0].text is missing or not a string")
    return text


def completion_first_top_logprobs(body: Dict[str, Any]) -> Dict[str, float]:
    """The top_logprobs of the first generated token ({} when the server sent none)."""
    logprobs = _first_choice(body).get("logprobs")
    if logprobs is None:
        return {}
    if not isinstance(logprobs, dict):
        raise MalformedResponse("choices[0].logprobs is not an object")
    top = logprobs.get("top_logprobs")
    if not top:
        return {}
    if not isinstance(top, list):
        raise MalformedResponse("choices[0].logprobs.top_logprobs is not a list")
    first = top[0]
    if first is None:
        return {}
    if not isinstance(first, dict):
        raise MalformedResponse("choices[0].logprobs.top_logprobs[0] is not an object")
    out: Dict[str, float] = {}
    for token, logprob in first.items():
        if isinstance(logprob, (int, float)) and not isinstance(logprob, bool):
            out[token] = float(logprob)
    return out


_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


def strip_reasoning(text: str) -> str:
    """Drop <think>...</think> blocks of reasoning models; an unclosed block is all reasoning."""
    text = _THINK.sub("", text)
    start = text.find("<think>")
    return text[:start] if start >= 0 else text


def clip(text: str) -> str:
    """The raw model output as reported per sample."""
    return text if len(text) <= OUTPUT_CHARS else text[:OUTPUT_CHARS] + "…"


_NON_ALNUM = re.compile(r"[^a-z0-9 ]+")
_SEPARATORS = re.compile(r"[\s\-‐‑‒–—_/]+")


def normalize_answer(text: str) -> str:
    """Case, accents, punctuation and spacing folded away, and a leading "the" dropped.

    Hyphens and slashes become spaces ("Port-au-Prince" = "Port au Prince"); other
    punctuation disappears ("St. John's" = "St Johns", "D.C." = "DC").
    """
    decomposed = unicodedata.normalize("NFKD", text)
    folded = "".join(ch for ch in decomposed if not unicodedata.combining(ch)).lower()
    spaced = _SEPARATORS.sub(" ", folded)
    cleaned = _NON_ALNUM.sub("", spaced)
    words = cleaned.split()
    if words and words[0] == "the":
        words = words[1:]
    return " ".join(words)
