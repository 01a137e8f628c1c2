"""json-format: instruction following, the reply must be a JSON object with exactly the given keys."""

from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Optional, Tuple

from .common import Eval, Options, Rng, Sample, SampleResult, chat_content, clip, sampling_fields, strip_reasoning

NUM_SAMPLES = 120
NUM_FEW_SHOT = 4

_TYPE_WORDS = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "array of strings": "an array of strings",
}

# entity -> the keys it may be asked for, with their JSON types.
_ENTITIES: List[Tuple[str, List[Tuple[str, str]]]] = [
    ("person", [("name", "string"), ("age", "integer"), ("email", "string"), ("is_member", "boolean"),
                ("hobbies", "array of strings"), ("height_m", "number")]),
    ("book", [("title", "string"), ("author", "string"), ("year", "integer"), ("available", "boolean"),
              ("genres", "array of strings"), ("rating", "number")]),
    ("product", [("name", "string"), ("price", "number"), ("in_stock", "boolean"), ("quantity", "integer"),
                 ("tags", "array of strings"), ("sku", "string")]),
    ("city", [("name", "string"), ("country", "string"), ("population", "integer"), ("area_km2", "number"),
              ("is_capital", "boolean"), ("landmarks", "array of strings")]),
    ("movie", [("title", "string"), ("director", "string"), ("release_year", "integer"),
               ("duration_minutes", "integer"), ("rating", "number"), ("cast", "array of strings")]),
    ("recipe", [("name", "string"), ("servings", "integer"), ("prep_time_minutes", "integer"),
                ("vegetarian", "boolean"), ("ingredients", "array of strings"), ("calories", "number")]),
    ("car", [("make", "string"), ("model", "string"), ("year", "integer"), ("electric", "boolean"),
             ("price", "number"), ("features", "array of strings")]),
    ("company", [("name", "string"), ("founded", "integer"), ("employees", "integer"),
                 ("is_public", "boolean"), ("revenue_musd", "number"), ("products", "array of strings")]),
    ("song", [("title", "string"), ("artist", "string"), ("length_seconds", "integer"), ("explicit", "boolean"),
              ("bpm", "number"), ("genres", "array of strings")]),
    ("planet", [("name", "string"), ("moons", "integer"), ("mass_earths", "number"), ("has_rings", "boolean"),
                ("atmosphere_gases", "array of strings"), ("discovered_by", "string")]),
]

# Values for the few-shot answers, by type.
_EXAMPLE_VALUES: Dict[str, Any] = {
    "string": "Example",
    "integer": 42,
    "number": 3.5,
    "boolean": True,
    "array of strings": ["first", "second"],
}


def _instruction(entity: str, schema: Dict[str, str]) -> str:
    keys = "\n".join(f'- "{key}": {_TYPE_WORDS[kind]}' for key, kind in schema.items())
    return (
        f"Write a JSON object describing a fictional {entity}. The object must have exactly these "
        f"keys and no others:\n{keys}\nReply with the JSON object only, without any explanation."
    )


def type_matches(value: Any, kind: str) -> bool:
    """Whether a parsed JSON value has the named type (booleans are not numbers here)."""
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "array of strings":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    raise ValueError(f"unknown type {kind!r}")


def _unfence(text: str) -> str:
    """The body of a single surrounding Markdown code fence (```json ... ```), else the text."""
    if text.startswith("```") and text.endswith("```") and len(text) >= 6:
        inner = text[3:-3]
        newline = inner.find("\n")
        # The info string ("json") ends at the first newline.
        return inner[newline + 1:] if newline >= 0 else inner
    return text


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    # 1e999 parses to inf in Python; it is no JSON number a reader could use.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def parse_object(text: str) -> Tuple[Optional[Dict[str, Any]], bool]:
    """(the JSON object or None, whether it repeats a key). Strict JSON: no NaN or Infinity."""
    candidate = _unfence(strip_reasoning(text).strip()).strip()
    try:
        value = json.loads(candidate, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant,
                           parse_float=_finite_float)
    except _Duplicate:
        duplicated = True
    except (ValueError, RecursionError):
        return None, False
    else:
        return (value if isinstance(value, dict) else None), False
    # Parse again keeping the last value, so a repeated key is still valid JSON but no match.
    try:
        value = json.loads(candidate, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        return None, False
    return (value if isinstance(value, dict) else None), duplicated


class JsonFormat(Eval):
    """Chat instruction following: a JSON object with exactly the requested keys and types."""

    name = "json-format"
    version = 1
    description = (
        "Instruction following: reply with a JSON object that has exactly the requested keys, "
        "each of the requested type (string, integer, number, boolean, array of strings); "
        "generated deterministically; chat; --json-mode adds response_format json_object."
    )
    request_type = "chat"
    suits_base_models = False
    metrics = ("accuracy", "valid_json")
    primary_metric = "accuracy"
    default_max_tokens = 256
    default_few_shot = 0
    extra_options = ("json_mode",)

    def build_samples(self) -> Tuple[List[Sample], List[Sample]]:
        def make(prefix: str, stream: str, count: int) -> List[Sample]:
            rng = Rng(self.name, self.version, stream)
            out = []
            for i in range(count):
                entity, fields = rng.choice(_ENTITIES)
                chosen = rng.shuffled(fields)[: rng.randint(3, 5)]
                schema = {key: kind for key, kind in chosen}
                out.append(Sample(f"{prefix}-{i:03d}", {"entity": entity}, schema))
            return out

        return make(self.name, "test", NUM_SAMPLES), make(f"{self.name}-shot", "few-shot", NUM_FEW_SHOT)

    def request_body(self, sample: Sample, shots: List[Sample], options: Options) -> Dict[str, Any]:
        messages: List[Dict[str, str]] = []
        for shot in shots:
            answer = {key: _EXAMPLE_VALUES[kind] for key, kind in shot.expected.items()}
            messages.append({"role": "user", "content": _instruction(shot.data["entity"], shot.expected)})
            messages.append({"role": "assistant", "content": json.dumps(answer)})
        messages.append({"role": "user", "content": _instruction(sample.data["entity"], sample.expected)})
        body: Dict[str, Any] = {"messages": messages, **sampling_fields(options)}
        if options.json_mode:
            body["response_format"] = {"type": "json_object"}
        return body

    def score_response(self, sample: Sample, body: Dict[str, Any]) -> SampleResult:
        text = chat_content(body)
        obj, duplicated = parse_object(text)
        schema: Dict[str, str] = sample.expected
        follows = (
            obj is not None
            and not duplicated
            and set(obj) == set(schema)
            and all(type_matches(obj[key], kind) for key, kind in schema.items())
        )
        return SampleResult(
            {"accuracy": 1.0 if follows else 0.0, "valid_json": 0.0 if obj is None else 1.0},
            got=obj,
            output=clip(text),
        )
