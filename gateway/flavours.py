"""Runtime flavours: what differs between vLLM and SGLang at the process and HTTP boundary.

Both serve the OpenAI API under /v1 and answer GET /health; they differ in how they are launched
(vLLM's image has its API server as ENTRYPOINT, SGLang's does not), their default port, and whether
the sleep endpoints exist (vLLM only, with `--enable-sleep-mode` and VLLM_SERVER_DEV_MODE=1).

With the process backend, RUNTIME_COMMAND names the server program and the flavour appends its
arguments: e.g. `python -m vllm.entrypoints.openai.api_server` (vllm) or
`python3 -m sglang.launch_server` (sglang). The default command is the simulator, which accepts both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.settings import RuntimeType, Settings

MODELS_PATH = "/v1/models"


@dataclass(frozen=True, slots=True)
class Flavour:
    """How to launch and probe one runtime family."""

    name: str
    container_port: int
    model_flag: str
    health_path: str = "/health"
    metrics_path: str = "/metrics"
    models_path: str = MODELS_PATH
    # The image's ENTRYPOINT already is the server for vLLM; SGLang's Cmd has to name the module.
    docker_entry: tuple[str, ...] = ()
    sleep_path: str | None = None
    wake_path: str | None = None
    is_sleeping_path: str | None = None
    priority_args: tuple[str, ...] = ()
    """Server arguments that turn on priority scheduling with vLLM's order (a lower value runs first)."""
    missing_paths: frozenset[str] = frozenset()
    """Proxied API paths this runtime does not serve; the gateway answers 404 endpoint_not_supported."""

    def serves(self, path: str) -> bool:
        """True when the runtime has the API endpoint at `path`."""
        return path not in self.missing_paths

    @property
    def supports_sleep(self) -> bool:
        """True when the runtime can release GPU memory without exiting (vLLM sleep mode)."""
        return self.sleep_path is not None

    def server_args(self, model: str, host: str, port: int, extra: Sequence[str] = ()) -> list[str]:
        """The server's own arguments: model, listen address, then RUNTIME_ARGS (which may override)."""
        return [self.model_flag, model, "--host", host, "--port", str(port), *extra]

    def docker_cmd(self, model: str, extra: Sequence[str] = ()) -> list[str]:
        """The container Cmd: listens on all interfaces at the flavour's fixed container port."""
        return [*self.docker_entry, *self.server_args(model, "0.0.0.0", self.container_port, extra)]

    def process_cmd(self, command: Sequence[str], model: str, port: int, extra: Sequence[str] = ()) -> list[str]:
        """argv for the process backend: RUNTIME_COMMAND then the server arguments on loopback."""
        return [*command, *self.server_args(model, "127.0.0.1", port, extra)]


VLLM = Flavour(
    name="vllm",
    container_port=8000,
    model_flag="--model",
    sleep_path="/sleep?level=1",
    wake_path="/wake_up",
    is_sleeping_path="/is_sleeping",
    priority_args=("--scheduling-policy", "priority"),
)

SGLANG = Flavour(
    name="sglang",
    container_port=30000,
    model_flag="--model-path",
    docker_entry=("python3", "-m", "sglang.launch_server"),
    # SGLang runs higher values first unless told otherwise; the gateway speaks vLLM's order everywhere.
    priority_args=("--enable-priority-scheduling", "--schedule-low-priority-values-first"),
    # sglang/srt/entrypoints/http_server.py serves /v1/embeddings, /v1/score, /v1/rerank, /v1/responses,
    # /tokenize and /detokenize, but has no /pooling and no Cohere-style /rerank or /v2/rerank.
    missing_paths=frozenset({"/pooling", "/rerank", "/v2/rerank"}),
)

FLAVOURS: dict[RuntimeType, Flavour] = {RuntimeType.VLLM: VLLM, RuntimeType.SGLANG: SGLANG}


def flavour_for(runtime_type: RuntimeType | str) -> Flavour:
    """The flavour for a RUNTIME_TYPE value."""
    return FLAVOURS[RuntimeType(runtime_type)]


def runtime_args(settings: Settings, flavour: Flavour) -> list[str]:
    """The extra server arguments of a managed runtime: priority scheduling when on, then RUNTIME_ARGS.

    The priority flags are left out when RUNTIME_ARGS already names a scheduling policy of its own.
    """
    extra = settings.runtime_args_list
    own = {"--scheduling-policy", "--enable-priority-scheduling"}
    if settings.priority_scheduling and not own.intersection(a.split("=", 1)[0] for a in extra):
        return [*flavour.priority_args, *extra]
    return extra
