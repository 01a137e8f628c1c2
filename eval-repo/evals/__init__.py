"""The evals shipped with run_eval.py, by name, in listing order."""

from __future__ import annotations

from typing import Dict

from .arithmetic import Arithmetic
from .capitals_qa import CapitalsQA
from .common import Eval
from .json_format import JsonFormat
from .mc_logprobs import MultipleChoiceLogprobs


def all_evals() -> Dict[str, Eval]:
    """A fresh instance of every eval, keyed by name."""
    evals = [Arithmetic(), CapitalsQA(), MultipleChoiceLogprobs(), JsonFormat()]
    return {ev.name: ev for ev in evals}
