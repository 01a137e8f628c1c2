"""Settings: every variable validated at start-up with one clear message naming it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.settings import Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_the_embedded_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert s.runtime_backend == "process"
    assert s.runtime_type == "vllm"
    assert s.listen_host == "0.0.0.0" and s.listen_port == 8000
    assert s.max_body_bytes == 4 * 1024 * 1024
    assert s.internal_eval_key_id == "__internal_eval__"
    assert s.runtime_command_list[1:] == ["-m", "gateway.simulator"]


@pytest.mark.parametrize(("env", "needle"), [
    ({"MAX_CONCURRENT_BATCH": "zero"}, "MAX_CONCURRENT_BATCH"),
    ({"MAX_CONCURRENT_BATCH": "0"}, "MAX_CONCURRENT_BATCH"),
    ({"RUNTIME_TYPE": "tgi"}, "RUNTIME_TYPE"),
    ({"RUNTIME_BACKEND": "k8s"}, "RUNTIME_BACKEND"),
    ({"RUNTIME_ARGS": "--dtype 'unclosed"}, "RUNTIME_ARGS"),
    ({"RUNTIME_GPUS": "first"}, "RUNTIME_GPUS"),
    ({"REDIS_URL": "localhost:6379"}, "REDIS_URL"),
    ({"LISTEN_PORT": "70000"}, "LISTEN_PORT"),
    ({"RUNTIME_BACKEND": "external"}, "RUNTIME_URL"),
    ({"RUNTIME_BACKEND": "docker"}, "RUNTIME_IMAGE"),
])
def test_invalid_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], needle: str) -> None:
    monkeypatch.chdir(ROOT / "tests")  # no .env here
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert needle in str(info.value)


@pytest.mark.slow
def test_cli_stops_with_one_clear_line(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "MAX_CONCURRENT_BATCH": "-3"}
    proc = subprocess.run([sys.executable, "-m", "gateway", "serve"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "MAX_CONCURRENT_BATCH" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_reports_missing_keys_file(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "AUTH_KEYS_FILE": str(tmp_path / "nope.json")}
    proc = subprocess.run([sys.executable, "-m", "gateway", "serve"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "AUTH_KEYS_FILE" in proc.stderr and "nope.json" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", [".env.vllm.example", ".env.sglang.example"])
def test_env_examples_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str) -> None:
    text = (ROOT / name).read_text()
    # Every variable line is explained by a comment right above it.
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith("#"):
            assert i > 0 and lines[i - 1].startswith("#"), f"{name}: line {line!r} has no comment above it"
    (tmp_path / ".env").write_text(text)
    monkeypatch.chdir(tmp_path)
    s = load_settings()
    assert s.runtime_type.value in name
    assert s.runtime_args_list  # the examples pass real runtime arguments
