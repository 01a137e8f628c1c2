"""RuntimeSupervisor with the Docker backend, against the real Docker Engine and the simulator image."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from gateway.actors.supervisor import RuntimeState, RuntimeSupervisor
from gateway.backends import make_backend
from gateway.backends.docker import HF_MOUNT, LABEL_CONFIG, LABEL_MANAGED, LABEL_MODEL, DockerBackend, build_config
from gateway.settings import Settings
from tests.conftest import REALTIME_MODEL
from tests.polling import wait_for_state
from tests.runtimes import inspect

pytestmark = pytest.mark.docker

# --- the create config (no container started)


def test_create_config(make_settings: Callable[..., Settings]) -> None:
    base = {"runtime_backend": "docker", "runtime_image": "vllm/vllm-openai:v0.11.0",
            "runtime_args": "--max-model-len 8192", "runtime_container_name": "llm_runtime"}
    settings = make_settings(**base)
    config = build_config(settings, "org/model", nvidia_available=False)
    assert config["Image"] == "vllm/vllm-openai:v0.11.0"
    # A managed runtime runs its priority scheduler (RUNTIME_PRIORITY_SCHEDULING=auto), then RUNTIME_ARGS.
    assert config["Cmd"] == ["--model", "org/model", "--host", "0.0.0.0", "--port", "8000",
                             "--scheduling-policy", "priority", "--max-model-len", "8192"]
    off = build_config(make_settings(**base, runtime_priority_scheduling="off"), "org/model", nvidia_available=False)
    assert "--scheduling-policy" not in off["Cmd"]
    host = config["HostConfig"]
    assert "DeviceRequests" not in host  # auto on a host without an nvidia runtime: no GPU request
    assert host["PortBindings"] == {"8000/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]}
    assert host["ShmSize"] == 8 << 30 and "IpcMode" not in host
    assert "CpusetCpus" not in host
    pinned = build_config(make_settings(**base, runtime_cpus="1-7"), "org/model", nvidia_available=False)
    assert pinned["HostConfig"]["CpusetCpus"] == "1-7"  # RUNTIME_CPUS: the gateway's CPU stays free
    assert "Binds" not in host and not any(e.startswith("HF_HOME=") for e in config["Env"])
    assert config["Labels"][LABEL_MANAGED] == "true" and config["Labels"][LABEL_MODEL] == "org/model"
    assert config["Healthcheck"]["Test"][:2] == ["CMD", "python3"]

    # auto with an nvidia runtime, and "all": every GPU.
    every = [{"Driver": "nvidia", "Count": -1, "Capabilities": [["gpu"]]}]
    assert build_config(settings, "org/model", nvidia_available=True)["HostConfig"]["DeviceRequests"] == every
    all_gpus = make_settings(**base, runtime_gpus="all")
    assert build_config(all_gpus, "org/model", nvidia_available=False)["HostConfig"]["DeviceRequests"] == every
    some = make_settings(**base, runtime_gpus="0,1")
    assert build_config(some, "org/model", nvidia_available=False)["HostConfig"]["DeviceRequests"] == [
        {"Driver": "nvidia", "DeviceIDs": ["0", "1"], "Capabilities": [["gpu"]]}]
    none = make_settings(**base, runtime_gpus="none")
    assert "DeviceRequests" not in build_config(none, "org/model", nvidia_available=True)["HostConfig"]

    # HF cache, network, IPC, environment.
    other = make_settings(**base, host_hf_cache="/srv/hf", runtime_network="llmnet", runtime_ipc_host=True,
                          runtime_env="HF_TOKEN=secret VLLM_SERVER_DEV_MODE=1", runtime_type="sglang")
    config2 = build_config(other, "org/model", nvidia_available=False)
    host2 = config2["HostConfig"]
    assert host2["Binds"] == [f"/srv/hf:{HF_MOUNT}"]
    assert f"HF_HOME={HF_MOUNT}" in config2["Env"] and "HF_TOKEN=secret" in config2["Env"]
    assert host2["NetworkMode"] == "llmnet" and "PortBindings" not in host2
    assert host2["IpcMode"] == "host" and "ShmSize" not in host2
    assert config2["Cmd"][:5] == ["python3", "-m", "sglang.launch_server", "--model-path", "org/model"]
    assert "30000/tcp" in config2["ExposedPorts"]

    # The config label changes with anything that changes the container, and only then.
    again = build_config(make_settings(**base), "org/model", nvidia_available=False)
    assert again["Labels"][LABEL_CONFIG] == config["Labels"][LABEL_CONFIG]
    changed_args = make_settings(**{**base, "runtime_args": "--max-model-len 4096"})
    assert build_config(changed_args, "org/model", nvidia_available=False)["Labels"][LABEL_CONFIG] != \
        config["Labels"][LABEL_CONFIG]
    assert build_config(settings, "org/other", nvidia_available=False)["Labels"][LABEL_CONFIG] != \
        config["Labels"][LABEL_CONFIG]


async def test_gpu_request_follows_this_hosts_docker_info(docker_settings: Callable[..., Settings]) -> None:
    # This Docker Engine has no nvidia runtime: "auto" must not ask for GPUs (the container would not start).
    backend = make_backend(docker_settings())
    assert isinstance(backend, DockerBackend)
    try:
        assert await backend.nvidia_available() is False
        assert "DeviceRequests" not in (await backend.config_for(REALTIME_MODEL))["HostConfig"]
        backend_all = DockerBackend(docker_settings(runtime_gpus="all"))
        try:
            assert (await backend_all.config_for(REALTIME_MODEL))["HostConfig"]["DeviceRequests"][0]["Count"] == -1
        finally:
            await backend_all.close()
    finally:
        await backend.close()


# --- containers


async def test_container_lifecycle_crash_and_restart(docker_settings: Callable[..., Settings],
                                                     supervisors: Callable[..., RuntimeSupervisor],
                                                     container_name: str, tmp_path: Path) -> None:
    sup = supervisors(docker_settings(runtime_args="--sim-crash-after 1"))
    await sup.start()
    first = await sup.wait_ready(60)
    assert first.model == REALTIME_MODEL and first.base_url is not None
    info = await inspect(container_name)
    assert info is not None and info["State"]["Running"]
    labels = info["Config"]["Labels"]
    assert labels[LABEL_MANAGED] == "true" and labels[LABEL_MODEL] == REALTIME_MODEL
    assert "DeviceRequests" not in info["HostConfig"] or not info["HostConfig"]["DeviceRequests"]
    first_id = info["Id"]

    async with aiohttp.ClientSession() as session:
        body = {"model": REALTIME_MODEL, "prompt": "hi", "max_tokens": 2}
        async with session.post(first.base_url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
        with pytest.raises(aiohttp.ClientError):
            async with session.post(first.base_url + "/v1/completions", json=body) as resp:
                await resp.read()

    # The die event is noticed (no readiness polling while READY), logs are saved, the container replaced.
    failed = await wait_for_state(sup, lambda s: s.state is RuntimeState.FAILED, timeout=30)
    assert "exited with code 1" in (failed.last_error or "")
    text = Path(failed.last_crash_log or "").read_text()
    assert "backend: docker" in text and "/v1/completions" in text
    assert Path(failed.last_crash_log or "").parent == tmp_path / "runtime_failures"

    again = await sup.wait_ready(60)
    assert again.restarts == 1
    info = await inspect(container_name)
    assert info is not None and info["Id"] != first_id and info["State"]["Running"]

    await sup.stop()
    assert await inspect(container_name) is None
    assert sup.snapshot.state is RuntimeState.STOPPED


async def test_exit_at_start_is_noticed_from_the_event_stream(docker_settings: Callable[..., Settings],
                                                              supervisors: Callable[..., RuntimeSupervisor]) -> None:
    sup = supervisors(docker_settings(runtime_args="--sim-exit-at-start 7"))
    sup.backoff_initial = 60.0  # one attempt is enough here
    await sup.start()
    failed = await wait_for_state(sup, lambda s: s.state is RuntimeState.FAILED, timeout=60)
    # Noticed from the die event, not by waiting out the 60 s start timeout.
    assert "exited with code 7 while starting" in (failed.last_error or "")
    assert Path(failed.last_crash_log or "").is_file()


async def test_leftover_container_is_adopted_or_replaced(docker_settings: Callable[..., Settings],
                                                         supervisors: Callable[..., RuntimeSupervisor],
                                                         container_name: str) -> None:
    # A leftover from a previous gateway with the same configuration: adopted as it is.
    settings = docker_settings()
    leftover = DockerBackend(settings)
    try:
        await leftover.start(REALTIME_MODEL)
        leftover_id = leftover.container_id
    finally:
        await leftover.close()
    sup = supervisors(settings)
    await sup.start()
    snap = await sup.wait_ready(60)
    assert snap.model == REALTIME_MODEL
    info = await inspect(container_name)
    assert info is not None and info["Id"] == leftover_id
    await sup.stop()
    assert await inspect(container_name) is None

    # A leftover with another configuration (other runtime args): removed and replaced.
    other = DockerBackend(docker_settings(runtime_args="--sim-output-tokens 3"))
    try:
        await other.start(REALTIME_MODEL)
        other_id = other.container_id
    finally:
        await other.close()
    sup2 = supervisors(docker_settings())
    await sup2.start()
    await sup2.wait_ready(60)
    info = await inspect(container_name)
    assert info is not None and info["Id"] != other_id
    expected = build_config(docker_settings(), REALTIME_MODEL, nvidia_available=False)
    assert info["Config"]["Labels"][LABEL_CONFIG] == expected["Labels"][LABEL_CONFIG]
