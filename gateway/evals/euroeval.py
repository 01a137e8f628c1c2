"""The EuroEval adapter: runs the `euroeval` command line against the gateway's own OpenAI endpoint.

EuroEval talks to an OpenAI-compatible server through LiteLLM when given `--api-base`; the token goes in
its environment as OPENAI_API_KEY (LiteLLM's key for an OpenAI-compatible server when no `--api-key` is
given), never in argv, where `ps` would show it. Every value is passed as `--option=value`, so one starting
with '-' cannot be taken for an option. EuroEval writes one JSON line per (model, dataset) to
`euroeval_benchmark_results.jsonl` in its working directory. Its stdout, stderr and this adapter's own lines
go to EUROEVAL_DEBUG_LOG, each prefixed with the run id; the token is never written anywhere.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import orjson
import structlog

from gateway.evals.process import terminate

log = structlog.get_logger(component="euroeval")

RESULTS_FILE = "euroeval_benchmark_results.jsonl"
GENERATIVE_TYPES = ("base", "instruction_tuned", "reasoning")
REDACTED = "<redacted>"


class EuroEvalFailed(Exception):
    """EuroEval did not produce results: why, and the last lines of its output."""

    def __init__(self, message: str, log_tail: list[str], *, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.log_tail = log_tail
        self.code = code


API_KEY_ENV = "OPENAI_API_KEY"


def build_args(command: Sequence[str], *, model: str, api_base: str, datasets: Sequence[str],
               tasks: Sequence[str], languages: Sequence[str], options: Mapping[str, Any],
               cache_dir: str) -> list[str]:
    """The full EuroEval command line for one run (no token: that goes in the environment, see `run_euroeval`)."""
    argv = [*command, f"--model={model}", f"--api-base={api_base}"]
    argv += [f"--dataset={dataset}" for dataset in datasets]
    argv += [f"--task={task}" for task in tasks]
    argv += [f"--language={language}" for language in languages]
    if options.get("num_iterations") is not None:
        argv.append(f"--num-iterations={options['num_iterations']}")
    if options.get("few_shot") is not None:
        argv.append("--few-shot" if options["few_shot"] else "--zero-shot")
    if options.get("evaluate_test_split"):
        argv.append("--evaluate-test-split")
    if options.get("generative_type"):
        argv.append(f"--generative-type={options['generative_type']}")
    # No progress bars (they are carriage-return noise in a log file); a shared dataset cache.
    argv += ["--no-progress-bar", f"--cache-dir={cache_dir}"]
    return argv


def redact(text: str, secret: str) -> str:
    """`text` with the token replaced."""
    return text.replace(secret, REDACTED) if secret else text


class DebugLog:
    """Appends timestamped lines tagged with the run id to EUROEVAL_DEBUG_LOG and keeps the last few."""

    def __init__(self, path: str | Path, run_id: str, secret: str, tail_lines: int) -> None:
        self.path = Path(path)
        self.run_id = run_id
        self.secret = secret
        self.tail: deque[str] = deque(maxlen=tail_lines)
        self._file: IO[str] | None = None

    def __enter__(self) -> DebugLog:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def write(self, stream: str, line: str) -> None:
        """One line from `stream` (stdout, stderr or adapter)."""
        line = redact(line.rstrip(), self.secret)
        if stream != "adapter":
            self.tail.append(line)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if self._file is not None:
            # Small synchronous appends: a local file, and flushed so `tail -f` shows progress live.
            self._file.write(f"{stamp} [{self.run_id}] {stream}: {line}\n")
            self._file.flush()


async def _pump(reader: asyncio.StreamReader, stream: str, debug: DebugLog) -> None:
    pending = b""
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            break
        pending += chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.strip():
                debug.write(stream, line.decode(errors="replace"))
        if len(pending) > 65536:  # a very long line without a newline: keep the log moving
            debug.write(stream, pending.decode(errors="replace"))
            pending = b""
    if pending.strip():
        debug.write(stream, pending.decode(errors="replace"))


def read_results(path: Path) -> list[dict[str, Any]]:
    """The result records of a EuroEval results file, each reduced to what a run reports."""
    records: list[dict[str, Any]] = []
    if not path.is_file():
        return records
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            raw = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(raw, dict) or not isinstance(raw.get("dataset"), str):
            continue
        results = raw.get("results")
        total = results.get("total") if isinstance(results, dict) else None
        records.append({
            "dataset": raw["dataset"],
            "task": raw.get("task"),
            # `dataset_languages` in older EuroEval versions, `languages` in newer ones.
            "languages": raw.get("languages", raw.get("dataset_languages")),
            "model": raw.get("model"),
            "metrics": total if isinstance(total, dict) else {},
            "few_shot": raw.get("few_shot"),
            "validation_split": raw.get("validation_split"),
            "generative_type": raw.get("generative_type"),
            "euroeval_version": raw.get("euroeval_version"),
        })
    return records


async def run_euroeval(argv: Sequence[str], *, cwd: Path, debug_log: str | Path, run_id: str, secret: str,
                       timeout: float, tail_lines: int) -> dict[str, Any]:
    """Run EuroEval to completion and return the run's result; raise EuroEvalFailed with the log's tail."""
    cwd.mkdir(parents=True, exist_ok=True)
    results_path = cwd / RESULTS_FILE
    # A resumed run starts over: records of an interrupted attempt would otherwise count as results.
    results_path.unlink(missing_ok=True)
    with DebugLog(debug_log, run_id, secret, tail_lines) as debug:
        debug.write("adapter", f"starting: {' '.join(redact(a, secret) for a in argv)} (cwd {cwd})")
        started = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=str(cwd), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1", API_KEY_ENV: secret})
        except OSError as exc:
            debug.write("adapter", f"cannot start {argv[0]}: {exc}")
            # The program's name only: its path is the server's business (it is in the debug log).
            raise EuroEvalFailed(f"Cannot start EuroEval ({Path(argv[0]).name}): {exc.strerror or exc}. Set "
                                 "EUROEVAL_COMMAND to the euroeval executable.", list(debug.tail),
                                 code="euroeval_unavailable") from None
        assert proc.stdout is not None and proc.stderr is not None
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(_pump(proc.stdout, "stdout", debug), _pump(proc.stderr, "stderr", debug),
                                     proc.wait())
        except TimeoutError:
            await terminate(proc)
            debug.write("adapter", f"timed out after {timeout:g} s; stopped")
            raise EuroEvalFailed(f"EuroEval did not finish within {timeout:g} s (EUROEVAL_TIMEOUT_SECONDS).",
                                 list(debug.tail), code="euroeval_timeout") from None
        except BaseException:
            # Cancelled (run cancelled, gateway stopping): EuroEval must not keep running on its own.
            await asyncio.shield(terminate(proc))
            debug.write("adapter", "stopped: the run was cancelled or the gateway is stopping")
            raise
        elapsed = time.monotonic() - started
        code = proc.returncode
        debug.write("adapter", f"exited with status {code} after {elapsed:.1f} s")
        if code != 0:
            raise EuroEvalFailed(f"EuroEval exited with status {code}.", list(debug.tail), code="euroeval_failed")
        records = read_results(results_path)
        if not records:
            debug.write("adapter", f"no results in {results_path}")
            raise EuroEvalFailed(f"EuroEval exited normally but wrote no results to {RESULTS_FILE} (it skips "
                                 "datasets it cannot load or evaluate; see the log).", list(debug.tail),
                                 code="euroeval_no_results")
        debug.write("adapter", f"{len(records)} result record(s): {', '.join(r['dataset'] for r in records)}")
    return {"harness": "euroeval", "records": records,
            "metrics": {r["dataset"]: r["metrics"] for r in records}, "duration_seconds": round(elapsed, 3)}
