"""The simulator's contention model: a continuous-batching engine loop shaped like vLLM's v1 scheduler.

One engine step schedules tokens for the running sequences first (a decode is one token, an unfinished
prefill a chunk), then admits waiting sequences while the per-step token budget
(``max_num_batched_tokens``), the sequence limit (``max_num_seqs``) and the KV cache allow. When a
running sequence cannot get a KV block, the engine preempts one (the lowest priority under the
priority policy, the newest running one under FCFS), frees its blocks and puts it back in the waiting
queue to be recomputed, and admits nobody else in that step. This follows
``vllm/v1/core/sched/scheduler.py`` and ``request_queue.py`` of vLLM 0.32: the waiting queue is FIFO, or
a heap on (priority, arrival time) where a lower value runs first; a waiting request never preempts a
running one directly, and a full ``max_num_seqs`` keeps even a priority-0 request waiting.

A step lasts ``step_base + step_per_seq * sequences + step_per_prefill_token * prefill tokens +
step_per_context_token * context tokens`` seconds (context tokens: the KV every scheduled sequence
attends to). Its outputs (one token per sequence whose prompt is fully computed) appear at its end.

The core (:class:`Engine`) is synchronous and reads time from an injectable clock, so its scheduling
can be tested step by step without sleeping; :class:`EngineLoop` drives it in asyncio for the server.
Standard library only: the simulator's Docker image has nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

POLICIES = ("fcfs", "priority")


@dataclass(frozen=True)
class EngineProfile:
    """The engine's limits and its step-time coefficients (seconds)."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    kv_cache_tokens: int = 65536
    block_size: int = 16
    policy: str = "fcfs"
    step_base: float = 0.006
    step_per_seq: float = 0.00002
    step_per_prefill_token: float = 0.00003
    step_per_context_token: float = 0.00000004

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"scheduling policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "kv_cache_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("step_base", "step_per_seq", "step_per_prefill_token", "step_per_context_token"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0")

    @property
    def num_blocks(self) -> int:
        """KV-cache blocks (whole blocks only, as vLLM allocates them)."""
        return max(1, self.kv_cache_tokens // self.block_size)

    def step_time(self, seqs: int, prefill_tokens: int, context_tokens: int) -> float:
        """Seconds one step takes."""
        return (self.step_base + self.step_per_seq * seqs + self.step_per_prefill_token * prefill_tokens
                + self.step_per_context_token * context_tokens)

    def with_overrides(self, **changes: object) -> EngineProfile:
        """A copy with the given fields replaced (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[arg-type]


# Profiles (docs/co-serving.md gives the sources and the derivation of each figure).
PROFILES: dict[str, EngineProfile] = {
    # Llama-3.1-8B, bf16, one H100 80GB SXM, vLLM V1 defaults for an H100 API server: decode ~6.5 ms
    # per token alone; weights 16 GB read each step; KV 128 KiB per token (32 layers x 8 KV heads x 128
    # x 2 x 2 bytes) read at ~3.3 TB/s; prefill ~16 GFLOP per token at ~500 TFLOP/s achieved.
    "gpu-like": EngineProfile(max_num_seqs=1024, max_num_batched_tokens=8192, kv_cache_tokens=400_000,
                              block_size=16, step_base=0.0060, step_per_seq=0.000020,
                              step_per_prefill_token=0.000032, step_per_context_token=0.000000040),
    # The CPU tier's shape: tiny-llama-a (hidden 128, 2 layers, fp32) under vLLM 0.32 on 2 shared cores,
    # fitted to scripts/calibrate_contention.py runs (docs/co-serving.md): ~1.9 ms a step, ~0.0094 ms a
    # prefill token, ~0.15 us a context token; vLLM's CPU defaults for an API server (128 sequences,
    # 2,048 tokens a step); a 1 GiB KV cache (VLLM_CPU_KVCACHE_SPACE=1) at 1 KiB a token never fills.
    "cpu-tiny": EngineProfile(max_num_seqs=128, max_num_batched_tokens=2048, kv_cache_tokens=1_048_576,
                              block_size=16, step_base=0.0019, step_per_seq=0.000010,
                              step_per_prefill_token=0.0000094, step_per_context_token=0.00000015),
}


class Sequence:
    """One sequence the engine generates: a prompt, an output length and a priority."""

    _ids = itertools.count()

    def __init__(self, prompt_tokens: int, max_tokens: int, priority: int = 0,
                 arrival_time: float | None = None, request_id: str | None = None,
                 on_update: Callable[[Sequence], None] | None = None) -> None:
        if prompt_tokens < 1 or max_tokens < 1:
            raise ValueError("a sequence needs at least one prompt token and one output token")
        self.seq_no = next(self._ids)
        self.request_id = request_id or f"seq-{self.seq_no}"
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.priority = priority
        self.arrival_time = arrival_time
        self.on_update = on_update
        self.num_computed = 0  # tokens whose KV is in the cache
        self.output_tokens = 0  # tokens generated so far
        self.blocks = 0  # KV blocks held
        self.num_preemptions = 0
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.last_gap = 0.0  # seconds between the last two tokens (an inter-token latency)
        self.finished = False
        self.aborted = False

    @property
    def num_tokens(self) -> int:
        """Prompt plus output so far: what the KV must hold before the next token is sampled."""
        return self.prompt_tokens + self.output_tokens

    def sort_key(self) -> tuple[int, float, int]:
        """vLLM's ordering under the priority policy: priority, then arrival, then a tie-breaker."""
        return (self.priority, self.arrival_time or 0.0, self.seq_no)

    def __lt__(self, other: Sequence) -> bool:
        return self.sort_key() < other.sort_key()

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id}, prio={self.priority}, computed={self.num_computed}/"
                f"{self.num_tokens}, out={self.output_tokens}/{self.max_tokens})")


class _WaitingQueue:
    """FCFS deque or priority heap, with vLLM's prepend semantics (a heap has no front)."""

    def __init__(self, policy: str) -> None:
        self.priority = policy == "priority"
        self._deque: deque[Sequence] = deque()
        self._heap: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        if self.priority:
            heapq.heappush(self._heap, seq)
        else:
            self._deque.append(seq)

    def prepend(self, seq: Sequence) -> None:
        if self.priority:
            heapq.heappush(self._heap, seq)
        else:
            self._deque.appendleft(seq)

    def peek(self) -> Sequence:
        return self._heap[0] if self.priority else self._deque[0]

    def pop(self) -> Sequence:
        return heapq.heappop(self._heap) if self.priority else self._deque.popleft()

    def remove(self, seq: Sequence) -> bool:
        if self.priority:
            if seq in self._heap:
                self._heap.remove(seq)
                heapq.heapify(self._heap)
                return True
            return False
        try:
            self._deque.remove(seq)
            return True
        except ValueError:
            return False

    def __len__(self) -> int:
        return len(self._heap) if self.priority else len(self._deque)

    def __iter__(self) -> Iterator[Sequence]:
        if self.priority:
            return iter(sorted(self._heap))
        return iter(self._deque)


@dataclass
class Step:
    """One scheduled step: tokens per sequence, what it costs and when it started."""

    started: float
    scheduled: dict[Sequence, int] = field(default_factory=dict)
    preempted: list[Sequence] = field(default_factory=list)
    prefill_tokens: int = 0
    context_tokens: int = 0
    duration: float = 0.0

    @property
    def num_tokens(self) -> int:
        """Tokens computed in this step."""
        return sum(self.scheduled.values())


@dataclass
class StepOutput:
    """What a finished step produced."""

    step: Step
    emitted: list[Sequence]  # sequences that generated one token
    finished: list[Sequence]
    ended: float


class Engine:
    """The continuous-batching scheduler and its KV-cache accounting, driven one step at a time."""

    def __init__(self, profile: EngineProfile, clock: Callable[[], float] = time.monotonic) -> None:
        self.profile = profile
        self.clock = clock
        self.waiting = _WaitingQueue(profile.policy)
        self.running: list[Sequence] = []
        self.free_blocks = profile.num_blocks
        self.num_preemptions = 0
        self.steps = 0
        self.busy_time = 0.0

    # -- requests ------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a sequence (stamping its arrival with the clock when it has none)."""
        blocks = math.ceil((seq.prompt_tokens + seq.max_tokens) / self.profile.block_size)
        if blocks > self.profile.num_blocks:
            raise ValueError(f"a sequence of {seq.prompt_tokens + seq.max_tokens} tokens can never fit "
                             f"the KV cache of {self.profile.num_blocks * self.profile.block_size} tokens")
        if seq.arrival_time is None:
            seq.arrival_time = self.clock()
        self.waiting.add(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop a sequence (the client went away), freeing its KV blocks."""
        if seq.finished:
            return
        seq.aborted = seq.finished = True
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._free(seq)

    def has_work(self) -> bool:
        """Whether a step would schedule anything."""
        return bool(self.running) or bool(len(self.waiting))

    # -- gauges --------------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        """vllm:num_requests_running."""
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        """vllm:num_requests_waiting (preempted sequences included)."""
        return len(self.waiting)

    @property
    def kv_cache_usage(self) -> float:
        """vllm:kv_cache_usage_perc: the share of KV blocks in use, 0 to 1."""
        return 1.0 - self.free_blocks / self.profile.num_blocks

    # -- scheduling ----------------------------------------------------------------------------

    def _allocate(self, seq: Sequence, num_new: int) -> bool:
        need = math.ceil((seq.num_computed + num_new) / self.profile.block_size) - seq.blocks
        if need <= 0:
            return True
        if need > self.free_blocks:
            return False
        self.free_blocks -= need
        seq.blocks += need
        return True

    def _free(self, seq: Sequence) -> None:
        self.free_blocks += seq.blocks
        seq.blocks = 0

    def _preempt(self, seq: Sequence) -> None:
        self._free(seq)
        seq.num_computed = 0  # recomputed from scratch (prompt and the output so far) when resumed
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.prepend(seq)

    def schedule(self) -> Step:
        """Plan one step (allocating KV blocks); the caller waits step.duration, then calls complete()."""
        profile = self.profile
        step = Step(started=self.clock())
        budget = profile.max_num_batched_tokens
        scheduled = step.scheduled
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_tokens - seq.num_computed, budget)
            allocated = True
            while not self._allocate(seq, num_new):
                if profile.policy == "priority":
                    victim = max(self.running, key=lambda r: (r.priority, r.arrival_time or 0.0))
                    victim_index = self.running.index(victim)
                    del self.running[victim_index]
                    if victim_index < index:
                        index -= 1
                    if victim in scheduled:
                        budget += scheduled.pop(victim)
                else:
                    victim = self.running.pop()
                self._preempt(victim)
                step.preempted.append(victim)
                if victim is seq:
                    allocated = False
                    break
            if not allocated:
                break
            scheduled[seq] = num_new
            budget -= num_new
            index += 1
        if not step.preempted:
            while budget > 0 and len(self.waiting):
                if len(self.running) >= profile.max_num_seqs:
                    break
                seq = self.waiting.peek()
                num_new = min(seq.num_tokens - seq.num_computed, budget)
                if not self._allocate(seq, num_new):
                    break
                self.waiting.pop()
                self.running.append(seq)
                scheduled[seq] = num_new
                budget -= num_new
        for seq, num_new in scheduled.items():
            if num_new > 1 or seq.output_tokens == 0 or seq.num_computed < seq.num_tokens - 1:
                step.prefill_tokens += num_new
            step.context_tokens += seq.num_computed + num_new
        # A step that scheduled nothing (it only preempted) runs no forward pass.
        if scheduled:
            step.duration = profile.step_time(len(scheduled), step.prefill_tokens, step.context_tokens)
        return step

    def complete(self, step: Step) -> StepOutput:
        """Apply a step's outputs at the clock's time: tokens sampled, sequences finished."""
        now = self.clock()
        self.steps += 1
        self.busy_time += step.duration
        emitted: list[Sequence] = []
        finished: list[Sequence] = []
        for seq, num_new in step.scheduled.items():
            if seq.finished:  # aborted while the step ran
                continue
            seq.num_computed += num_new
            if seq.num_computed < seq.num_tokens:
                continue  # a prefill chunk: no token yet
            seq.output_tokens += 1
            if seq.first_token_time is None:
                seq.first_token_time = now
            else:
                seq.last_gap = now - (seq.last_token_time or now)
            seq.last_token_time = now
            emitted.append(seq)
            if seq.output_tokens >= seq.max_tokens:
                seq.finished = True
                self.running.remove(seq)
                self._free(seq)
                finished.append(seq)
        for seq in emitted:
            if seq.on_update is not None:
                seq.on_update(seq)
        return StepOutput(step=step, emitted=emitted, finished=finished, ended=now)


class ManualClock:
    """A clock that moves only when told: for deterministic tests and simulated-time runs."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self.now += seconds


def run_step(engine: Engine, clock: ManualClock) -> StepOutput:
    """Schedule one step, let its duration pass on the manual clock, and complete it."""
    step = engine.schedule()
    clock.advance(step.duration)
    return engine.complete(step)


class EngineLoop:
    """Runs an Engine in asyncio: one step at a time, sleeping each step's duration.

    Steps follow each other on an absolute schedule while the engine is busy, so a late wake-up of a
    loaded simulator process is caught up instead of slowing the simulated GPU down; a lag beyond
    ``max_lag`` is given up (the schedule restarts from now).
    """

    def __init__(self, engine: Engine, on_step: Callable[[StepOutput], None] | None = None,
                 max_lag: float = 0.05) -> None:
        self.engine = engine
        self.on_step = on_step
        self.max_lag = max_lag
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the loop task in the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Cancel the loop task."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence and wake the loop."""
        self.engine.add(seq)
        self._wake.set()

    def abort(self, seq: Sequence) -> None:
        """Abort a sequence."""
        self.engine.abort(seq)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        engine = self.engine
        next_start: float | None = None
        while True:
            if not engine.has_work():
                next_start = None
                self._wake.clear()
                await self._wake.wait()
                continue
            now = loop.time()
            if next_start is None or now - next_start > self.max_lag:
                next_start = now
            step = engine.schedule()
            if not step.scheduled:
                if step.preempted:
                    continue  # the blocks it freed let the next step run
                # Nothing fits (cannot happen while sequences run, add() refuses what never fits).
                next_start = None
                self._wake.clear()
                await self._wake.wait()
                continue
            end = next_start + step.duration
            delay = end - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            output = engine.complete(step)
            next_start = end
            if self.on_step is not None:
                self.on_step(output)


# --------------------------------------------------------------------------------------------
# Command line (the simulator adds these to its parser)
# --------------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (the simulator's command line uses it too)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _milliseconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value / 1000.0


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The contention model's options: vLLM's spellings of its limits, and --sim-* for the rest.

    The vLLM-spelled options take effect only with the contention model on (--sim-contention or
    --sim-profile); without it the simulator keeps its fixed --sim-ttft/--sim-itl timing.
    """
    group = parser.add_argument_group("contention model (off unless --sim-contention or --sim-profile)")
    group.add_argument("--sim-contention", action="store_true",
                       help="serve through the continuous-batching engine model (default profile gpu-like)")
    group.add_argument("--sim-profile", choices=sorted(PROFILES), default=None,
                       help="engine parameters to start from (implies --sim-contention)")
    group.add_argument("--max-num-seqs", type=positive_int, default=None,
                       help="most sequences running at once (vLLM spelling)")
    group.add_argument("--max-num-batched-tokens", type=positive_int, default=None,
                       help="token budget of one engine step, chunked prefill included (vLLM spelling)")
    group.add_argument("--scheduling-policy", choices=POLICIES, default=None,
                       help="waiting-queue order (vLLM spelling; default fcfs)")
    group.add_argument("--block-size", type=positive_int, default=None,
                       help="tokens per KV-cache block (vLLM spelling)")
    group.add_argument("--sim-kv-cache-tokens", type=positive_int, default=None,
                       help="KV-cache capacity in tokens")
    group.add_argument("--sim-step-base-ms", type=_milliseconds, default=None,
                       help="fixed cost of one engine step, ms")
    group.add_argument("--sim-step-per-seq-ms", type=_milliseconds, default=None,
                       help="step cost per scheduled sequence, ms")
    group.add_argument("--sim-step-per-prefill-token-ms", type=_milliseconds, default=None,
                       help="step cost per prefill token, ms")
    group.add_argument("--sim-step-per-context-token-ms", type=_milliseconds, default=None,
                       help="step cost per KV token attended to, ms")


def engine_profile_from_args(args: argparse.Namespace) -> EngineProfile | None:
    """The engine profile the parsed options ask for, or None with the contention model off."""
    if not (args.sim_contention or args.sim_profile):
        return None
    base = PROFILES[args.sim_profile or "gpu-like"]
    return base.with_overrides(
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        policy=args.scheduling_policy, block_size=args.block_size,
        kv_cache_tokens=args.sim_kv_cache_tokens, step_base=args.sim_step_base_ms,
        step_per_seq=args.sim_step_per_seq_ms, step_per_prefill_token=args.sim_step_per_prefill_token_ms,
        step_per_context_token=args.sim_step_per_context_token_ms)


def describe(profile: EngineProfile) -> str:
    """One log line's worth of the profile."""
    return (f"policy={profile.policy} max_num_seqs={profile.max_num_seqs} "
            f"max_num_batched_tokens={profile.max_num_batched_tokens} "
            f"kv_cache_tokens={profile.num_blocks * profile.block_size} step={profile.step_base * 1e3:g}ms"
            f"+{profile.step_per_seq * 1e3:g}ms/seq+{profile.step_per_prefill_token * 1e3:g}ms/prefill-token"
            f"+{profile.step_per_context_token * 1e3:g}ms/context-token")
