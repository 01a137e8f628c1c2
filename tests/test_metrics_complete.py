"""/metrics is complete: every metric the Grafana dashboard and the Prometheus rules use exists and moves."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics
from gateway.actors.queue_depth import QueueDepthSampler
from gateway.batch.jobs import Endpoint, parse_submission
from gateway.batch.queue import priority_from_entry
from gateway.bootstrap import create_app
from gateway.http.appkeys import BATCH_QUEUE, QUEUE_DEPTH_SAMPLER
from tests.conftest import KEY_IDS, REALTIME_MODEL, ROOT, TOKENS, auth, eventually, free_port, wait_ready

_NAME = re.compile(r"\bllm_gateway_[a-z0-9_]+\b")


def referenced_names() -> dict[str, set[str]]:
    """Metric names per config file: Grafana expressions and variables, Prometheus rule expressions."""
    dashboard = json.loads((ROOT / "config" / "grafana-dashboard.json").read_text())
    grafana: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "query", "definition") and isinstance(value, str):
                    grafana.update(_NAME.findall(value))
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard)
    rules_doc = yaml.safe_load((ROOT / "config" / "prometheus-rules.yml").read_text())
    rules = {name for group in rules_doc["groups"] for rule in group["rules"] for name in _NAME.findall(rule["expr"])}
    return {"grafana": grafana, "rules": rules}


def exposed_names(text: str) -> set[str]:
    """Every series name /metrics exposes, including histogram parts and the _total of counters."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        names.update(sample.name for sample in family.samples)
    return names


def sample_value(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


async def enqueue(app: Any, model: str, priority: int, key: str = "batch") -> str:
    submission = parse_submission({"model": model, "prompt": "x", "max_tokens": 2, "priority": priority},
                                  Endpoint.COMPLETIONS, max_metadata_items=16)
    job = await app[BATCH_QUEUE].enqueue(KEY_IDS[key], submission)
    return job["id"]


@pytest.mark.slow
async def test_every_referenced_metric_exists_and_the_new_ones_move(aiohttp_client: Any, make_settings: Any) -> None:
    client = await aiohttp_client(create_app(make_settings(queue_depth_refresh_seconds=0.05)))
    await wait_ready(client.app)
    app = client.app
    # Realtime traffic: plain and streamed (tokens by key, latency, TTFT).
    body = {"model": REALTIME_MODEL, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}
    resp = await client.post("/v1/chat/completions", headers=auth("realtime"), json=body)
    assert resp.status == 200
    resp = await client.post("/v1/chat/completions", headers=auth("realtime"), json={**body, "stream": True})
    assert resp.status == 200 and b"[DONE]" in await resp.read()
    # Batch: one job on the realtime model runs to completion; jobs for another model stay queued (a swap
    # waits for realtime to be idle for SWAP_REALTIME_IDLE_SECONDS).
    done_id = await enqueue(app, REALTIME_MODEL, 0)
    await eventually(lambda: _status(app, done_id, "completed"), timeout=20)
    ids = [await enqueue(app, "other-model", p) for p in (0, 5, 5, 9)]

    async def depth_is(expected: dict[tuple[str, str], int]) -> bool:
        return {k: v for k, v in metrics.QUEUE_DEPTH.rows.items() if k[0] == "other-model"} == expected

    await eventually(lambda: depth_is({("other-model", "0"): 1, ("other-model", "5"): 2, ("other-model", "9"): 1}))
    text = await (await client.get("/metrics", headers=auth("monitor"))).text()
    assert sample_value(text, "llm_gateway_batch_queue_depth", model="other-model", priority="5") == 2
    assert sample_value(text, "llm_gateway_batch_queue_depth_refreshed_timestamp_seconds") > 0  # type: ignore[operator]
    assert sample_value(text, "llm_gateway_tokens_total", key_id=KEY_IDS["realtime"], kind="completion") >= 4  # type: ignore[operator]
    assert sample_value(text, "llm_gateway_batch_jobs_total", event="completed") >= 1  # type: ignore[operator]
    assert sample_value(text, "llm_gateway_batch_slots") == make_settings().max_concurrent_batch
    assert sample_value(text, "llm_gateway_build_info") == 1

    exposed = exposed_names(text)
    for source, names in referenced_names().items():
        assert len(names) >= 10, f"{source} references suspiciously few metrics: {names}"
        missing = sorted(names - exposed)
        assert not missing, f"{source} uses metrics that /metrics does not expose: {missing}"

    # The table follows the queue: a cancelled job leaves it, an empty model disappears.
    await app[BATCH_QUEUE].cancel(ids[-1], KEY_IDS["batch"])
    await eventually(lambda: depth_is({("other-model", "0"): 1, ("other-model", "5"): 2}))
    for job_id in ids[:-1]:
        await app[BATCH_QUEUE].cancel(job_id, KEY_IDS["batch"])
    await eventually(lambda: depth_is({}))
    assert app[QUEUE_DEPTH_SAMPLER].refreshes > 1


async def _status(app: Any, job_id: str, status: str) -> bool:
    job = await app[BATCH_QUEUE].get(job_id)
    return job is not None and job["status"] == status


def test_priority_is_read_from_the_id_and_score() -> None:
    from gateway.batch.jobs import new_job_id

    now = 1_800_000_000.123456
    job_id = new_job_id(now)
    for priority in (0, 3, 9):
        assert priority_from_entry(job_id, now - priority * 60.0, 60.0) == str(priority)
    assert priority_from_entry(job_id, now, 0.0) is None  # no aging: the score says nothing
    assert priority_from_entry("not-a-job", now, 60.0) is None
    assert priority_from_entry(job_id, now - 50 * 60.0, 60.0) is None  # out of range


async def test_model_labels_stay_bounded(aiohttp_client: Any, make_settings: Any,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(batch_dispatcher_enabled=False, queue_depth_refresh_seconds=3600)
    client = await aiohttp_client(create_app(settings))
    app = client.app
    monkeypatch.setattr(metrics, "QUEUE_DEPTH_MAX_MODELS", 2)
    for model, count in (("m-big", 3), ("m-mid", 2), ("m-small-a", 1), ("m-small-b", 1)):
        for _ in range(count):
            await enqueue(app, model, 1)
    sampler = QueueDepthSampler(app[BATCH_QUEUE], settings)
    table = await sampler.refresh()
    assert table == {("m-big", "1"): 3, ("m-mid", "1"): 2, ("other", "unknown"): 2}
    # Beyond QUEUE_DEPTH_SAMPLE_MAX per model, jobs count as priority "unknown" (no unbounded read).
    capped = QueueDepthSampler(app[BATCH_QUEUE], settings.model_copy(update={"queue_depth_sample_max": 2}))
    table = await capped.refresh()
    assert table[("m-big", "1")] == 2 and table[("m-big", "unknown")] == 1


def test_prometheus_config_scrapes_with_a_monitor_token_file() -> None:
    config = yaml.safe_load((ROOT / "config" / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "llm-gateway")
    assert job["metrics_path"] == "/metrics"
    assert job["authorization"]["type"] == "Bearer" and job["authorization"]["credentials_file"]
    assert "credentials" not in job["authorization"], "the token belongs in a file, not in the config"
    for rule_file in config["rule_files"]:
        assert (ROOT / "config" / rule_file).exists()
    rules = yaml.safe_load((ROOT / "config" / "prometheus-rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert ("alert" in rule) != ("record" in rule) and rule["expr"].strip()


def test_dashboard_has_the_panels_operators_need() -> None:
    dashboard = json.loads(Path(ROOT / "config" / "grafana-dashboard.json").read_text())
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for needed in ("request rate", "latency p50 / p99", "time to first token", "tokens by key", "runtime state",
                   "restarts", "queue depth", "batch slots", "swaps", "job outcomes", "eval runs"):
        assert needed in titles, f"no panel for {needed}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and all(t["expr"] for t in panel["targets"])
            assert panel["datasource"]["uid"] == "${datasource}"


PROM_BIN = Path("/opt/prometheus/usr/bin")  # scripts/ensure-ops-tools.sh unpacks Debian's package there


def prom_tool(name: str) -> str:
    found = shutil.which(name, path=f"{PROM_BIN}:{os.environ.get('PATH', '')}")
    assert found, f"{name} is missing: run scripts/ensure-ops-tools.sh"
    return found


def grafana_queries() -> list[str]:
    dashboard = json.loads((ROOT / "config" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    # Grafana's variables, as Grafana would fill them in.
    return [e.replace("$__rate_interval", "1m").replace("$__range", "1h").replace("$instance", ".*") for e in exprs]


def test_promtool_accepts_the_config_the_rules_and_every_dashboard_query(tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "config" / "prometheus.yml").read_text())
    token = tmp_path / "token"
    token.write_text("placeholder")
    for job in config["scrape_configs"]:
        job["authorization"]["credentials_file"] = str(token)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(ROOT / "config" / "prometheus-rules.yml", tmp_path / "prometheus-rules.yml")
    result = subprocess.run([prom_tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr
    queries = grafana_queries()
    assert len(queries) >= 20
    rules = {"groups": [{"name": "grafana", "rules": [{"record": f"grafana:q{n}", "expr": q}
                                                     for n, q in enumerate(queries)]}]}
    (tmp_path / "grafana-rules.yml").write_text(yaml.safe_dump(rules))
    result = subprocess.run([prom_tool("promtool"), "check", "rules", str(tmp_path / "grafana-rules.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
async def test_prometheus_scrapes_the_gateway_with_the_example_config(aiohttp_client: Any, make_settings: Any,
                                                                      tmp_path: Path) -> None:
    client = await aiohttp_client(create_app(make_settings()))
    await wait_ready(client.app)
    target = f"127.0.0.1:{client.server.port}"
    config = yaml.safe_load((ROOT / "config" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    job = config["scrape_configs"][0]
    good, bad = tmp_path / "monitor.token", tmp_path / "realtime.token"
    good.write_text(TOKENS["monitor"] + "\n")
    bad.write_text(TOKENS["realtime"] + "\n")
    job["authorization"]["credentials_file"] = str(good)
    job["static_configs"] = [{"targets": [target]}]
    # The same job with a token that lacks the monitor scope: Prometheus must see the 401.
    wrong = json.loads(json.dumps(job))
    wrong["job_name"] = "wrong-scope"
    wrong["authorization"]["credentials_file"] = str(bad)
    config["scrape_configs"].append(wrong)
    config["rule_files"] = [str(ROOT / "config" / "prometheus-rules.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        prom_tool("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        async with aiohttp.ClientSession() as session:

            async def get(path: str, **params: str) -> Any:
                try:
                    async with session.get(api + path, params=params) as resp:
                        return (await resp.json())["data"] if resp.status == 200 else None
                except aiohttp.ClientError:
                    return None

            async def targets_scraped() -> dict[str, Any] | None:
                data = await get("/targets")
                if not data:
                    return None
                by_job = {t["labels"]["job"]: t for t in data["activeTargets"]}
                if all(t["health"] != "unknown" for t in by_job.values()) and len(by_job) == 2:
                    return by_job
                return None

            by_job = await eventually(targets_scraped, timeout=60, interval=0.2)
            assert by_job["llm-gateway"]["health"] == "up", by_job["llm-gateway"]["lastError"]
            assert by_job["wrong-scope"]["health"] == "down" and "401" in by_job["wrong-scope"]["lastError"]

            async def series(query: str) -> list[Any]:
                data = await get("/query", query=query)
                return data["result"] if data else []

            result = await eventually(lambda: series('llm_gateway_build_info{job="llm-gateway"}'), timeout=30)
            assert result[0]["metric"]["instance"] == target
            assert await series('llm_gateway_runtime_state{job="llm-gateway",state="ready"} == 1')

            async def rules_evaluated() -> list[Any] | None:
                data = await get("/rules")
                rules = [r for g in (data or {}).get("groups", []) for r in g["rules"]]
                return rules if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules) else None

            rules = await eventually(rules_evaluated, timeout=30, interval=0.2)
            assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
            assert any(r["name"] == "LlmGatewayDown" for r in rules)
    finally:
        proc.terminate()
        _, err = await proc.communicate()
        assert proc.returncode is not None
    assert b"level=error" not in err, err.decode()[-2000:]


# Prometheus 2.x's own Accept header when it scrapes (scrape/scrape.go, acceptHeader).
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


@pytest.mark.parametrize(("accept", "openmetrics"), [
    (PROMETHEUS_ACCEPT, True),
    ("application/openmetrics-text; version=1.0.0; charset=utf-8", True),
    (None, False),
    ("*/*", False),
    ("text/plain", False),
    ("text/plain;q=1, application/openmetrics-text;q=0.5", False),
    ("text/plain;q=0.2, application/openmetrics-text;q=0.5", True),
    ("application/openmetrics-text;q=0, text/plain", False),
    ("application/json", False),
])
async def test_metrics_format_follows_the_accept_header(gateway: Any, accept: str | None, openmetrics: bool) -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families

    headers = {**auth("monitor"), **({"Accept": accept} if accept is not None else {})}
    resp = await gateway.get("/metrics", headers=headers)
    assert resp.status == 200
    text = await resp.text()
    assert "Accept" in resp.headers["Vary"]
    if openmetrics:
        assert resp.headers["Content-Type"] == "application/openmetrics-text; version=1.0.0; charset=utf-8"
        assert text.endswith("# EOF\n")
        families = list(openmetrics_families(text))  # the strict OpenMetrics parser
    else:
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert "# EOF" not in text
        families = list(text_string_to_metric_families(text))
    names = {sample.name for family in families for sample in family.samples}
    assert "llm_gateway_http_requests_total" in names
    assert not [n for n in names if n.endswith("_created") and n != "llm_gateway_uploads_created"], \
        "a _created series is exposed"


def test_metric_names_follow_prometheus_conventions() -> None:
    """Base units, the unit last (before _total on counters), counters ending in _total; promtool agrees."""
    families = list(metrics.REGISTRY.collect())
    assert len(families) >= 40
    for family in families:
        series = family.name + ("_total" if family.type == "counter" else "")
        assert re.fullmatch(r"[a-z][a-z0-9_]*", series), series
        words = family.name.split("_")
        for unit in ("seconds", "bytes"):
            if unit in words:
                assert words[-1] == unit, f"{series}: the unit '{unit}' belongs at the end of the name"
        for wrong in ("milliseconds", "ms", "kilobytes", "megabytes", "percent", "minutes", "hours"):
            assert wrong not in words, f"{series}: use a base unit (seconds, bytes, ratio)"
    assert "llm_gateway_upload_received_bytes" in {f.name for f in families}
    # promtool's linter (it reads the Prometheus text format) flags non-base units, counters without
    # _total, missing help, and more.
    body, _ = metrics.render(None)
    lint = subprocess.run([prom_tool("promtool"), "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()
