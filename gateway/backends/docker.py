"""Docker backend: the runtime as the `llm_runtime` container, driven through aiodocker.

Create config (see `build_config`):
- Cmd from the flavour (vLLM's image has the server as ENTRYPOINT; SGLang's Cmd names its module).
- GPUs through a DeviceRequest for the nvidia driver: all GPUs, a list of indices, or none; `auto`
  asks `docker info` whether an `nvidia` runtime is installed (hosts without one, as CI, get none).
- HOST_HF_CACHE bound at /host_hf_cache with HF_HOME pointing there, so weights are downloaded once.
- Shared memory: PyTorch workers (tensor parallelism) pass tensors through /dev/shm, whose Docker
  default of 64 MiB is far too small. We set ShmSize (RUNTIME_SHM_SIZE, 8g by default: tmpfs only
  uses what is written) or, with RUNTIME_IPC_HOST=true, share the host's IPC namespace as vLLM's docs
  suggest (less isolation). No Ulimits: SGLang's compose file raises memlock, but a daemon without
  CAP_SYS_RESOURCE (rootless, nested) then refuses to start the container at all.
- Init (tini) as PID 1 so the server's worker processes are reaped and signals forwarded.
- A Docker HEALTHCHECK on the flavour's health path (python3 is in every runtime image) so a wedged
  server shows up as a `health_status: unhealthy` event.
- Network: with RUNTIME_NETWORK the container joins that network and is reached by name; otherwise
  its port is published on 127.0.0.1 (RUNTIME_PORT, or a random port) and reached there.
- Labels: managed=true, the model, and a hash of the whole config, which decides whether a leftover
  container from a previous gateway can be adopted as is.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from typing import Any

import aiodocker
import orjson
import structlog
from aiodocker.events import DockerEvents

from gateway.backends.base import BackendError, ExitInfo, RuntimeBackend
from gateway.flavours import Flavour, flavour_for, runtime_args
from gateway.settings import Settings

LABEL_MANAGED = "llm-gateway.managed"
LABEL_MODEL = "llm-gateway.model"
LABEL_CONFIG = "llm-gateway.config"
HF_MOUNT = "/host_hf_cache"

_NS = 1_000_000_000


def _healthcheck(flavour: Flavour, timeout: float) -> dict[str, Any]:
    url = f"http://127.0.0.1:{flavour.container_port}{flavour.health_path}"
    script = f"import urllib.request as u; u.urlopen({url!r}, timeout=5)"
    return {
        "Test": ["CMD", "python3", "-c", script],
        "Interval": 15 * _NS,
        "Timeout": 10 * _NS,
        "Retries": 3,
        # Loading weights can take many minutes; failures during that window do not count.
        "StartPeriod": int(timeout * _NS),
    }


def config_hash(config: dict[str, Any]) -> str:
    """Stable hash of a create config, labels excluded (they carry the hash itself)."""
    stripped = {k: v for k, v in config.items() if k != "Labels"}
    return hashlib.sha256(orjson.dumps(stripped, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def build_config(settings: Settings, model: str, *, nvidia_available: bool,
                 flavour: Flavour | None = None) -> dict[str, Any]:
    """The Docker Engine create config for a runtime container serving `model`."""
    flavour = flavour or flavour_for(settings.runtime_type)
    port_key = f"{flavour.container_port}/tcp"
    env = dict(settings.runtime_env_dict)
    host_config: dict[str, Any] = {
        "Init": True,
        "RestartPolicy": {"Name": "no"},
    }
    if settings.runtime_ipc_host:
        host_config["IpcMode"] = "host"
    else:
        host_config["ShmSize"] = settings.runtime_shm_bytes
    if settings.host_hf_cache:
        host_config["Binds"] = [f"{settings.host_hf_cache}:{HF_MOUNT}"]
        env.setdefault("HF_HOME", HF_MOUNT)
    if settings.runtime_network:
        host_config["NetworkMode"] = settings.runtime_network
    else:
        host_port = str(settings.runtime_port) if settings.runtime_port else ""
        host_config["PortBindings"] = {port_key: [{"HostIp": "127.0.0.1", "HostPort": host_port}]}
    if settings.runtime_cpus:
        host_config["CpusetCpus"] = settings.runtime_cpus  # RUNTIME_CPUS: the runtime stays off the others
    gpus = settings.runtime_gpus
    if gpus == "all" or (gpus == "auto" and nvidia_available):
        host_config["DeviceRequests"] = [{"Driver": "nvidia", "Count": -1, "Capabilities": [["gpu"]]}]
    elif gpus not in ("auto", "none"):
        host_config["DeviceRequests"] = [{"Driver": "nvidia", "DeviceIDs": gpus.split(","),
                                          "Capabilities": [["gpu"]]}]
    config: dict[str, Any] = {
        "Image": settings.runtime_image,
        "Cmd": flavour.docker_cmd(model, runtime_args(settings, flavour)),
        "Env": [f"{k}={v}" for k, v in sorted(env.items())],
        "ExposedPorts": {port_key: {}},
        "HostConfig": host_config,
        "StopTimeout": max(1, round(settings.runtime_stop_timeout)),
    }
    if settings.runtime_docker_healthcheck:
        config["Healthcheck"] = _healthcheck(flavour, settings.runtime_start_timeout)
    config["Labels"] = {LABEL_MANAGED: "true", LABEL_MODEL: model, LABEL_CONFIG: config_hash(config)}
    return config


class DockerBackend(RuntimeBackend):
    """Runs the runtime as one named container."""

    kind = "docker"
    events_retry_interval = 1.0

    def __init__(self, settings: Settings, flavour: Flavour | None = None,
                 docker: aiodocker.Docker | None = None) -> None:
        self.settings = settings
        self.flavour = flavour or flavour_for(settings.runtime_type)
        self.name = settings.runtime_container_name
        self.log = structlog.get_logger(component="runtime.docker")
        self._docker = docker
        self._owns_client = docker is None
        self._nvidia: bool | None = None
        self._container_id: str | None = None
        self._since: float = 0.0

    @property
    def container_id(self) -> str | None:
        """Id of the container this backend started or adopted."""
        return self._container_id

    async def client(self) -> aiodocker.Docker:
        """The aiodocker client (created on first use, inside the running loop)."""
        if self._docker is None:
            self._docker = aiodocker.Docker()
        return self._docker

    async def nvidia_available(self) -> bool:
        """True when `docker info` lists an nvidia runtime (asked once)."""
        if self._nvidia is None:
            docker = await self.client()
            try:
                info = await docker.system.info()
            except aiodocker.DockerError as exc:
                raise BackendError(f"docker info failed: {exc.message}") from exc
            self._nvidia = "nvidia" in (info.get("Runtimes") or {})
        return self._nvidia

    async def config_for(self, model: str) -> dict[str, Any]:
        """The create config for `model` on this host."""
        nvidia = self.settings.runtime_gpus == "auto" and await self.nvidia_available()
        return build_config(self.settings, model, nvidia_available=nvidia, flavour=self.flavour)

    # --- lifecycle
    async def adopt(self, model: str) -> str | None:
        """Adopt a running leftover container with the same config label; remove any other."""
        docker = await self.client()
        try:
            info = await (await docker.containers.get(self.name)).show()
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return None
            raise BackendError(f"cannot inspect container {self.name}: {exc.message}") from exc
        wanted = (await self.config_for(model))["Labels"][LABEL_CONFIG]
        labels = (info.get("Config") or {}).get("Labels") or {}
        running = bool((info.get("State") or {}).get("Running"))
        if running and labels.get(LABEL_CONFIG) == wanted:
            self._container_id = info["Id"]
            self._since = time.time()
            self.log.info("runtime_container_adopted", container=self.name, model=model)
            return self._url(info)
        self.log.warning("runtime_container_replaced", container=self.name, running=running,
                         managed=labels.get(LABEL_MANAGED) == "true", old_model=labels.get(LABEL_MODEL))
        await self._remove(info["Id"], graceful=running)
        return None

    async def remove_leftover(self) -> None:
        """Remove the container named RUNTIME_CONTAINER_NAME, if one is left."""
        docker = await self.client()
        try:
            info = await (await docker.containers.get(self.name)).show()
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return
            raise BackendError(f"cannot inspect container {self.name}: {exc.message}") from exc
        self.log.warning("runtime_container_leftover_removed", container=self.name)
        await self._remove(info["Id"], graceful=bool((info.get("State") or {}).get("Running")))

    async def start(self, model: str) -> str:
        """Create and start the container (removing any container with its name first)."""
        docker = await self.client()
        config = await self.config_for(model)
        await self.stop()
        await self._remove(self.name, graceful=False)
        try:
            container = await docker.containers.create(config, name=self.name)
            self._container_id = container.id
            self._since = time.time()
            await container.start()
            info = await container.show()
        except aiodocker.DockerError as exc:
            raise BackendError(f"cannot start container {self.name} from {self.settings.runtime_image!r}: "
                               f"{exc.message}") from exc
        self.log.info("runtime_container_started", container=self.name, id=container.id[:12], model=model)
        return self._url(info)

    async def stop(self) -> None:
        """Stop the container (RUNTIME_STOP_TIMEOUT before SIGKILL), then remove it."""
        cid, self._container_id = self._container_id, None
        if cid is not None:
            await self._remove(cid, graceful=True)

    async def logs(self, tail: int = 200) -> str:
        """The container's last `tail` log lines (stdout and stderr)."""
        ref = self._container_id or self.name
        docker = await self.client()
        try:
            chunks = await docker.containers.container(ref).log(stdout=True, stderr=True, tail=tail)
        except aiodocker.DockerError as exc:
            return f"(container logs unavailable: {exc.message})"
        return "".join(chunks).rstrip("\n")

    async def wait_exit(self) -> ExitInfo:
        """Follow the Docker event stream of our container until it dies or turns unhealthy.

        Subscribing with `since` set to the start time replays events that happened before the
        subscription, so a container that dies immediately is not missed. If the stream breaks
        (daemon restart), the container is inspected and the stream re-opened.
        """
        cid = self._container_id
        if cid is None:
            return ExitInfo("exit", None, "no runtime container")
        docker = await self.client()
        oom = False
        since = self._since
        while True:
            # Our own task runs the stream: aiodocker's shared one would ignore our filters.
            events = DockerEvents(docker)  # type: ignore[no-untyped-call]
            subscriber = events.subscribe(create_task=False)  # type: ignore[no-untyped-call]
            stream = asyncio.create_task(events.run(
                since=f"{since - 1:.0f}",
                filters={"type": ["container"], "container": [cid]}), name="runtime:docker-events")
            try:
                while True:
                    event = await subscriber.get()
                    if event is None:
                        break
                    action = str(event.get("Action") or event.get("status") or "")
                    attributes = (event.get("Actor") or {}).get("Attributes") or {}
                    if action == "oom":
                        oom = True
                    elif action == "die":
                        return await self._exit_info(cid, attributes.get("exitCode"), oom)
                    elif action.startswith("health_status") and action.endswith("unhealthy"):
                        return ExitInfo("unhealthy", None, "Docker health check failed")
            finally:
                stream.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiodocker.DockerError):
                    await stream
                await events.stop()  # type: ignore[no-untyped-call]
            # The stream ended without a verdict: look at the container itself, then re-subscribe.
            since = time.time()
            try:
                state = (await docker.containers.container(cid).show()).get("State") or {}
            except aiodocker.DockerError as exc:
                if exc.status == 404:
                    return ExitInfo("exit", None, "container disappeared")
                state = {"Running": True}
            if not state.get("Running"):
                return await self._exit_info(cid, state.get("ExitCode"), oom)
            await asyncio.sleep(self.events_retry_interval)

    async def close(self) -> None:
        """Close the aiodocker client if this backend created it."""
        if self._docker is not None and self._owns_client:
            await self._docker.close()
        self._docker = None

    # --- internals
    def _url(self, info: dict[str, Any]) -> str:
        port_key = f"{self.flavour.container_port}/tcp"
        if self.settings.runtime_network:
            return f"http://{self.name}:{self.flavour.container_port}"
        bindings = ((info.get("NetworkSettings") or {}).get("Ports") or {}).get(port_key) or []
        for binding in bindings:
            if binding.get("HostPort"):
                return f"http://127.0.0.1:{binding['HostPort']}"
        raise BackendError(f"container {self.name} has no published port for {port_key}")

    async def _exit_info(self, cid: str, code: object, oom: bool) -> ExitInfo:
        docker = await self.client()
        with contextlib.suppress(aiodocker.DockerError):
            state = (await docker.containers.container(cid).show()).get("State") or {}
            oom = oom or bool(state.get("OOMKilled"))
            if code is None:
                code = state.get("ExitCode")
        try:
            exit_code = int(code) if code is not None else None  # type: ignore[call-overload]
        except ValueError:
            exit_code = None
        return ExitInfo("oom" if oom else "exit", exit_code)

    async def _remove(self, ref: str, *, graceful: bool) -> None:
        docker = await self.client()
        container = docker.containers.container(ref)
        try:
            if graceful:
                with contextlib.suppress(aiodocker.DockerError):
                    await container.stop(t=max(1, round(self.settings.runtime_stop_timeout)))
            await container.delete(force=True)
            self.log.info("runtime_container_removed", container=ref[:12] if ref != self.name else ref)
        except aiodocker.DockerError as exc:
            # 404: already gone; 409: removal already in progress (e.g. AutoRemove).
            if exc.status not in (404, 409):
                raise BackendError(f"cannot remove container {ref}: {exc.message}") from exc
