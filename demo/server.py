"""The web app behind `rtdiffusion demo`: the control state, the worker, the recorder and the websocket hub.

Routes (routes.py)::

    GET  /                      the control page (camera / video file / test pattern in, live output, controls)
    GET  /output                the output-only page for a projector (any number of viewers)
    GET  /static/...            the page's JS and CSS (no build step, nothing from outside loopback)
    GET  /api/status            engine status, server counters, current controls, recording
    POST /api/prompt            {prompt_a, prompt_b, blend 0..1, method linear|slerp, negative_prompt}
    POST /api/seed              {seed} or {random: true}
    POST /api/steps             {strength 0..1, steps 1..max_steps} or {t_index_list: [...]}
    POST /api/guidance          {guidance_scale 0..30, delta 0..10, cfg none|self|initialize|full}
    POST /api/filter            {enabled, threshold 0..1, max_skip 0..1000}
    POST /api/cache             {enabled, maxframes 1..16, interval 1..1000}
    POST /api/playback          {paused, frozen}
    GET  /api/snapshot.png      the latest output frame as a PNG
    GET  /api/presets           nine slots (null when empty); keys 1-9 in the page
    PUT  /api/presets/{1..9}    store any of the controls (controls.PresetBody: every control the page shows)
    POST /api/presets/{1..9}/apply
    GET  /api/record            recording state; POST {recording: true|false} starts / stops it
    GET  /api/recordings/{name} a finished recording (MP4), as a download
    POST /api/controlnet        {index, scale 0..5, enabled, start 0..1, end 0..1} (as the websocket message)
    POST /api/ip_adapter        {scale 0..5, enabled} (as the websocket message)
    GET  /api/style.png         a thumbnail of the current IP-Adapter style image (404 before one is set)
    WS   /ws?role=control|view  binary frames both ways (see protocol.py and hub.py); the control page also sends
                                ControlNet / IP-Adapter settings and the style image on it (conditioning.py)

Every request first passes the guard (guard.py): Host, token, Origin and body size. Every POST body is checked
field by field (unknown fields, wrong types and out-of-range values are answered 422 with
``{"error": "<field>: <what was expected>"}``, quoting at most 60 characters of the value); the engine's own
ConfigError becomes 400 with its message. A rejected request changes nothing.

Threads: the event loop runs the websockets and never calls the engine's frame function. Control routes run
on FastAPI's thread pool; they serialise on ``_controls_lock`` and call ``engine.update_*`` (thread-safe by the
engine's contract, applied at the next frame boundary). The inference worker (worker.py) hands each output to
the loop with ``call_soon_threadsafe(hub.publish, out)`` and to the recorder's queue (recorder.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import math
import random
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

from . import protocol
from .building import build_status
from .conditioning import ControlNetBody, IpAdapterBody, merge_controlnets, merge_preset_controlnets
from .conditioning_state import Conditioning
from .controls import (PRESET_FIELDS, CacheBody, Controls, FilterBody, GuidanceBody, HttpError,  # noqa: F401
                       PlaybackBody, PresetBody, PresetStore, PromptBody, SeedBody, StepsBody, apply_all,
                       prompt_argument, t_index_for)
from .guard import AccessPolicy
from .hub import Hub
from .protocol import Format
from .recorder import Recorder, RecordingError
from .worker import InferenceWorker, OutputFrame

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
TOKEN_CHARS = re.compile(r"^[A-Za-z0-9._~-]{8,200}$")


@dataclass(frozen=True)
class DemoOptions:
    """Server settings fixed at start.

    min_frame_ms: the worker takes at least this long per frame (slow-engine setting; 0 = engine speed).
    output_format: JPEG (small, for viewers on a network) or RGB (raw, no encode cost, loopback only).
    jpeg_quality: 1..100 for JPEG output.
    max_steps: the largest "steps" the page offers (each step is one more UNet row).
    status_interval_s: how often clients get a status message.
    ack_timeout_s: a client that never says "shown" still gets a frame this often.
    presets_path: a JSON file the nine presets are loaded from and saved to; None = memory only.
    bound_host: the address the server listens on; accepted as a Host name besides the loopback names.
    allowed_hosts: further Host names to accept (--allow-host); naming any makes the token required.
    token: every request must carry it (header, ?token= or the page's cookie); None = none, unless
      allowed_hosts is given, and then one is made at start and logged.
    max_body_bytes: the largest request body (413 above it, refused before it is read).
    recordings_dir: where recordings are written; None = a new temporary folder.
    """

    min_frame_ms: float = 0.0
    output_format: Format = Format.JPEG
    jpeg_quality: int = 90
    max_steps: int = 4
    status_interval_s: float = 0.5
    ack_timeout_s: float = 2.0
    presets_path: str | None = None
    bound_host: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    token: str | None = None
    max_body_bytes: int = 64 * 1024
    recordings_dir: str | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.min_frame_ms, (int, float)) and 0 <= self.min_frame_ms <= 60_000):
            raise ValueError(f"min_frame_ms must be from 0 to 60000 ms; got {self.min_frame_ms!r}")
        if self.output_format not in (Format.JPEG, Format.RGB):
            raise ValueError(f"output format must be 'jpeg' or 'rgb'; got {self.output_format!r}")
        if not (isinstance(self.jpeg_quality, int) and 1 <= self.jpeg_quality <= 100):
            raise ValueError(f"jpeg quality must be an integer from 1 to 100; got {self.jpeg_quality!r}")
        if not (isinstance(self.max_steps, int) and 1 <= self.max_steps <= 16):
            raise ValueError(f"max_steps must be an integer from 1 to 16; got {self.max_steps!r}")
        if not 0.05 <= self.status_interval_s <= 60:
            raise ValueError(f"status_interval_s must be from 0.05 to 60 s; got {self.status_interval_s!r}")
        if not 0.1 <= self.ack_timeout_s <= 60:
            raise ValueError(f"ack_timeout_s must be from 0.1 to 60 s; got {self.ack_timeout_s!r}")
        if self.token is not None and not TOKEN_CHARS.match(self.token):
            raise ValueError("the token must be 8 to 200 characters from A-Z a-z 0-9 . _ ~ -")
        if not (isinstance(self.max_body_bytes, int) and 1024 <= self.max_body_bytes <= 1 << 30):
            raise ValueError(f"max_body_bytes must be from 1024 to 2**30; got {self.max_body_bytes!r}")
        # the host names are checked here, before anything heavy loads (the token is made later when absent)
        AccessPolicy.build(self.bound_host, self.allowed_hosts, self.token or "checking", self.max_body_bytes)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, enum.Enum):
        return _json_safe(value.value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _json_safe(dataclasses.asdict(value))
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


class DemoServer:
    """Owns the engine's control state, the worker, the recorder and the hub; ``app`` is the ASGI application."""

    static_dir = STATIC_DIR
    hub_class = Hub  # a multi-stream server (group_server.py) puts its own hub and worker here
    worker_class: Callable[..., Any] = InferenceWorker

    def __init__(self, engine: Any, options: DemoOptions | None = None, controls: Controls | None = None) -> None:
        from .routes import build_app

        self.engine = engine
        self.options = options or DemoOptions()
        self.controls = controls or Controls()
        self.width = int(engine.width)
        self.height = int(engine.height)
        self.max_frame_bytes = protocol.max_frame_bytes(self.width, self.height)
        self.num_inference_steps = _num_inference_steps(engine)
        o = self.options
        self.token = o.token or (secrets.token_urlsafe(18) if o.allowed_hosts else None)
        self.policy = AccessPolicy.build(o.bound_host, o.allowed_hosts, self.token, o.max_body_bytes)
        self.hub = self.hub_class(self)
        self.worker: InferenceWorker | None = None
        self.recorder = Recorder(o.recordings_dir, self.width, self.height)
        self._controls_lock = threading.Lock()
        self.presets = PresetStore(o.presets_path)
        self.conditioning = Conditioning(engine, self.controls)  # ControlNet / IP-Adapter: labels, style image
        self.app = build_app(self)

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def apply_initial_controls(self) -> None:
        """Push every control to the engine once, so the page and the engine agree from the first frame."""
        apply_all(self.engine, self.controls)

    async def startup(self) -> None:
        loop = asyncio.get_running_loop()
        hub, recorder = self.hub, self.recorder

        def publish(out: OutputFrame) -> None:  # worker thread
            recorder.add(out.image)
            loop.call_soon_threadsafe(hub.publish, out)

        self.worker = self.worker_class(self.engine, publish, min_frame_ms=self.options.min_frame_ms,
                                        output_format=self.options.output_format,
                                        jpeg_quality=self.options.jpeg_quality)
        self.worker.start()
        self._status_task = asyncio.create_task(self._status_loop(), name="rtdiffusion-demo-status")
        log.info("demo server ready: engine %dx%d, output %s, min frame %.0f ms", self.width, self.height,
                 self.options.output_format.name, self.options.min_frame_ms)
        hosts = ", ".join(sorted(self.policy.hosts))
        log.info("answering to host names: %s (others are refused; --allow-host NAME adds one)", hosts)
        if self.options.bound_host in ("0.0.0.0", "::") and not self.options.allowed_hosts:
            log.warning("listening on every address, but other machines use this one's name or address as the Host: "
                        "add --allow-host <that name or address> for them (a token is then required)")
        if self.token:
            log.warning("every request needs the token %s: open the page as http://HOST:PORT/?token=%s "
                        "(scripts: header 'Authorization: Bearer %s')", self.token, self.token, self.token)

    async def shutdown(self) -> None:
        self._status_task.cancel()
        await self.hub.close_all()
        if self.worker is not None:
            await asyncio.to_thread(self.worker.stop)
        await asyncio.to_thread(self.recorder.close)
        log.info("demo server stopped")

    # ---- status ----------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        try:
            engine_status = _json_safe(self.engine.status())
        except Exception as exc:  # status must never take the page down
            log.warning("engine.status() failed: %s", exc)
            engine_status = {"error": f"{type(exc).__name__}: {exc}"}
        server = self.worker.stats() if self.worker else {}
        server.update(clients=len(self.hub.clients), controller=self.hub.controller is not None,
                      rejected_messages=self.hub.rejected, width=self.width, height=self.height,
                      output_format=self.options.output_format.name.lower())
        with self._controls_lock:
            controls = dataclasses.asdict(self.controls)
        return {"engine": engine_status, "server": server, "controls": controls, "record": self.recorder.status(),
                "conditioning": self.conditioning.status(engine_status), "build": build_status(self.engine)}

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.status_interval_s)
            try:
                status = await asyncio.to_thread(self.status)
            except Exception:
                log.exception("could not collect status")
                continue
            srv = status["server"]
            await self.hub.broadcast_status({
                "t": "status", "fps": srv.get("fps", 0.0), "process_ms": srv.get("process_ms", 0.0),
                "busy_ms": srv.get("busy_ms", 0), "frames_in": srv.get("frames_in", 0),
                "frames_out": srv.get("frames_out", 0), "dropped_in": srv.get("dropped_in", 0),
                "backend": status["engine"].get("backend", "?"), "clients": len(self.hub.clients),
                "controls": status["controls"], "errors": srv.get("errors", 0),
                "last_error": srv.get("last_error", ""), "record": status["record"],
                "conditioning": status["conditioning"], "build": status["build"]})

    # ---- controls (thread pool) ------------------------------------------------------------------------------
    def _apply(self, change: dict[str, Any] | Callable[[Controls], dict[str, Any]], engine_call) -> dict[str, Any]:
        """Validate-then-commit: the engine call raises ConfigError and nothing changes, or both change.

        ``change`` may be a function of the current controls, called under the lock, for a change that
        depends on them (so a concurrent commit is never overwritten with a stale value)."""
        with self._controls_lock:
            if callable(change):
                change = change(self.controls)
            trial = dataclasses.replace(self.controls, **change)
            try:
                engine_call(trial)
            except ValueError as exc:  # ConfigError is a ValueError
                raise HttpError(400, str(exc)) from None
            self.controls = trial
            return dataclasses.asdict(trial)

    def set_prompt(self, body: PromptBody) -> dict[str, Any]:
        change = body.model_dump(exclude_none=True)
        return self._apply(change, lambda c: self.engine.update_prompt(
            prompt_argument(c), method=c.method, negative_prompt=c.negative_prompt))

    def set_seed(self, body: SeedBody) -> dict[str, Any]:
        if body.random == (body.seed is not None):
            raise HttpError(422, "give either 'seed' (an integer from 0 to 2**63-1) or 'random': true")
        seed = random.randrange(0, 2**31) if body.random else body.seed
        return self._apply({"seed": seed}, lambda c: self.engine.update_seed(c.seed))

    def set_steps(self, body: StepsBody) -> dict[str, Any]:
        if body.t_index_list is not None:
            if body.strength is not None or body.steps is not None:
                raise HttpError(422, "give either 't_index_list' or 'strength'/'steps', not both")
            change = {"t_index_list": list(body.t_index_list), "steps": len(body.t_index_list)}
        else:
            self._check_steps(body.steps)

            def change(current: Controls) -> dict[str, Any]:  # called under the lock
                strength = current.strength if body.strength is None else body.strength
                steps = current.steps if body.steps is None else body.steps
                return {"strength": strength, "steps": steps,
                        "t_index_list": t_index_for(strength, steps, self.num_inference_steps)}
        return self._apply(change, lambda c: self.engine.update(t_index_list=c.t_index_list))

    def _check_steps(self, steps: int | None) -> None:
        if steps is not None and steps > self.options.max_steps:
            raise HttpError(422, f"steps: must be from 1 to {self.options.max_steps}; got {steps}")

    def set_guidance(self, body: GuidanceBody) -> dict[str, Any]:
        change = body.model_dump(exclude_none=True)
        return self._apply(change, lambda c: self.engine.update(guidance_scale=c.guidance_scale, delta=c.delta,
                                                                cfg=c.cfg))

    def set_filter(self, body: FilterBody) -> dict[str, Any]:
        change = {f"similar_{k}" if k != "enabled" else "similar_filter": v
                  for k, v in body.model_dump(exclude_none=True).items()}
        return self._apply(change, lambda c: self.engine.update(
            similar_filter=c.similar_filter, similar_threshold=c.similar_threshold,
            similar_max_skip=c.similar_max_skip))

    def set_cache(self, body: CacheBody) -> dict[str, Any]:
        change = {f"cache_{k}": v for k, v in body.model_dump(exclude_none=True).items()}
        return self._apply(change, lambda c: self.engine.update(
            cache_enabled=c.cache_enabled, cache_maxframes=c.cache_maxframes, cache_interval=c.cache_interval))

    def set_playback(self, body: PlaybackBody) -> dict[str, Any]:
        assert self.worker is not None
        with self._controls_lock:
            state = self.worker.set_playback(paused=body.paused, frozen=body.frozen)
            self.controls = dataclasses.replace(self.controls, **state)
            return dataclasses.asdict(self.controls)

    def set_recording(self, on: bool) -> dict[str, Any]:
        try:
            return self.recorder.start() if on else self.recorder.stop()
        except RecordingError as exc:
            raise HttpError(409, str(exc)) from None

    # ---- ControlNet / IP-Adapter (thread pool; the hub validates the message first) -------------------------------
    def set_controlnet(self, body: ControlNetBody) -> dict[str, Any]:
        change = body.model_dump(exclude_none=True, include={"scale", "enabled", "start", "end"})
        if not change:
            raise HttpError(422, "give at least one of scale, enabled, start, end")

        def new(current: Controls) -> dict[str, Any]:  # called under the lock
            try:
                return {"controlnets": merge_controlnets(current.controlnets, body.index, change)}
            except ValueError as exc:
                raise HttpError(400, str(exc)) from None
        return self._apply(new, lambda c: self.engine.update(controlnets=[dict(u) for u in c.controlnets]))

    def set_ip_adapter(self, body: IpAdapterBody) -> dict[str, Any]:
        change = body.model_dump(exclude_none=True, include={"scale", "enabled"})
        if not change:
            raise HttpError(422, "give at least one of scale, enabled")
        self.conditioning.check_ip_adapter()
        change = {f"ip_adapter_{k}": v for k, v in change.items()}
        return self._apply(change, lambda c: self.engine.update(ip_adapter_scale=c.ip_adapter_scale,
                                                                ip_adapter_enabled=c.ip_adapter_enabled))

    # ---- presets -------------------------------------------------------------------------------------------------
    def put_preset(self, slot: int, body: PresetBody) -> dict[str, Any]:
        self._check_steps(body.steps)
        preset = body.model_dump(exclude_none=True)
        with self._controls_lock:
            self.presets.put(slot, preset)
            return {"slot": slot, "preset": preset}

    def apply_preset(self, slot: int) -> dict[str, Any]:
        preset = self.presets.get(slot)
        if preset is None:
            raise HttpError(404, f"preset {slot} is empty; store one first (Shift+{slot} in the page, "
                                 f"or PUT /api/presets/{slot})")
        self._check_steps(preset.get("steps"))
        cache = any(k.startswith("cache_") for k in preset)

        def change(current: Controls) -> dict[str, Any]:  # called under the lock
            new = {k: v for k, v in preset.items() if k in PRESET_FIELDS}
            # conditioning the engine does not have is skipped (a preset may come from another setup)
            new["controlnets"] = merge_preset_controlnets(current.controlnets, new.get("controlnets") or [])
            if current.ip_adapter_scale is None:
                new.pop("ip_adapter_scale", None)
                new.pop("ip_adapter_enabled", None)
            if "strength" in new or "steps" in new:
                strength, steps = new.get("strength", current.strength), new.get("steps", current.steps)
                new["t_index_list"] = t_index_for(strength, steps, self.num_inference_steps)
            return new

        return self._apply(change, lambda c: apply_all(self.engine, c, cache=cache))

    # ---- websocket ---------------------------------------------------------------------------------------------
    def hello(self, role: str) -> dict[str, Any]:
        with self._controls_lock:
            controls = dataclasses.asdict(self.controls)
        return {"t": "hello", "role": role, "width": self.width, "height": self.height,
                "input_formats": ["rgb", "rgba", "jpeg"], "output_format": self.options.output_format.name.lower(),
                "max_bytes": self.max_frame_bytes, "max_steps": self.options.max_steps,
                "num_inference_steps": self.num_inference_steps, "controls": controls,
                "record": self.recorder.status(),
                "conditioning": self.conditioning.hello()}


def _num_inference_steps(engine: Any) -> int:
    config = getattr(engine, "config", None)
    n = getattr(config, "num_inference_steps", None)
    if isinstance(n, int) and n > 0:
        return n
    try:
        n = engine.status().get("settings", {}).get("num_inference_steps")
    except Exception:
        n = None
    return n if isinstance(n, int) and n > 0 else 50


def create_app(engine: Any, options: DemoOptions | None = None, controls: Controls | None = None):
    """The ASGI app for ``engine``; controls are pushed to the engine before this returns."""
    server = DemoServer(engine, options, controls)
    server.apply_initial_controls()
    app = server.app
    app.state.demo = server
    return app
