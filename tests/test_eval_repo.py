"""eval-repo/run_eval.py, run as a subprocess exactly as the EvalRunner will run it.

No gateway needed: responses are hand-made OpenAI bodies. The protocol is PROTOCOL.md.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow  # runs eval-repo/run_eval.py as a subprocess in every test

EVAL_REPO = Path(__file__).resolve().parent.parent / "eval-repo"
SCRIPT = EVAL_REPO / "run_eval.py"
LETTERS = "ABCD"
CHAT_EVALS = {"arithmetic", "json-format"}


def run(*args: str, stdin: bytes | str = b"") -> subprocess.CompletedProcess[bytes]:
    """run_eval.py with the given arguments and stdin; never raises on a non-zero exit."""
    data = stdin.encode() if isinstance(stdin, str) else stdin
    # cwd elsewhere: the script must find its evals package by its own location.
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], input=data, capture_output=True, timeout=60, cwd="/"
    )


def ok_json(*args: str, stdin: bytes | str = b"") -> Any:
    proc = run(*args, stdin=stdin)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr == b""
    return json.loads(proc.stdout)


def prepare(*args: str) -> list[dict[str, Any]]:
    proc = run("prepare", *args)
    assert proc.returncode == 0, proc.stderr.decode()
    return [json.loads(line) for line in proc.stdout.decode().splitlines()]


def expect_error(proc: subprocess.CompletedProcess[bytes], exit_code: int, code: str) -> dict[str, Any]:
    """The documented failure shape: exit code, one stderr line, one JSON error on stdout."""
    assert proc.returncode == exit_code, (proc.returncode, proc.stderr.decode())
    stderr = proc.stderr.decode()
    assert stderr.startswith("run_eval.py: error: ") and stderr.endswith("\n")
    assert stderr.count("\n") == 1
    out = proc.stdout.decode().splitlines()
    assert len(out) == 1
    error = json.loads(out[0])["error"]
    assert error["code"] == code
    assert error["message"] == stderr.removeprefix("run_eval.py: error: ").rstrip("\n")
    return error


def jsonl(lines: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(line) + "\n" for line in lines)


# OpenAI response bodies, as vLLM returns them.
def chat(content: str | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
    }


def completion(text: str, top: dict[str, float] | None = None) -> dict[str, Any]:
    logprobs = None
    if top is not None:
        token = max(top, key=lambda t: top[t])
        logprobs = {"text_offset": [0], "token_logprobs": [top[token]], "tokens": [token], "top_logprobs": [top]}
    return {
        "id": "cmpl-1", "object": "text_completion", "model": "m",
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
    }


def letter_logprobs(best: str) -> dict[str, float]:
    return {f" {letter}": (-0.1 if letter == best else -3.0 - i) for i, letter in enumerate(LETTERS)}


def value_of(kind: str) -> Any:
    return {"string": "x", "integer": 7, "number": 1.5, "boolean": False, "array of strings": ["a"]}[kind]


def right_answer(eval_name: str, expected: Any) -> dict[str, Any]:
    if eval_name == "arithmetic":
        return chat(str(expected))
    if eval_name == "capitals-qa":
        return completion(f" {expected}")
    if eval_name == "mc-logprobs":
        return completion(f" {expected}", letter_logprobs(expected))
    if eval_name == "json-format":
        return chat(json.dumps({key: value_of(kind) for key, kind in expected.items()}))
    raise AssertionError(eval_name)


def wrong_answer(eval_name: str, expected: Any) -> dict[str, Any]:
    if eval_name == "arithmetic":
        return chat(str(expected + 1))
    if eval_name == "capitals-qa":
        return completion(" Atlantis")
    if eval_name == "mc-logprobs":
        other = LETTERS[(LETTERS.index(expected) + 1) % 4]
        return completion(f" {other}", letter_logprobs(other))
    if eval_name == "json-format":
        return chat("Sure! Here is the object you asked for.")
    raise AssertionError(eval_name)


@pytest.fixture(scope="module")
def listing() -> list[dict[str, Any]]:
    return ok_json("list")


@pytest.fixture(scope="module")
def expected_by_id() -> dict[str, dict[str, Any]]:
    """Per eval, id -> expected answer for the first 20 samples of seed 0, learned through score."""
    out: dict[str, dict[str, Any]] = {}
    for name in ("arithmetic", "capitals-qa", "mc-logprobs", "json-format"):
        ids = [req["id"] for req in prepare(name, "m", "--limit", "20")]
        # Any answer will do to learn what was expected: score echoes it per sample.
        any_answer = chat("?") if name in CHAT_EVALS else completion("?")
        doc = ok_json("score", name, "--limit", "20", stdin=jsonl([{"id": i, "response": any_answer} for i in ids]))
        out[name] = {s["id"]: s["expected"] for s in doc["samples"]}
        assert list(out[name]) == ids
    return out


# --- list -------------------------------------------------------------------------------------


def test_list_describes_at_least_four_evals_of_different_kinds(listing: list[dict[str, Any]]) -> None:
    names = [ev["name"] for ev in listing]
    assert names == ["arithmetic", "capitals-qa", "mc-logprobs", "json-format"]
    for ev in listing:
        assert set(ev) >= {"name", "version", "description", "request_type", "endpoint",
                           "suits_base_models", "num_samples", "metrics", "primary_metric", "defaults",
                           "max_few_shot", "extra_options"}
        assert isinstance(ev["version"], int) and ev["version"] >= 1
        assert ev["description"]
        assert ev["request_type"] in ("chat", "completion")
        assert ev["endpoint"] == {"chat": "/v1/chat/completions", "completion": "/v1/completions"}[
            ev["request_type"]]
        assert 50 <= ev["num_samples"] <= 200
        assert ev["primary_metric"] in ev["metrics"]
        assert set(ev["defaults"]) == {"max_tokens", "few_shot", "temperature"}
        assert ev["defaults"]["few_shot"] <= ev["max_few_shot"]
    assert {ev["request_type"] for ev in listing} == {"chat", "completion"}
    by_name = {ev["name"]: ev for ev in listing}
    assert by_name["json-format"]["extra_options"] == ["--json-mode"]
    assert by_name["json-format"]["metrics"] == ["accuracy", "valid_json"]
    assert by_name["capitals-qa"]["primary_metric"] == "exact_match"


def test_list_base_model_keeps_only_the_evals_that_suit_base_models(listing: list[dict[str, Any]]) -> None:
    base = ok_json("list", "--base-model")
    assert base == [ev for ev in listing if ev["suits_base_models"]]
    assert [ev["name"] for ev in base] == ["capitals-qa", "mc-logprobs"]
    assert all(ev["request_type"] == "completion" for ev in base)


def test_version_prints_the_protocol_version() -> None:
    assert ok_json("version") == {"protocol_version": 2}


# --- prepare ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["arithmetic", "capitals-qa", "mc-logprobs", "json-format"])
def test_prepare_prints_one_request_per_sample(name: str, listing: list[dict[str, Any]]) -> None:
    ev = next(e for e in listing if e["name"] == name)
    requests = prepare(name, "org/model-1")
    assert len(requests) == ev["num_samples"]
    assert len({r["id"] for r in requests}) == len(requests)
    for req in requests:
        assert set(req) == {"id", "endpoint", "body"}
        assert req["id"].startswith(name + "-")
        assert all(ch.isalnum() or ch == "-" for ch in req["id"])
        assert req["endpoint"] == ev["endpoint"]
        body = req["body"]
        assert next(iter(body)) == "model" and body["model"] == "org/model-1"
        assert body["max_tokens"] == ev["defaults"]["max_tokens"]
        assert body["temperature"] == ev["defaults"]["temperature"]
        assert body["seed"] == 0
        assert "stream" not in body
        if ev["request_type"] == "chat":
            assert body["messages"][-1]["role"] == "user"
            assert len(body["messages"]) == 2 * ev["defaults"]["few_shot"] + 1
        else:
            assert body["prompt"].endswith("Answer:")
            assert body["prompt"].count("Question:") == ev["defaults"]["few_shot"] + 1


def test_prepare_is_deterministic_and_the_seed_orders_and_picks_examples() -> None:
    args = ("prepare", "mc-logprobs", "m", "--seed", "7", "--few-shot", "2")
    first, second = run(*args), run(*args)
    assert first.returncode == 0 and first.stdout == second.stdout

    seed7 = [json.loads(line) for line in first.stdout.decode().splitlines()]
    seed8 = prepare("mc-logprobs", "m", "--seed", "8", "--few-shot", "2")
    ids7, ids8 = [r["id"] for r in seed7], [r["id"] for r in seed8]
    assert ids7 != ids8 and sorted(ids7) == sorted(ids8)
    # The same sample gets other few-shot examples under another seed (for some samples at least).
    prompts7 = {r["id"]: r["body"]["prompt"] for r in seed7}
    assert any(prompts7[r["id"]] != r["body"]["prompt"] for r in seed8)
    # The question itself never depends on the seed.
    assert all(prompts7[r["id"]].rsplit("Question:", 1)[1] == r["body"]["prompt"].rsplit("Question:", 1)[1]
               for r in seed8)

    # --limit N is the first N of the same order, with the same requests.
    limited = prepare("mc-logprobs", "m", "--seed", "7", "--few-shot", "2", "--limit", "10")
    assert limited == seed7[:10]


def test_prepare_options_reach_the_request_body() -> None:
    [req] = prepare("arithmetic", "m", "--limit", "1", "--seed", "5", "--max-tokens", "7",
                    "--temperature", "0.7", "--few-shot", "3")
    body = req["body"]
    assert (body["max_tokens"], body["temperature"], body["seed"]) == (7, 0.7, 5)
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["user", "assistant"] * 3 + ["user"]
    # Few-shot answers are the true results of their questions.
    operations = {"+": operator.add, "-": operator.sub, "*": operator.mul}
    for question, answer in zip(body["messages"][0:6:2], body["messages"][1:6:2], strict=True):
        a, op, b = question["content"].removeprefix("What is ").split("?")[0].split()
        assert int(answer["content"]) == operations[op](int(a), int(b))

    [mc] = prepare("mc-logprobs", "m", "--limit", "1", "--few-shot", "0")
    assert mc["body"]["logprobs"] == 5 and mc["body"]["max_tokens"] == 1
    assert mc["body"]["prompt"].count("Question:") == 1

    [cap] = prepare("capitals-qa", "m", "--limit", "1", "--few-shot", "8")
    assert cap["body"]["prompt"].count("Question:") == 9 and cap["body"]["stop"] == ["\n"]

    [plain] = prepare("json-format", "m", "--limit", "1")
    [json_mode] = prepare("json-format", "m", "--limit", "1", "--json-mode")
    assert "response_format" not in plain["body"]
    assert json_mode["body"]["response_format"] == {"type": "json_object"}


# --- score ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["arithmetic", "capitals-qa", "mc-logprobs", "json-format"])
def test_score_perfect_and_wrong_answers(name: str, expected_by_id: dict[str, dict[str, Any]]) -> None:
    expected = expected_by_id[name]
    perfect = ok_json("score", name, "--limit", "20",
                      stdin=jsonl([{"id": i, "response": right_answer(name, e)} for i, e in expected.items()]))
    for metric in perfect["metrics"].values():
        assert metric == {"value": 1.0, "stderr": 0.0, "n": 20}
    assert perfect["counts"] == {"selected": 20, "answered": 20, "errors": 0, "missing": 0}
    assert all(s["score"] == 1.0 and s["error"] is None for s in perfect["samples"])
    assert perfect["eval"] == name and perfect["version"] == 1 and perfect["protocol_version"] == 2
    assert perfect["n"] == 20 and perfect["selection"] == "stdin"

    # Lines in any order: the document keeps the selection's order.
    wrong_lines = [{"id": i, "response": wrong_answer(name, e)} for i, e in expected.items()]
    wrong = ok_json("score", name, "--limit", "20", stdin=jsonl(wrong_lines[::-1]))
    assert wrong["metrics"][wrong["primary_metric"]] == {"value": 0.0, "stderr": 0.0, "n": 20}
    assert [s["id"] for s in wrong["samples"]] == list(expected)
    assert all(s["score"] == 0.0 and s["error"] is None for s in wrong["samples"])


def test_score_mixed_gives_the_mean_and_its_standard_error(expected_by_id: dict[str, dict[str, Any]]) -> None:
    items = list(expected_by_id["arithmetic"].items())
    lines = [{"id": i, "response": (right_answer if n % 2 else wrong_answer)("arithmetic", e)}
             for n, (i, e) in enumerate(items)]
    doc = ok_json("score", "arithmetic", "--limit", "20", stdin=jsonl(lines))
    accuracy = doc["metrics"]["accuracy"]
    assert accuracy["value"] == 0.5 and accuracy["n"] == 20
    # Sample standard deviation (n - 1) over sqrt(n): sqrt(20 * 0.25 / 19) / sqrt(20).
    assert accuracy["stderr"] == pytest.approx(math.sqrt(0.25 / 19), rel=1e-12)
    assert accuracy["stderr"] == pytest.approx(0.1147078669, rel=1e-9)
    assert [s["score"] for s in doc["samples"]] == [float(n % 2) for n in range(20)]
    assert doc["options"] == {"seed": 0, "limit": 20, "max_tokens": 32, "few_shot": 0, "temperature": 0.0,
                              "json_mode": False}

    # 3 right out of 4 on json-format, one of them not JSON at all: two metrics, two values.
    js = list(expected_by_id["json-format"].items())[:4]
    lines = [{"id": i, "response": right_answer("json-format", e)} for i, e in js[:3]]
    lines.append({"id": js[3][0], "response": chat("no")})
    doc = ok_json("score", "json-format", "--limit", "20", "--allow-missing", stdin=jsonl(lines))
    assert doc["metrics"]["accuracy"]["value"] == 0.75
    assert doc["metrics"]["accuracy"]["stderr"] == pytest.approx(0.25)  # sqrt(0.25 / 4)
    assert doc["metrics"]["valid_json"]["value"] == 0.75


def one(name: str, sample_id: str, response: Any, *options: str) -> dict[str, Any]:
    """The score document entry of a single sample (the others reported missing)."""
    doc = ok_json("score", name, "--allow-missing", *options, stdin=jsonl([{"id": sample_id, "response": response}]))
    [sample] = doc["samples"]
    return sample


def test_arithmetic_reads_the_last_number_of_the_reply(expected_by_id: dict[str, dict[str, Any]]) -> None:
    sample_id, value = next((i, e) for i, e in expected_by_id["arithmetic"].items() if abs(e) >= 1000)
    formatted = f"{value:,}"
    assert one("arithmetic", sample_id, chat(f"Let me see... that is {formatted}."))["score"] == 1.0
    assert one("arithmetic", sample_id, chat(f"<think>maybe 3</think>\n{value}"))["score"] == 1.0
    assert one("arithmetic", sample_id, chat(f"{value}.0"))["score"] == 1.0
    assert one("arithmetic", sample_id, chat(f"{value}, or maybe 12"))["score"] == 0.0
    none = one("arithmetic", sample_id, chat(None))
    assert none["score"] == 0.0 and none["got"] is None and none["error"] is None


@pytest.mark.parametrize(("answer", "score"), [
    (" Washington, D.C.", 1.0), ("washington dc", 1.0), (" Washington\nQuestion: next", 1.0),
    ("  WASHINGTON D.C. ", 1.0), (" New York", 0.0), ("", 0.0),
])
def test_capitals_normalise_case_punctuation_and_first_line(answer: str, score: float) -> None:
    assert one("capitals-qa", "capitals-qa-united-states", completion(answer))["score"] == score


def test_capitals_fold_accents_hyphens_and_accept_aliases() -> None:
    assert one("capitals-qa", "capitals-qa-brazil", completion(" BRASILIA."))["score"] == 1.0
    assert one("capitals-qa", "capitals-qa-haiti", completion(" Port au Prince"))["score"] == 1.0
    assert one("capitals-qa", "capitals-qa-bolivia", completion(" La Paz"))["score"] == 1.0
    got = one("capitals-qa", "capitals-qa-bolivia", completion(" Lima"))
    assert (got["score"], got["got"], got["expected"]) == (0.0, "Lima", "Sucre")


def test_mc_logprobs_takes_the_most_probable_letter() -> None:
    [req] = prepare("mc-logprobs", "m", "--limit", "1")
    sample_id = req["id"]
    expected = one("mc-logprobs", sample_id, completion(" A", letter_logprobs("A")))["expected"]
    other = LETTERS[(LETTERS.index(expected) + 1) % 4]
    # The sampled text is ignored when logprobs name a letter; two spellings of one letter add up.
    top = {f" {other}": -1.0, f" {expected}": -1.2, expected: -1.3, " The": -0.5}
    assert one("mc-logprobs", sample_id, completion(f" {other}", top))["got"] == expected
    # SentencePiece / byte-level BPE spellings count too.
    assert one("mc-logprobs", sample_id, completion(" x", {f"▁{expected}": -2.0, "x": -0.1}))["score"] == 1.0
    assert one("mc-logprobs", sample_id, completion(" x", {f"Ġ{expected}": -2.0}))["score"] == 1.0
    # Without logprobs the first word of the text decides.
    assert one("mc-logprobs", sample_id, completion(f" {expected}."))["score"] == 1.0
    assert one("mc-logprobs", sample_id, completion(f" ({other})"))["got"] == other
    nothing = one("mc-logprobs", sample_id, completion(" Because", {" Because": -0.1}))
    assert (nothing["score"], nothing["got"]) == (0.0, None)


def test_json_format_checks_keys_and_types(expected_by_id: dict[str, dict[str, Any]]) -> None:
    sample_id, schema = next(iter(expected_by_id["json-format"].items()))
    good = {key: value_of(kind) for key, kind in schema.items()}
    text = json.dumps(good)

    def scores(content: str) -> dict[str, float]:
        return one("json-format", sample_id, chat(content), "--limit", "20")["scores"]

    assert scores(f"```json\n{text}\n```") == {"accuracy": 1.0, "valid_json": 1.0}
    assert scores(json.dumps({**good, "extra": 1})) == {"accuracy": 0.0, "valid_json": 1.0}
    first_key = next(iter(schema))
    wrong_type = True if schema[first_key] != "boolean" else "yes"
    assert scores(json.dumps({**good, first_key: wrong_type})) == {"accuracy": 0.0, "valid_json": 1.0}
    assert scores(text[:-1] + f', "{first_key}": {json.dumps(good[first_key])}}}') == {
        "accuracy": 0.0, "valid_json": 1.0}  # a repeated key
    assert scores(text.replace("}", ', "n": NaN}')) == {"accuracy": 0.0, "valid_json": 0.0}
    assert scores(json.dumps([good])) == {"accuracy": 0.0, "valid_json": 0.0}


def test_failed_requests_score_zero_and_are_counted(expected_by_id: dict[str, dict[str, Any]]) -> None:
    items = list(expected_by_id["arithmetic"].items())
    good: list[dict[str, Any]] = [{"id": i, "response": right_answer("arithmetic", e)} for i, e in items[:15]]
    # The OpenAI Batch output wrapper around a good body is unwrapped and scored.
    wrapped = {"status_code": 200, "request_id": "r", "body": right_answer("arithmetic", items[15][1])}
    batch_ok: list[dict[str, Any]] = [{"id": items[15][0], "response": wrapped}]
    failed: list[dict[str, Any]] = [
        {"id": items[16][0], "response": None, "error": {"message": "runtime crashed", "type": "server_error"}},
        {"id": items[17][0], "response": {"error": {"message": "The model `m` does not exist.",
                                                    "type": "NotFoundError", "code": 404}}},
        {"id": items[18][0], "response": {"status_code": 500, "request_id": "r",
                                          "body": {"error": {"message": "boom"}}}},
        {"id": items[19][0], "response": {"object": "chat.completion", "choices": []}},
    ]
    doc = ok_json("score", "arithmetic", "--limit", "20", stdin=jsonl(good + batch_ok + failed))
    assert doc["counts"] == {"selected": 20, "answered": 20, "errors": 4, "missing": 0}
    assert doc["metrics"]["accuracy"]["value"] == 16 / 20
    errors = {s["id"]: s["error"] for s in doc["samples"] if s["error"] is not None}
    assert errors == {
        items[16][0]: "runtime crashed",
        items[17][0]: "The model `m` does not exist.",
        items[18][0]: "HTTP 500: boom",
        items[19][0]: "malformed response: no choices in the response",
    }
    assert all(s["score"] == 0.0 and s["got"] is None for s in doc["samples"] if s["error"])


def test_allow_missing_scores_what_was_answered(expected_by_id: dict[str, dict[str, Any]]) -> None:
    items = list(expected_by_id["capitals-qa"].items())
    lines = [{"id": i, "response": right_answer("capitals-qa", e)} for i, e in items[:5]]
    doc = ok_json("score", "capitals-qa", "--limit", "20", "--allow-missing", stdin=jsonl(lines))
    assert doc["counts"] == {"selected": 20, "answered": 5, "errors": 0, "missing": 15}
    assert doc["missing_ids"] == [i for i, _e in items[5:]]
    assert doc["metrics"]["exact_match"] == {"value": 1.0, "stderr": 0.0, "n": 5}

    empty = ok_json("score", "capitals-qa", "--allow-missing", stdin="\n")
    assert empty["metrics"]["exact_match"] == {"value": None, "stderr": None, "n": 0}
    assert empty["counts"]["missing"] == 178


# --- errors -----------------------------------------------------------------------------------


def test_unknown_eval_exits_3() -> None:
    for args in (("prepare", "nope", "m"), ("score", "nope")):
        error = expect_error(run(*args), 3, "unknown_eval")
        assert error["eval"] == "nope" and "arithmetic" in error["known"]
        assert error["message"].startswith("unknown eval 'nope' (known: arithmetic, ")


def test_bad_json_on_stdin_names_the_line(expected_by_id: dict[str, dict[str, Any]]) -> None:
    first = next(iter(expected_by_id["arithmetic"]))
    good = json.dumps({"id": first, "response": chat("1")})
    error = expect_error(run("score", "arithmetic", "--limit", "20", stdin=f"{good}\n\n{{not json\n"), 4, "bad_json")
    assert error["line"] == 3 and error["message"].startswith("stdin line 3: invalid JSON: ")
    error = expect_error(run("score", "arithmetic", stdin=b'{"id": "\xff"}\n'), 4, "bad_json")
    assert error["message"] == "stdin line 1: not UTF-8"
    for line in ('["a list"]', '{"response": {}}', '{"id": "", "response": {}}', '{"id": 3, "response": {}}',
                 '{"id": "arithmetic-000"}'):
        error = expect_error(run("score", "arithmetic", stdin=line + "\n"), 4, "bad_line")
        assert error["line"] == 1 and error["message"].startswith("stdin line 1: expected an object")


def test_score_takes_exactly_the_lines_given(expected_by_id: dict[str, dict[str, Any]]) -> None:
    """The seed's documented flow: `prepare --limit 20`, then `score <eval>` with the responses alone."""
    requests = prepare("arithmetic", "m", "--limit", "20")
    expected = expected_by_id["arithmetic"]
    lines = [{"id": r["id"], "response": right_answer("arithmetic", expected[r["id"]])} for r in requests]
    doc = ok_json("score", "arithmetic", stdin=jsonl(lines[::-1]))
    assert doc["n"] == 20 and doc["metrics"]["accuracy"] == {"value": 1.0, "stderr": 0.0, "n": 20}
    assert doc["counts"] == {"selected": 20, "answered": 20, "errors": 0, "missing": 0}
    assert [s["id"] for s in doc["samples"]] == [r["id"] for r in requests]  # the run order, not stdin's
    # Any subset is scored as it is: 7 lines give n = 7, nothing is "missing".
    seven = ok_json("score", "arithmetic", "--limit", "3", stdin=jsonl(lines[:7]))
    assert seven["n"] == 7 and seven["counts"]["missing"] == 0 and seven["missing_ids"] == []
    # Held to prepare's selection, as before: the same lines are then 13 short.
    error = expect_error(run("score", "arithmetic", "--same-selection", "--limit", "20", stdin=jsonl(lines[:7])),
                         5, "missing_ids")
    assert len(error["missing"]) == 13
    held = ok_json("score", "arithmetic", "--same-selection", "--limit", "20", stdin=jsonl(lines))
    assert held["n"] == 20 and held["selection"] == "options"


def test_unknown_duplicate_and_missing_ids_exit_5(expected_by_id: dict[str, dict[str, Any]]) -> None:
    ids = list(expected_by_id["mc-logprobs"])
    line = {"id": ids[0], "response": completion(" A")}

    error = expect_error(run("score", "mc-logprobs",
                             stdin=jsonl([line, {"id": "mc-logprobs-999", "response": None}])), 5, "unknown_id")
    assert (error["line"], error["id"]) == (2, "mc-logprobs-999")
    assert error["message"] == ("stdin line 2: unknown id 'mc-logprobs-999' (not a sample of eval "
                                "'mc-logprobs', version 1)")
    error = expect_error(run("score", "mc-logprobs", "--same-selection", "--limit", "20",
                             stdin=jsonl([line, {"id": "mc-logprobs-999", "response": None}])), 5, "unknown_id")
    assert error["message"] == ("stdin line 2: unknown id 'mc-logprobs-999' (not among the 20 samples "
                                "these options select)")
    # Another eval's id is unknown too.
    expect_error(run("score", "arithmetic", stdin=jsonl([line])), 5, "unknown_id")

    for options in ((), ("--same-selection", "--limit", "20")):
        error = expect_error(run("score", "mc-logprobs", *options, stdin=jsonl([line, line])), 5, "duplicate_id")
        assert (error["line"], error["first_line"], error["id"]) == (2, 1, ids[0])
        assert error["message"] == f"stdin line 2: duplicate id '{ids[0]}' (first on line 1)"

    error = expect_error(run("score", "mc-logprobs", "--same-selection", "--limit", "20", stdin=jsonl([line])), 5,
                         "missing_ids")
    assert error["missing"] == ids[1:]
    assert error["message"] == (f"19 of the 20 selected samples have no line on stdin: "
                                f"{', '.join(ids[1:11])} and 9 more")

    # Held to the selection, other selection options than prepare used are caught the same way.
    lines = [{"id": i, "response": completion(" A")} for i in ids]
    expect_error(run("score", "mc-logprobs", "--same-selection", "--limit", "20", "--seed", "1",
                     stdin=jsonl(lines)), 5, "unknown_id")


@pytest.mark.parametrize(("args", "message"), [
    (("prepare", "arithmetic", "m", "--limit", "0"), "argument --limit: must be >= 1, got 0"),
    (("prepare", "arithmetic", "m", "--limit", "ten"), "argument --limit: expected an integer, got 'ten'"),
    (("prepare", "arithmetic", "m", "--seed", "-1"),
     "argument --seed: must be between 0 and 9223372036854775807, got -1"),
    (("prepare", "arithmetic", "m", "--max-tokens", "0"), "argument --max-tokens: must be >= 1, got 0"),
    (("prepare", "arithmetic", "m", "--temperature", "2.5"),
     "argument --temperature: must be between 0 and 2, got 2.5"),
    (("score", "capitals-qa", "--few-shot", "9"), "--few-shot 9 is more than the 8 examples eval 'capitals-qa' has"),
    (("prepare", "arithmetic", "m", "--json-mode"), "--json-mode is not an option of eval 'arithmetic'"),
    (("prepare", "arithmetic", "m", "--lim", "3"), "unrecognized arguments: --lim 3"),
    (("prepare", "arithmetic"), "the following arguments are required: model"),
    (("prepare", "arithmetic", " "), "argument model: must not be empty"),
    (("list", "--base"), "unrecognized arguments: --base"),
    (("evaluate",), "invalid choice: 'evaluate'"),
    ((), "the following arguments are required"),
])
def test_bad_options_exit_2(args: tuple[str, ...], message: str) -> None:
    error = expect_error(run(*args), 2, "usage")
    # A substring: argparse words its own messages slightly differently across Python versions.
    assert message in error["message"]


# --- portability ------------------------------------------------------------------------------


def test_eval_repo_is_python_3_9_and_standard_library_only() -> None:
    files = [SCRIPT, *sorted((EVAL_REPO / "evals").glob("*.py"))]
    assert len(files) >= 6
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 9))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            for root in roots:
                assert root in sys.stdlib_module_names or root == "evals", f"{path.name} imports {root}"
