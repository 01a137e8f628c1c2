"""The EuroEval adapter with a stand-in `euroeval` (tests/fixtures/fake_euroeval.py): the real one cannot
download its datasets here. The stand-in calls the gateway's own /v1 endpoint with the run's token, so the
path from the adapter through auth, the realtime proxy and accounting is the real one."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import orjson
import redis as redis_sync

from gateway.bootstrap import create_app
from gateway.evals.euroeval import build_args, read_results
from gateway.http.evals import EVAL_RUNNER
from tests.api_helpers import create_run, wait_run
from tests.conftest import KEY_IDS, REALTIME_MODEL, REDIS_URL, ROOT, auth, eventually, free_port, wait_ready

FAKE = ROOT / "tests" / "fixtures" / "fake_euroeval.py"

# The fields LiteLLM sends for EuroEval's generative tasks on an OpenAI-compatible server.
# (EuroEval's LiteLLM module: max_completion_tokens, stop=[], temperature 0, seed 4242, logprobs with
# top_logprobs for classification, response_format for its JSON tasks.)
LITELLM_FIELDS = {"max_completion_tokens": 8, "stop": [], "temperature": 0.0, "seed": 4242, "logprobs": True,
                  "top_logprobs": 10, "response_format": {"type": "json_object"}}


async def euroeval_gateway(aiohttp_client: Any, make_settings: Any, tmp_path: Path, *flags: str) -> Any:
    """A gateway listening on a known port (EuroEval reaches it there) with the stand-in as EUROEVAL_COMMAND."""
    port = free_port()
    command = shlex.join([sys.executable, str(FAKE), *flags])
    settings = make_settings(listen_host="127.0.0.1", listen_port=port, euroeval_command=command,
                             euroeval_work_dir=str(tmp_path / "euroeval"))
    client = await aiohttp_client(create_app(settings), server_kwargs={"port": port})
    await wait_ready(client.app)
    return client


async def test_euroeval_run_succeeds_through_the_gateway(aiohttp_client: Any, make_settings: Any,
                                                         tmp_path: Path, redis_prefix: str) -> None:
    client = await euroeval_gateway(aiohttp_client, make_settings, tmp_path)
    view = await create_run(client, {"harness": "euroeval", "model": REALTIME_MODEL, "task": "sentiment-classification",
                                 "language": ["da", "sv"], "options": {"num_iterations": 2, "few_shot": False}})
    assert view["task"] == ["sentiment-classification"] and view["language"] == ["da", "sv"]
    done = await wait_run(client, view["id"])
    assert done["status"] == "completed", done["error"]
    assert set(done["metrics"]) == {"angry-tweets", "swerec"}
    assert done["metrics"]["angry-tweets"]["test_mcc"] == 100 * (1 / 3)
    record = done["result"]["records"][0]
    assert record["task"] == "sentiment-classification" and record["model"] == REALTIME_MODEL
    assert record["languages"] == ["da"] and record["few_shot"] is False
    assert done["progress"]["scored"] == 2
    # Six requests went through the realtime proxy, accounted to the caller's key.
    rclient = redis_sync.Redis.from_url(REDIS_URL)
    try:
        usage_key = f"{redis_prefix}key_usage:{KEY_IDS['eval']}"
        await eventually(lambda: rclient.hget(usage_key, "successes") == b"6")
        assert rclient.hget(usage_key, "requests") == b"6"
        assert not rclient.exists(f"{redis_prefix}key_usage:__internal_eval__")
    finally:
        rclient.close()
    log = Path(client.app[EVAL_RUNNER].settings.euroeval_debug_log).read_text()
    token = (tmp_path / "euroeval" / view["id"] / "fake_euroeval_api_key").read_text()
    assert len(token) >= 32 and token not in log and "--api-key <redacted>" in log
    assert f"[{view['id']}] stdout: Evaluated angry-tweets: 3 requests" in log
    assert f"[{view['id']}] stderr: Using cache dir" in log
    assert f"[{view['id']}] adapter: exited with status 0" in log
    assert f"--api-base http://127.0.0.1:{client.port}/v1" in log
    # The raw results file stays in the run's working directory.
    results = tmp_path / "euroeval" / view["id"] / "euroeval_benchmark_results.jsonl"
    assert [r["dataset"] for r in read_results(results)] == ["angry-tweets", "swerec"]


async def test_euroeval_failure_reports_the_log_tail(aiohttp_client: Any, make_settings: Any,
                                                     tmp_path: Path) -> None:
    client = await euroeval_gateway(aiohttp_client, make_settings, tmp_path, "--fake-fail")
    view = await create_run(client, {"harness": "euroeval", "model": REALTIME_MODEL, "dataset": "scala-en"})
    done = await wait_run(client, view["id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == "euroeval_failed"
    assert "EuroEval exited with status 1" in done["error"]["message"]
    assert "euroeval_debug.log" in done["error"]["message"]
    assert done["error"]["log_tail"][-1] == "euroeval.exceptions.InvalidBenchmark: fake failure requested"
    assert "Evaluated scala-en: 3 requests" in done["error"]["log_tail"]
    assert done["metrics"] is None


async def test_euroeval_without_results_fails(aiohttp_client: Any, make_settings: Any, tmp_path: Path) -> None:
    client = await euroeval_gateway(aiohttp_client, make_settings, tmp_path, "--fake-no-results")
    view = await create_run(client, {"harness": "euroeval", "model": REALTIME_MODEL, "dataset": "scala-en"})
    done = await wait_run(client, view["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "euroeval_no_results"
    assert "wrote no results" in done["error"]["message"]


async def test_euroeval_command_missing_fails(aiohttp_client: Any, make_settings: Any, tmp_path: Path) -> None:
    settings = make_settings(euroeval_command=str(tmp_path / "no-such-euroeval"),
                             euroeval_work_dir=str(tmp_path / "euroeval"))
    client = await aiohttp_client(create_app(settings))
    view = await create_run(client, {"harness": "euroeval", "model": REALTIME_MODEL,
                                     "task": "sentiment-classification"})
    done = await wait_run(client, view["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "euroeval_unavailable"
    assert "EUROEVAL_COMMAND" in done["error"]["message"]


async def test_cancel_stops_euroeval(aiohttp_client: Any, make_settings: Any, tmp_path: Path) -> None:
    # A EUROEVAL_COMMAND that never ends: cancelling must end the subprocess and the run.
    sleeper = tmp_path / "sleepy_euroeval.py"
    pid_file = tmp_path / "pid"
    sleeper.write_text(f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
                       "print('started', flush=True)\ntime.sleep(600)\n")
    settings = make_settings(euroeval_command=shlex.join([sys.executable, str(sleeper)]),
                             euroeval_work_dir=str(tmp_path / "euroeval"))
    client = await aiohttp_client(create_app(settings))
    view = await create_run(client, {"harness": "euroeval", "model": REALTIME_MODEL, "dataset": "scala-en"})
    await eventually(lambda: pid_file.exists() and pid_file.read_text())
    resp = await client.post(f"/eval/runs/{view['id']}/cancel", headers=auth("eval"))
    assert resp.status == 200 and (await resp.json())["status"] == "cancelled"
    pid = int(pid_file.read_text())

    def gone() -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split()[2] == "Z"  # a zombie has exited
        except FileNotFoundError:
            return True
    await eventually(gone)
    await eventually(lambda: f"[{view['id']}] adapter: stopped: the run was cancelled"
                     in Path(settings.euroeval_debug_log).read_text())


def test_build_args_matches_the_euroeval_cli() -> None:
    argv = build_args(["euroeval"], model="org/m", api_base="http://127.0.0.1:8000/v1", api_key="secret-1",
                      datasets=[], tasks=["sentiment-classification"], languages=["da", "sv"],
                      options={"num_iterations": 3, "few_shot": True, "evaluate_test_split": True,
                               "generative_type": "instruction_tuned"}, cache_dir="/c")
    assert argv == ["euroeval", "--model", "org/m", "--api-base", "http://127.0.0.1:8000/v1", "--api-key",
                    "secret-1", "--task", "sentiment-classification", "--language", "da", "--language", "sv",
                    "--num-iterations", "3", "--few-shot", "--evaluate-test-split", "--generative-type",
                    "instruction_tuned", "--no-progress-bar", "--cache-dir", "/c"]


def test_read_results_accepts_old_and_new_record_shapes(tmp_path: Path) -> None:
    path = tmp_path / "euroeval_benchmark_results.jsonl"
    old = {"dataset": "angry-tweets", "task": "sentiment-classification", "dataset_languages": ["da"],
           "model": "m", "results": {"raw": {"test": []}, "total": {"test_mcc": 41.2, "test_mcc_se": 1.1}}}
    new = {"dataset": "scala-da", "task": "linguistic-acceptability", "languages": ["da"], "model": "m",
           "results": {"raw": [], "total": {"test_mcc": 12.0}}, "few_shot": True}
    path.write_bytes(orjson.dumps(old) + b"\n\nnot json\n" + orjson.dumps(new) + b"\n")
    records = read_results(path)
    assert [(r["dataset"], r["languages"], r["metrics"]) for r in records] == [
        ("angry-tweets", ["da"], {"test_mcc": 41.2, "test_mcc_se": 1.1}),
        ("scala-da", ["da"], {"test_mcc": 12.0})]


async def test_realtime_and_batch_accept_what_litellm_sends(gateway: Any) -> None:
    body = {"model": REALTIME_MODEL, "messages": [{"role": "user", "content": "Is this positive? I love it."}],
            **LITELLM_FIELDS}
    resp = await gateway.post("/v1/chat/completions", json=body, headers=auth("realtime"))
    assert resp.status == 200, await resp.text()
    answer = await resp.json()
    content = answer["choices"][0]["logprobs"]["content"]
    assert content and len(content[0]["top_logprobs"]) == 10
    assert isinstance(orjson.loads(answer["choices"][0]["message"]["content"]), dict)  # JSON mode honoured
    completion = {"model": REALTIME_MODEL, "prompt": "Answer:", "max_tokens": 1, "logprobs": 5, "seed": 1,
                  "temperature": 0.0}
    resp = await gateway.post("/v1/completions", json=completion, headers=auth("realtime"))
    assert resp.status == 200
    assert len((await resp.json())["choices"][0]["logprobs"]["top_logprobs"][0]) >= 5

    resp = await gateway.post("/v1/batch/chat/completions", json=body, headers=auth("batch"))
    assert resp.status == 202, await resp.text()
    job_id = (await resp.json())["id"]

    async def finished() -> dict[str, Any] | None:
        job = await (await gateway.get(f"/v1/jobs/{job_id}", headers=auth("batch"))).json()
        return job if job["status"] in ("completed", "failed") else None
    job = await eventually(finished, timeout=30)
    assert job["status"] == "completed", job["error"]
    assert job["response"]["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    assert job["response"]["choices"][0]["message"]["content"] == answer["choices"][0]["message"]["content"]
