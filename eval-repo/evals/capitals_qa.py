"""capitals-qa: the capital of a country, exact match after normalisation, on a completion model."""

from __future__ import annotations

import re
from typing import Any, Dict, List, Tuple

from .common import (
    Eval,
    Options,
    Sample,
    SampleResult,
    clip,
    completion_text,
    normalize_answer,
    read_jsonl,
    sampling_fields,
)

_INSTRUCTION = "Answer each question with the name of a city.\n\n"
_SLUG = re.compile(r"[^a-z0-9]+")


def _slug(country: str) -> str:
    return _SLUG.sub("-", normalize_answer(country)).strip("-")


def _qa(country: str) -> str:
    return f"Question: What is the capital of {country}?\nAnswer:"


class CapitalsQA(Eval):
    """Exact-match QA over a shipped table of countries and capitals (with accepted aliases)."""

    name = "capitals-qa"
    version = 1
    description = (
        "The capital city of a country, from a table shipped in the repo; completion with "
        "few-shot Question/Answer lines; exact match after case, accent and punctuation folding."
    )
    request_type = "completion"
    suits_base_models = True
    metrics = ("exact_match",)
    primary_metric = "exact_match"
    default_max_tokens = 16
    default_few_shot = 3

    def build_samples(self) -> Tuple[List[Sample], List[Sample]]:
        test: List[Sample] = []
        pool: List[Sample] = []
        for rec in read_jsonl("capitals.jsonl"):
            sample = Sample(
                f"{self.name}-{_slug(rec['country'])}",
                {"country": rec["country"], "aliases": rec["aliases"]},
                rec["capital"],
            )
            (pool if rec["split"] == "few-shot" else test).append(sample)
        return test, pool

    def request_body(self, sample: Sample, shots: List[Sample], options: Options) -> Dict[str, Any]:
        parts = [_INSTRUCTION]
        for shot in shots:
            parts.append(f"{_qa(shot.data['country'])} {shot.expected}\n\n")
        parts.append(_qa(sample.data["country"]))
        # The stop keeps the answer to one line: base models would go on to invent the next question.
        return {"prompt": "".join(parts), **sampling_fields(options), "stop": ["\n"]}

    def score_response(self, sample: Sample, body: Dict[str, Any]) -> SampleResult:
        text = completion_text(body)
        stripped = text.strip()
        first_line = stripped.splitlines()[0].strip() if stripped else ""
        accepted = {normalize_answer(a) for a in [sample.expected, *sample.data["aliases"]]}
        correct = bool(first_line) and normalize_answer(first_line) in accepted
        return SampleResult({"exact_match": 1.0 if correct else 0.0}, got=first_line, output=clip(text))
