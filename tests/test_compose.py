"""compose.yml validates with the real Compose CLI and wires what the orchestrator needs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT


def compose_command() -> list[str]:
    """`docker compose` (v2 plugin) when present, else Debian's `docker-compose` (v1)."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    path = shutil.which("docker-compose")
    assert path, "neither `docker compose` nor `docker-compose` is installed (scripts/ensure-docker.sh installs it)"
    return [path]


def compose_config(directory: Path, env: str) -> subprocess.CompletedProcess[str]:
    shutil.copy(ROOT / "compose.yml", directory / "compose.yml")
    (directory / ".env").write_text(env)
    return subprocess.run([*compose_command(), "-f", "compose.yml", "config"], cwd=directory, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow
def test_compose_config_validates_and_wires_the_orchestrator(tmp_path: Path) -> None:
    env = (ROOT / ".env.vllm.example").read_text() + "\nHOST_HF_CACHE=/srv/hf-cache\nRUNTIME_NETWORK=\n"
    result = compose_config(tmp_path, env)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    assert set(config["services"]) == {"redis", "orchestrator"}
    gateway = config["services"]["orchestrator"]
    assert gateway["build"]["context"] == str(tmp_path) and gateway["build"]["dockerfile"] == "Dockerfile"
    environment = gateway["environment"]
    # Compose-specific values win over .env (which points at 127.0.0.1 and an empty network).
    assert environment["REDIS_URL"] == "redis://redis:6379/0"
    assert environment["RUNTIME_BACKEND"] == "docker"
    assert environment["RUNTIME_NETWORK"] == config["networks"]["default"]["name"]
    assert environment["HOST_HF_CACHE"] == "/srv/hf-cache"
    assert environment["REALTIME_MODEL"] == "synquid/gemma-3-27b-it-FP8", "env_file .env is not read"
    volumes = [v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in gateway["volumes"]]
    targets = {v.split(":")[1]: v.split(":")[0] for v in volumes}
    assert targets["/var/run/docker.sock"] == "/var/run/docker.sock"
    assert targets["/host_hf_cache"] == "/srv/hf-cache"
    assert targets["/app/config"].endswith("/config"), "mount the config directory (keys file replaced by rename)"
    ports = {str(p["target"]) if isinstance(p, dict) else str(p).split(":")[-1].split("/")[0]: p
             for p in gateway["ports"]}
    assert "8000" in ports
    redis_ports = [str(p) if not isinstance(p, dict) else f"{p.get('host_ip', '')}:{p['published']}:{p['target']}"
                   for p in config["services"]["redis"]["ports"]]
    assert any(p.startswith("127.0.0.1:6379:6379") for p in redis_ports), redis_ports
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    grace = str(gateway["stop_grace_period"])
    assert grace.endswith("s") and int(grace.rstrip("s")) >= 60


@pytest.mark.slow
def test_compose_refuses_to_start_without_host_hf_cache(tmp_path: Path) -> None:
    result = compose_config(tmp_path, "REALTIME_MODEL=x\n")
    assert result.returncode != 0
    assert "HOST_HF_CACHE" in result.stderr


def test_orchestrator_image_context_excludes_state_and_secrets() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for entry in (".venv", ".git", "var", ".env", "config/auth.keys.json"):
        assert entry in ignored, f"{entry} must stay out of the image"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'CMD ["llm-gateway", "serve"]' in dockerfile
    assert "STOPSIGNAL SIGTERM" in dockerfile and "HEALTHCHECK" in dockerfile
    # The custom runtime image (runtime/Dockerfile) is a separate, documented build.
    assert (ROOT / "runtime" / "Dockerfile").exists()
