#!/usr/bin/env python3
"""The eval-repo protocol: list evals, prepare OpenAI requests, score the responses.

    python3 run_eval.py list [--base-model]
    python3 run_eval.py prepare <eval> <model> [--limit N] [--seed S] [--max-tokens N]
                                              [--few-shot N] [--temperature T] [--json-mode]
    python3 run_eval.py score <eval> [options] [--same-selection [--allow-missing]] < responses.jsonl
    python3 run_eval.py version

PROTOCOL.md is the contract (schemas, exit codes, error messages, versioning). Standard
library only, Python 3.9+, so it runs with any python3 and no install.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import IO, Any, Dict, List, NoReturn, Optional, Sequence, Set, Tuple

# The evals package sits next to this file. `python -P` or an embedding caller may not put
# the script's directory first on sys.path, and an unrelated installed "evals" must not win.
_HERE = str(Path(__file__).resolve().parent)
if sys.path[0] != _HERE:
    sys.path.insert(0, _HERE)

from evals import all_evals  # noqa: E402
from evals.common import Eval, MalformedResponse, Options, Sample, SampleResult, hash_key  # noqa: E402

PROTOCOL_VERSION = 2

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_UNKNOWN_EVAL = 3
EXIT_BAD_INPUT = 4
EXIT_IDS = 5

# How many ids a one-line message names before it says "and N more" (the JSON error lists all).
_IDS_IN_MESSAGE = 10


class ProtocolError(Exception):
    """A failure reported to the caller: an exit code, a stable error code, a message, details."""

    def __init__(self, exit_code: int, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.code = code
        self.message = message
        self.details = details


class _Parser(argparse.ArgumentParser):
    """argparse that raises ProtocolError instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise ProtocolError(EXIT_USAGE, "usage", message)


def _int_at_least(minimum: int, maximum: Optional[int] = None) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or not 0.0 <= value <= 2.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2, got {text}")
    return value


def _model_name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _add_selection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=_int_at_least(1), default=None,
                        help="score at most N samples (the first N in the seed's order)")
    parser.add_argument("--seed", type=_int_at_least(0, 2**63 - 1), default=0,
                        help="orders the samples, picks few-shot examples, sent as the request seed")
    parser.add_argument("--max-tokens", type=_int_at_least(1), default=None,
                        help="max_tokens of each request (default: the eval's)")
    parser.add_argument("--few-shot", type=_int_at_least(0), default=None,
                        help="solved examples in each prompt (default: the eval's)")
    parser.add_argument("--temperature", type=_temperature, default=None,
                        help="sampling temperature (default: the eval's, 0)")
    parser.add_argument("--json-mode", action="store_true",
                        help='json-format only: ask for response_format {"type": "json_object"}')


def build_parser() -> argparse.ArgumentParser:
    """The command line of run_eval.py."""
    parser = _Parser(prog="run_eval.py", description=__doc__.splitlines()[0], allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", metavar="{list,prepare,score,version}")
    commands.required = True

    listing = commands.add_parser("list", help="JSON list of the evals", allow_abbrev=False)
    listing.add_argument("--base-model", action="store_true", help="only the evals that suit base models")

    prepare = commands.add_parser("prepare", help="one OpenAI request per line", allow_abbrev=False)
    prepare.add_argument("eval_name", metavar="eval")
    prepare.add_argument("model", type=_model_name)
    _add_selection_options(prepare)

    score = commands.add_parser("score", help="score {id, response} lines read on stdin", allow_abbrev=False)
    score.add_argument("eval_name", metavar="eval")
    _add_selection_options(score)
    score.add_argument("--same-selection", action="store_true",
                       help="hold stdin to the samples these options select: every one needs a line")
    score.add_argument("--allow-missing", action="store_true",
                       help="with --same-selection (implied): score the answered samples when some have no "
                            "line (a cancelled run)")

    commands.add_parser("version", help="the protocol version", allow_abbrev=False)
    return parser


def _find_eval(name: str) -> Eval:
    evals = all_evals()
    if name not in evals:
        known = ", ".join(evals)
        raise ProtocolError(EXIT_UNKNOWN_EVAL, "unknown_eval", f"unknown eval {name!r} (known: {known})",
                            eval=name, known=list(evals))
    return evals[name]


def resolve_options(ev: Eval, args: argparse.Namespace) -> Options:
    """The command-line options checked against the eval, defaults filled in."""
    if args.json_mode and "json_mode" not in ev.extra_options:
        raise ProtocolError(EXIT_USAGE, "usage", f"--json-mode is not an option of eval {ev.name!r}")
    few_shot = ev.default_few_shot if args.few_shot is None else args.few_shot
    pool = len(ev.few_shot_pool)
    if few_shot > pool:
        raise ProtocolError(EXIT_USAGE, "usage",
                            f"--few-shot {few_shot} is more than the {pool} examples eval {ev.name!r} has")
    return Options(
        seed=args.seed,
        limit=args.limit,
        max_tokens=ev.default_max_tokens if args.max_tokens is None else args.max_tokens,
        few_shot=few_shot,
        temperature=ev.default_temperature if args.temperature is None else args.temperature,
        json_mode=args.json_mode,
    )


def select(ev: Eval, options: Options) -> List[Tuple[Sample, List[Sample]]]:
    """The samples to run, in order, each with its few-shot examples.

    Sorting by a hash of (seed, id) makes --limit N the first N of the full order for that
    seed, and gives every sample its own examples without depending on which others run.
    """
    order = sorted(ev.samples, key=lambda s: hash_key(ev.name, ev.version, options.seed, s.id))
    if options.limit is not None:
        order = order[: options.limit]
    selected = []
    for sample in order:
        shots: List[Sample] = []
        if options.few_shot:
            ranked = sorted(ev.few_shot_pool,
                            key=lambda p: hash_key(ev.name, ev.version, options.seed, sample.id, p.id))
            shots = ranked[: options.few_shot]
        selected.append((sample, shots))
    return selected


def _options_doc(options: Options) -> Dict[str, Any]:
    return {
        "seed": options.seed,
        "limit": options.limit,
        "max_tokens": options.max_tokens,
        "few_shot": options.few_shot,
        "temperature": options.temperature,
        "json_mode": options.json_mode,
    }


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def cmd_list(args: argparse.Namespace) -> List[str]:
    """`list`: one JSON document, a list of eval descriptions."""
    evals = [ev.describe() for ev in all_evals().values() if ev.suits_base_models or not args.base_model]
    return [_dumps(evals)]


def cmd_prepare(args: argparse.Namespace) -> List[str]:
    """`prepare`: one request line per selected sample."""
    ev = _find_eval(args.eval_name)
    options = resolve_options(ev, args)
    lines = []
    for sample, shots in select(ev, options):
        # "model" first so a reader of the JSONL sees it without scrolling past a long prompt.
        body = {"model": args.model, **ev.request_body(sample, shots, options)}
        lines.append(_dumps({"id": sample.id, "endpoint": ev.endpoint, "body": body}))
    return lines


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        message = error.get("message")
        if isinstance(message, str) and message:
            return message
    if isinstance(error, str) and error:
        return error
    return json.dumps(error, ensure_ascii=False)


def response_body(line: Dict[str, Any]) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """(the OpenAI response body, None) or (None, why this sample's request failed)."""
    if line.get("error") is not None:
        return None, _error_text(line["error"])
    response = line.get("response")
    # The OpenAI Batch output shape {"status_code", "body"} is unwrapped for convenience.
    if isinstance(response, dict) and "status_code" in response and "body" in response:
        status = response["status_code"]
        inner = response["body"]
        if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status < 300:
            detail = inner.get("error") if isinstance(inner, dict) and "error" in inner else inner
            return None, f"HTTP {status}: {_error_text(detail)}"
        response = inner
    if response is None:
        return None, "no response"
    if not isinstance(response, dict):
        return None, "the response is not a JSON object"
    if response.get("error") is not None:
        return None, _error_text(response["error"])
    return response, None


def _read_lines(stream: IO[bytes], known: Set[str], among: str) -> Dict[str, Dict[str, Any]]:
    """The stdin lines by id; the first protocol problem raises with its line number.

    `known` are the ids a line may have; `among` says what they are, for the unknown_id message.
    """
    lines: Dict[str, Dict[str, Any]] = {}
    first_line: Dict[str, int] = {}
    for number, raw in enumerate(stream, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ProtocolError(EXIT_BAD_INPUT, "bad_json", f"stdin line {number}: not UTF-8", line=number) from None
        except (ValueError, RecursionError) as exc:
            raise ProtocolError(EXIT_BAD_INPUT, "bad_json", f"stdin line {number}: invalid JSON: {exc}",
                                line=number) from None
        if (
            not isinstance(obj, dict)
            or not isinstance(obj.get("id"), str)
            or not obj["id"]
            or ("response" not in obj and "error" not in obj)
        ):
            raise ProtocolError(
                EXIT_BAD_INPUT, "bad_line",
                f'stdin line {number}: expected an object with a non-empty string "id" and a '
                f'"response" (or "error")',
                line=number,
            )
        sample_id = obj["id"]
        if sample_id not in known:
            raise ProtocolError(
                EXIT_IDS, "unknown_id",
                f"stdin line {number}: unknown id {sample_id!r} ({among})",
                line=number, id=sample_id,
            )
        if sample_id in lines:
            raise ProtocolError(
                EXIT_IDS, "duplicate_id",
                f"stdin line {number}: duplicate id {sample_id!r} (first on line {first_line[sample_id]})",
                line=number, id=sample_id, first_line=first_line[sample_id],
            )
        lines[sample_id] = obj
        first_line[sample_id] = number
    return lines


def mean_and_stderr(values: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    """The mean and its standard error (sample standard deviation / sqrt(n)); None if undefined."""
    n = len(values)
    if n == 0:
        return None, None
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def cmd_score(args: argparse.Namespace, stdin: IO[bytes]) -> List[str]:
    """`score`: one JSON document with metrics and per-sample scores.

    By default it scores exactly the samples that have a line on stdin, whatever selected them; with
    --same-selection (or --allow-missing) stdin is held to what these options select, as `prepare` did.
    """
    ev = _find_eval(args.eval_name)
    options = resolve_options(ev, args)
    same_selection = args.same_selection or args.allow_missing
    if same_selection:
        selected = [sample for sample, _shots in select(ev, options)]
        among = f"not among the {len(selected)} samples these options select"
        lines = _read_lines(stdin, {sample.id for sample in selected}, among)
    else:
        # The run order of every sample for this seed, kept to the ones answered.
        everything = [sample for sample, _shots in select(ev, dataclasses.replace(options, limit=None))]
        among = f"not a sample of eval {ev.name!r}, version {ev.version}"
        lines = _read_lines(stdin, {sample.id for sample in everything}, among)
        selected = [sample for sample in everything if sample.id in lines]

    missing = [sample.id for sample in selected if sample.id not in lines]
    if missing and not args.allow_missing:
        named = ", ".join(missing[:_IDS_IN_MESSAGE])
        more = f" and {len(missing) - _IDS_IN_MESSAGE} more" if len(missing) > _IDS_IN_MESSAGE else ""
        raise ProtocolError(
            EXIT_IDS, "missing_ids",
            f"{len(missing)} of the {len(selected)} selected samples have no line on stdin: {named}{more}",
            missing=missing,
        )

    samples_out = []
    per_metric: Dict[str, List[float]] = {metric: [] for metric in ev.metrics}
    errors = 0
    for sample in selected:
        if sample.id not in lines:
            continue
        body, error = response_body(lines[sample.id])
        if body is not None:
            try:
                result = ev.score_response(sample, body)
            except MalformedResponse as exc:
                error = f"malformed response: {exc}"
        if error is not None:
            errors += 1
            result = SampleResult(ev.zero(), error=error)
        for metric in ev.metrics:
            per_metric[metric].append(result.scores[metric])
        samples_out.append({
            "id": sample.id,
            "score": result.scores[ev.primary_metric],
            "scores": result.scores,
            "expected": sample.expected,
            "got": result.got,
            "output": result.output,
            "error": result.error,
        })

    metrics = {}
    for metric, values in per_metric.items():
        value, stderr = mean_and_stderr(values)
        metrics[metric] = {"value": value, "stderr": stderr, "n": len(values)}
    document = {
        "protocol_version": PROTOCOL_VERSION,
        "eval": ev.name,
        "version": ev.version,
        "primary_metric": ev.primary_metric,
        "n": len(samples_out),
        "selection": "options" if same_selection else "stdin",
        "metrics": metrics,
        "counts": {
            "selected": len(selected),
            "answered": len(samples_out),
            "errors": errors,
            "missing": len(missing),
        },
        "missing_ids": missing,
        "options": _options_doc(options),
        "samples": samples_out,
    }
    return [_dumps(document)]


def run(argv: Sequence[str], stdin: IO[bytes]) -> List[str]:
    """The stdout lines of one invocation; raises ProtocolError on a reportable failure."""
    args = build_parser().parse_args(list(argv))
    if args.command == "list":
        return cmd_list(args)
    if args.command == "prepare":
        return cmd_prepare(args)
    if args.command == "score":
        return cmd_score(args, stdin)
    return [_dumps({"protocol_version": PROTOCOL_VERSION})]


def _write(stream: IO[bytes], lines: List[str]) -> None:
    stream.write("".join(line + "\n" for line in lines).encode("utf-8"))
    stream.flush()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: output on stdout, one error line on stderr, the exit code from PROTOCOL.md."""
    try:
        # All output is built before any is written, so a failure never leaves half a result.
        lines = run(sys.argv[1:] if argv is None else argv, sys.stdin.buffer)
    except ProtocolError as exc:
        error = {"code": exc.code, "message": exc.message, **exc.details}
        exit_code, message = exc.exit_code, exc.message
    except Exception as exc:  # a bug in an eval: still one line and a JSON error, not a traceback
        error = {"code": "internal", "message": f"internal error: {type(exc).__name__}: {exc}"}
        exit_code, message = EXIT_INTERNAL, error["message"]
    else:
        _write(sys.stdout.buffer, lines)
        return EXIT_OK
    one_line = " ".join(str(message).split())
    sys.stderr.write(f"run_eval.py: error: {one_line}\n")
    sys.stderr.flush()
    _write(sys.stdout.buffer, [_dumps({"error": error})])
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
