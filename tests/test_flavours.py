"""Runtime flavours: launch commands, ports and endpoints of vLLM and SGLang."""

from __future__ import annotations

import pytest

from gateway.flavours import SGLANG, VLLM, flavour_for
from gateway.settings import RuntimeType

MODEL = "org/some-model"


def test_vllm_docker_cmd_relies_on_the_image_entrypoint() -> None:
    # vllm/vllm-openai's ENTRYPOINT is the OpenAI API server: the Cmd holds only its arguments.
    assert VLLM.docker_cmd(MODEL, ["--max-model-len", "4096"]) == [
        "--model", MODEL, "--host", "0.0.0.0", "--port", "8000", "--max-model-len", "4096"]
    assert VLLM.container_port == 8000


def test_sglang_docker_cmd_names_the_launch_module() -> None:
    assert SGLANG.docker_cmd(MODEL, ["--tp", "2"]) == [
        "python3", "-m", "sglang.launch_server", "--model-path", MODEL, "--host", "0.0.0.0",
        "--port", "30000", "--tp", "2"]
    assert SGLANG.container_port == 30000


@pytest.mark.parametrize("flavour, flag", [(VLLM, "--model"), (SGLANG, "--model-path")])
def test_process_cmd_listens_on_loopback(flavour: object, flag: str) -> None:
    cmd = flavour.process_cmd(["python", "-m", "gateway.simulator"], MODEL, 41234, ["--sim-ttft", "0.1"])  # type: ignore[attr-defined]
    assert cmd == ["python", "-m", "gateway.simulator", flag, MODEL, "--host", "127.0.0.1", "--port", "41234",
                   "--sim-ttft", "0.1"]


def test_endpoints_and_sleep_support() -> None:
    for flavour in (VLLM, SGLANG):
        assert flavour.health_path == "/health"
        assert flavour.metrics_path == "/metrics"
        assert flavour.models_path == "/v1/models"
    assert VLLM.supports_sleep
    assert (VLLM.sleep_path, VLLM.wake_path, VLLM.is_sleeping_path) == ("/sleep?level=1", "/wake_up", "/is_sleeping")
    assert not SGLANG.supports_sleep
    assert SGLANG.sleep_path is None


def test_flavour_for_runtime_type() -> None:
    assert flavour_for(RuntimeType.VLLM) is VLLM
    assert flavour_for("sglang") is SGLANG
    with pytest.raises(ValueError):
        flavour_for("tgi")
