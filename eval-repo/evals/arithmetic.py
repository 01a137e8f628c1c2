"""arithmetic: generated integer sums, differences and products, answered in a chat."""

from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Optional, Tuple, Union

from .common import Eval, Options, Rng, Sample, SampleResult, chat_content, clip, sampling_fields, strip_reasoning

NUM_SAMPLES = 200
NUM_FEW_SHOT = 16

# Thousands separators between digits ("1,234") are dropped before numbers are read.
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _problem(rng: Rng) -> Tuple[str, int]:
    op = rng.choice(["+", "-", "*"])
    if op == "*":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return f"{a} * {b}", a * b
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    return f"{a} {op} {b}", (a + b if op == "+" else a - b)


def _question(expression: str) -> str:
    return f"What is {expression}? Reply with just the number."


def parse_number(text: str) -> Optional[Union[int, float]]:
    """The last number in the text (the final answer of a worked reply), or None."""
    found = _NUMBER.findall(_THOUSANDS.sub("", text))
    if not found:
        return None
    token = found[-1]
    if "." not in token:
        try:
            return int(token)
        except ValueError:  # more digits than int() accepts from a string
            return None
    value = float(token)
    if not math.isfinite(value):
        return None
    return int(value) if value.is_integer() else value


class Arithmetic(Eval):
    """Exact integer answers to generated a+b, a-b, a*b questions."""

    name = "arithmetic"
    version = 1
    description = (
        "Integer addition, subtraction and multiplication generated deterministically; "
        "chat; exact numeric answer (the last number in the reply)."
    )
    request_type = "chat"
    suits_base_models = False
    metrics = ("accuracy",)
    primary_metric = "accuracy"
    default_max_tokens = 32
    default_few_shot = 0

    def build_samples(self) -> Tuple[List[Sample], List[Sample]]:
        def make(prefix: str, stream: str, count: int) -> List[Sample]:
            rng = Rng(self.name, self.version, stream)
            out = []
            for i in range(count):
                expression, result = _problem(rng)
                out.append(Sample(f"{prefix}-{i:03d}", {"expression": expression}, result))
            return out

        return make(self.name, "test", NUM_SAMPLES), make(f"{self.name}-shot", "few-shot", NUM_FEW_SHOT)

    def request_body(self, sample: Sample, shots: List[Sample], options: Options) -> Dict[str, Any]:
        messages: List[Dict[str, str]] = []
        for shot in shots:
            messages.append({"role": "user", "content": _question(shot.data["expression"])})
            messages.append({"role": "assistant", "content": str(shot.expected)})
        messages.append({"role": "user", "content": _question(sample.data["expression"])})
        return {"messages": messages, **sampling_fields(options)}

    def score_response(self, sample: Sample, body: Dict[str, Any]) -> SampleResult:
        text = chat_content(body)
        got = parse_number(strip_reasoning(text))
        correct = got is not None and got == sample.expected
        return SampleResult({"accuracy": 1.0 if correct else 0.0}, got=got, output=clip(text))
