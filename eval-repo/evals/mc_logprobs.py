"""mc-logprobs: four-option multiple choice scored from the first token's top logprobs."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

from .common import (
    Eval,
    Options,
    Sample,
    SampleResult,
    clip,
    completion_first_top_logprobs,
    completion_text,
    read_jsonl,
    sampling_fields,
)

LETTERS = "ABCD"
# OpenAI's legacy completions API and older vLLM cap logprobs at 5 (newer vLLM at 20 by
# default). The best letter is found whenever any letter is in the top 5, so 5 is enough.
TOP_LOGPROBS = 5
_INSTRUCTION = (
    "The following are multiple choice questions. Answer with the letter of the correct option.\n\n"
)


def _block(sample: Sample) -> str:
    lines = [f"Question: {sample.data['question']}"]
    lines += [f"{letter}. {text}" for letter, text in zip(LETTERS, sample.data["choices"])]
    lines.append("Answer:")
    return "\n".join(lines)


def token_letter(token: str) -> Optional[str]:
    """The option letter a token stands for (" A", "A", "ĠA", "▁A"), or None.

    Lower case does not count: " a" after "Answer:" is the article far more often than a letter.
    """
    text = token.replace("Ġ", " ").replace("▁", " ").strip()
    return text if len(text) == 1 and text in LETTERS else None


def predict(top_logprobs: Dict[str, float], text: str) -> Optional[str]:
    """The predicted option letter, or None when neither logprobs nor text name one.

    Token variants of one letter (" A" and "A") add up as probabilities. Without any letter
    among the top logprobs, the first word of the generated text decides ("B", "B." or "(B)").
    """
    mass: Dict[str, float] = {}
    for token, logprob in top_logprobs.items():
        letter = token_letter(token)
        if letter is not None:
            mass[letter] = mass.get(letter, 0.0) + math.exp(logprob)
    if mass:
        # Ties go to the earlier letter so the result never depends on dict order.
        best = max(LETTERS, key=lambda letter: (mass.get(letter, -1.0), -LETTERS.index(letter)))
        return best
    words = text.split()
    return token_letter(words[0].strip(".):(")) if words else None


class MultipleChoiceLogprobs(Eval):
    """Shipped general-knowledge questions; the answer is the most probable option letter."""

    name = "mc-logprobs"
    version = 1
    description = (
        "Four-option general-knowledge multiple choice shipped in the repo; completion with "
        "max_tokens 1 and logprobs 5; the prediction is the option letter with the highest "
        "probability among the first token's top logprobs (falling back to the generated text)."
    )
    request_type = "completion"
    suits_base_models = True
    metrics = ("accuracy",)
    primary_metric = "accuracy"
    default_max_tokens = 1
    default_few_shot = 3

    def build_samples(self) -> Tuple[List[Sample], List[Sample]]:
        test: List[Sample] = []
        pool: List[Sample] = []
        for rec in read_jsonl("mc_questions.jsonl"):
            target = pool if rec["split"] == "few-shot" else test
            # Rotating the right answer through A-D keeps the letters balanced exactly.
            position = len(target) % len(LETTERS)
            choices = list(rec["distractors"])
            choices.insert(position, rec["correct"])
            prefix = self.name if target is test else f"{self.name}-shot"
            target.append(
                Sample(
                    f"{prefix}-{len(target):03d}",
                    {"question": rec["question"], "choices": choices},
                    LETTERS[position],
                )
            )
        return test, pool

    def request_body(self, sample: Sample, shots: List[Sample], options: Options) -> Dict[str, Any]:
        parts = [_INSTRUCTION]
        for shot in shots:
            parts.append(f"{_block(shot)} {shot.expected}\n\n")
        parts.append(_block(sample))
        return {"prompt": "".join(parts), **sampling_fields(options), "logprobs": TOP_LOGPROBS}

    def score_response(self, sample: Sample, body: Dict[str, Any]) -> SampleResult:
        text = completion_text(body)
        got = predict(completion_first_top_logprobs(body), text)
        return SampleResult(
            {"accuracy": 1.0 if got == sample.expected else 0.0}, got=got, output=clip(text)
        )
