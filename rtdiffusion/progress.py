"""Build progress: the named stages of a cold start, in order, with the fraction done and an estimate.

A front end (terminal, OSC, web app) makes a :class:`BuildProgress`, subscribes plain callables to it and
passes it to ``StreamEngine.from_pretrained(..., progress=...)``. The engine plans the stages for its backend
and device, and reports each stage's start and finish; the build ends when the first frame is out::

    load weights -> text encoders -> [TensorRT engines] -> [capture] -> [unet, vae_encoder, vae_decoder]
                 -> first frame

Network stages ("unet", "vae_encoder", "vae_decoder") are where the compiled backend compiles, builds or
loads a network (torch.compile, AOTInductor): they run *inside* the stage that first calls the network
(capture on CUDA, the first frame on the CPU), so they are planned right after it. Start events come in plan
order; a network stage finishes before the stage around it. Stages that do not happen (a capture that fell
back, a network the frame never calls) are reported as skipped.

Each listener gets a :class:`StageEvent`: the stage, its 1-based index and the count, whether it started,
finished or was skipped (or the build is done), the fraction of the build done (weighted by the estimates,
never decreasing, 1.0 when done), seconds since the build began and an estimate of the seconds left.

Estimates: the seconds each stage took the last time a build with the same key finished (kept as JSON next
to the engine cache's entries, ``<engine cache root>/.build-times/<key digest>.json``; a stage's own time,
without the network stages inside it), else a fixed prior per stage kind and device (:data:`PRIOR_S`, a
rough guess, not a measurement of this model). ``StageEvent.source`` says which.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

LOAD, TEXT, TRT, CAPTURE, FIRST_FRAME = "load weights", "text encoders", "TensorRT engines", "capture", "first frame"
NETWORKS = ("vae_encoder", "unet", "vae_decoder")  # the compiled backend's networks, in the frame's call order
RECORDS = ".build-times"

# Seconds per stage when nothing is recorded: rough priors by stage kind and device (sd-turbo-sized models;
# the compiled UNet's 60 s on CUDA is about the 88 s cold start of BENCHMARKS.md spread over the networks).
PRIOR_S: dict[tuple[str, str], float] = {
    (LOAD, "cpu"): 5.0, (LOAD, "cuda"): 10.0,
    (TEXT, "cpu"): 1.0, (TEXT, "cuda"): 2.0,
    (TRT, "cuda"): 600.0,
    (CAPTURE, "cuda"): 5.0,
    ("unet", "cpu"): 120.0, ("unet", "cuda"): 60.0,
    ("vae_encoder", "cpu"): 30.0, ("vae_encoder", "cuda"): 10.0,
    ("vae_decoder", "cpu"): 30.0, ("vae_decoder", "cuda"): 10.0,
    (FIRST_FRAME, "cpu"): 2.0, (FIRST_FRAME, "cuda"): 1.0,
}


class StageState(enum.Enum):
    START = "start"
    FINISH = "finish"
    SKIP = "skip"
    DONE = "done"  # the whole build (stage "done", index = count, stage_s = elapsed_s)


class EstimateSource(enum.Enum):
    RECORDED = "recorded"  # every stage's time from the last build with this key
    MIXED = "mixed"  # some recorded, some priors (a stage the last build did not have)
    PRIOR = "prior"  # nothing recorded: PRIOR_S


@dataclass(frozen=True)
class StageEvent:
    stage: str
    index: int  # 1-based position in the plan
    count: int  # stages planned
    state: StageState
    fraction: float  # 0..1 of the whole build, weighted by the estimates; never decreases
    elapsed_s: float  # since the build began
    stage_s: float  # this stage's own seconds so far (at FINISH: all of them)
    estimate_s: float  # seconds left in the whole build, estimated
    source: EstimateSource
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(state=self.state.value, source=self.source.value)
        return d


Listener = Callable[[StageEvent], None]


@dataclass
class _Stage:
    name: str
    index: int
    estimate: float
    network: bool  # may run inside an earlier stage (planned after it)
    state: StageState | None = None  # None: not started
    own_s: float = 0.0  # seconds of its own (not counting stages started inside it)
    resumed: float = 0.0  # when it last started or resumed counting
    note: str = ""


def NO_STAGE(name: str) -> contextlib.AbstractContextManager:
    """The stage hook of a build nobody watches."""
    return contextlib.nullcontext()


def plan_stages(backend: str, device_type: str, *, load: bool = True) -> list[tuple[str, bool]]:
    """(name, is a network stage) in order, for a backend name ('eager', 'graph', 'compiled', 'trt')."""
    captures = device_type == "cuda" and backend != "eager"
    out: list[tuple[str, bool]] = [(LOAD, False)] if load else []
    out.append((TEXT, False))
    if backend == "trt":
        out.append((TRT, False))
    if captures:
        out.append((CAPTURE, False))
    if backend == "compiled" and captures:
        out += [(n, True) for n in NETWORKS]
    out.append((FIRST_FRAME, False))
    if backend == "compiled" and not captures:  # on the CPU the first frame compiles the networks
        out += [(n, True) for n in NETWORKS]
    return out


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


class BuildProgress:
    """Stages of one engine build, reported to subscribed listeners (any thread; listeners run on the
    thread doing the stage and must not block; an exception in one is logged and ignored)."""

    def __init__(self, listeners: tuple[Listener, ...] | list[Listener] = ()) -> None:
        self._listeners: list[Listener] = list(listeners)
        self._lock = threading.RLock()
        self._stages: list[_Stage] = []
        self._running: list[_Stage] = []  # a stack: network stages run inside another
        self._t0: float | None = None
        self._record_path: Path | None = None
        self._key: dict[str, Any] = {}
        self.source = EstimateSource.PRIOR
        self.last: StageEvent | None = None
        self.done = False

    # ---- set-up ----------------------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    @property
    def listeners(self) -> tuple[Listener, ...]:
        return tuple(self._listeners)

    @property
    def planned(self) -> bool:
        return bool(self._stages)

    def plan(self, stages: list[tuple[str, bool]], *, device_type: str, key: dict[str, Any] | None = None,
             root: Path | str | None = None) -> None:
        """Fix the stages and their estimates: from ``root/.build-times/<digest of key>.json`` when a build
        with ``key`` finished before, else PRIOR_S. The clock starts now."""
        recorded: dict[str, float] = {}
        if key is not None and root is not None:
            self._key = key
            self._record_path = Path(root) / RECORDS / f"{key_digest(key)}.json"
            recorded = self._read_record()
        found = 0
        with self._lock:
            self._stages = []
            for i, (name, network) in enumerate(stages, 1):
                if name in recorded:
                    est, found = recorded[name], found + 1
                else:
                    est = PRIOR_S.get((name, device_type), 1.0)
                self._stages.append(_Stage(name, i, est, network))
            self.source = (EstimateSource.RECORDED if found == len(stages) else
                           EstimateSource.MIXED if found else EstimateSource.PRIOR)
            self._t0 = time.monotonic()

    def _read_record(self) -> dict[str, float]:
        try:
            data = json.loads(self._record_path.read_text())
            if data.get("key") != json.loads(json.dumps(self._key, default=str)):
                return {}  # a digest collision or an older format: use the priors
            return {str(k): float(v) for k, v in data["stages"].items() if float(v) >= 0}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("build progress: ignoring the recorded build times in %s (%s)", self._record_path, exc)
            return {}

    # ---- stages ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def stage(self, name: str, note: str = "") -> Iterator[None]:
        """Report ``name`` started, then finished when the block ends (also when it raises). A name that is
        not planned, already reported, or comes after the build is done, is not reported (a no-op)."""
        st = self._start(name)
        try:
            yield
        finally:
            if st is not None:
                self._finish(st, note)

    def _find(self, name: str) -> _Stage | None:
        for st in self._stages:
            if st.name == name:
                return st
        return None

    def _start(self, name: str) -> _Stage | None:
        with self._lock:
            st = self._find(name)
            if self.done or st is None or st.state is not None:
                return None
            now = time.monotonic()
            for earlier in self._stages[:st.index - 1]:  # stages it passed over did not happen
                if earlier.state is None and not (earlier.network and st.network):  # networks: any order
                    self._set(earlier, StageState.SKIP, now)
            if self._running:
                parent = self._running[-1]
                parent.own_s += now - parent.resumed
            st.resumed = now
            self._running.append(st)
            self._set(st, StageState.START, now)
            return st

    def _finish(self, st: _Stage, note: str) -> None:
        with self._lock:
            if st.state is not StageState.START:
                return
            now = time.monotonic()
            st.own_s += now - st.resumed
            st.note = note or st.note
            if st in self._running:
                self._running.remove(st)
            if self._running:
                self._running[-1].resumed = now
            self._set(st, StageState.FINISH, now)

    def last_stage(self, name: str, run: Callable[[], Any]) -> Any:
        """``run()`` as stage ``name``, then :meth:`finish` (the engine's first frame)."""
        with self.stage(name):
            result = run()
        self.finish()
        return result

    def note(self, name: str, text: str) -> None:
        """A remark shown with the stage's finish (e.g. 'loaded from the engine cache')."""
        with self._lock:
            st = self._find(name)
            if st is not None:
                st.note = text

    def finish(self) -> None:
        """The build is over (the first frame is out): stages not reported are skipped, listeners get DONE
        with fraction 1, and the stages' times are recorded for the next build with the same key."""
        with self._lock:
            if self.done or not self._stages:
                return
            now = time.monotonic()
            for st in self._stages:
                if st.state is None:
                    self._set(st, StageState.SKIP, now)
            self.done = True
            whole = _Stage("done", len(self._stages), 0.0, False, StageState.DONE, own_s=now - (self._t0 or now))
            self._emit(whole, StageState.DONE, now)
        self._write_record()

    def _set(self, st: _Stage, state: StageState, now: float) -> None:
        st.state = state
        self._emit(st, state, now)

    def _emit(self, st: _Stage, state: StageState, now: float) -> None:
        closed = (StageState.FINISH, StageState.SKIP)
        total = sum(self._weight(s) for s in self._stages)
        done_w = sum(self._weight(s) for s in self._stages if s.state in closed)
        left = 0.0
        for s in self._stages:
            if s.state is None:
                left += s.estimate
            elif s.state is StageState.START:
                own = s.own_s + (now - s.resumed if s is self._running[-1] else 0.0)
                left += max(0.0, s.estimate - own)
        own_now = st.own_s + (now - st.resumed if self._running and st is self._running[-1] else 0.0)
        event = StageEvent(
            stage=st.name, index=st.index, count=len(self._stages), state=state,
            fraction=1.0 if state is StageState.DONE else round(done_w / total, 4),
            elapsed_s=round(now - (self._t0 or now), 3), stage_s=round(own_now, 3),
            estimate_s=0.0 if state is StageState.DONE else round(left, 1), source=self.source, note=st.note)
        self.last = event
        for fn in list(self._listeners):
            try:
                fn(event)
            except Exception:  # noqa: BLE001 - a front end's display must never break the build
                log.exception("build progress listener %r failed", fn)

    def _weight(self, st: _Stage) -> float:
        return max(st.estimate, 0.01)

    # ---- the record ------------------------------------------------------------------------------
    def durations(self) -> dict[str, float]:
        """Each stage's own seconds: finished stages only, skipped ones as 0."""
        return {s.name: round(s.own_s, 3) if s.state is StageState.FINISH else 0.0
                for s in self._stages if s.state in (StageState.FINISH, StageState.SKIP)}

    def _write_record(self) -> None:
        if self._record_path is None:
            return
        from engines.cache import write_atomic

        data = {"key": self._key, "stages": self.durations(), "total_s": self.last.elapsed_s if self.last else None,
                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            self._record_path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self._record_path, json.dumps(data, indent=2, sort_keys=True, default=str).encode())
        except OSError as exc:  # a read-only cache only loses the estimate of the next build
            log.warning("build progress: could not record the build times in %s (%s)", self._record_path, exc)


class NoProgress(BuildProgress):
    """What an engine built without a progress object reports to: nothing is planned, nothing emitted."""

    def plan(self, *args: Any, **kwargs: Any) -> None:
        return None


def plan_build(progress: BuildProgress, config: Any, backend: str, *, load: bool, **extra: Any) -> None:
    """Plan ``progress`` for an engine of ``config`` (an EngineConfig) on ``backend``: the stages, and the
    key its build times are recorded under (what changes how long a build takes; ``extra``: e.g. the size as
    asked for, the ControlNets, an IP-Adapter)."""
    if progress.planned:
        return
    from engines.cache import default_root

    device = config.device
    gpu = None
    if device.type == "cuda":
        import torch

        gpu = torch.cuda.get_device_name(device)
    key = {"model": config.model, "backend": backend, "device": device.type, "gpu": gpu,
           "dtype": str(config.dtype).replace("torch.", ""), "vae": config.vae.value,
           "frame_buffer_size": config.frame_buffer_size, "vae_overlap": config.vae_overlap,
           "compile_preset": str(getattr(config.compile_preset, "value", config.compile_preset)),
           "compile_artifacts": str(getattr(config.compile_artifacts, "value", config.compile_artifacts)),
           "load": load, **extra}
    root = Path(config.engine_dir).expanduser() if config.engine_dir else default_root()
    progress.plan(plan_stages(backend, device.type, load=load), device_type=device.type,
                  key=json.loads(json.dumps(key, default=str)), root=root)


def engine_progress(progress: BuildProgress | None, config: Any) -> tuple[BuildProgress, BuildProgress | None]:
    """For StreamEngine: (the progress object, the same while the build is being watched, else None). A
    progress object from_pretrained did not plan (an engine made from loaded components) is planned here."""
    if progress is None or isinstance(progress, NoProgress):
        return NoProgress(), None
    if not progress.planned:
        from .backends import choose_backend

        plan_build(progress, config, choose_backend(config)[0].value, load=False)
    return progress, progress
