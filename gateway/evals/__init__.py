"""Evaluation harnesses the EvalRunner drives: the eval-repo protocol and the EuroEval command line.

docs/evals.md describes the runs, the API and how each harness is driven.
"""
