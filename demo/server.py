"""The web app behind `rtdiffusion demo`: FastAPI routes, the websocket hub, and the control state.

Routes::

    GET  /                      the control page (camera / video file / test pattern in, live output, controls)
    GET  /output                the output-only page for a projector (any number of viewers)
    GET  /static/...            the page's JS and CSS (no build step, nothing from outside loopback)
    GET  /api/status            engine status, server counters, current controls
    POST /api/prompt            {prompt_a, prompt_b, blend 0..1, method linear|slerp, negative_prompt}
    POST /api/seed              {seed} or {random: true}
    POST /api/steps             {strength 0..1, steps 1..max_steps} or {t_index_list: [...]}
    POST /api/guidance          {guidance_scale 0..30, delta 0..10, cfg none|self|initialize|full}
    POST /api/filter            {enabled, threshold 0..1, max_skip 0..1000}
    POST /api/cache             {enabled, maxframes 1..16, interval 1..1000}
    POST /api/playback          {paused, frozen}
    GET  /api/snapshot.png      the latest output frame as a PNG
    GET  /api/presets           nine slots (null when empty); keys 1-9 in the page
    PUT  /api/presets/{1..9}    store {prompt_a, prompt_b, blend, negative_prompt, seed}
    POST /api/presets/{1..9}/apply
    WS   /ws?role=control|view  binary frames both ways (see protocol.py)

Every POST body is checked field by field (unknown fields, wrong types and out-of-range values are answered
422 with ``{"error": "<field>: <what was expected>"}``); the engine's own ConfigError becomes 400 with its
message. A rejected request changes nothing.

Threads: the event loop runs the websockets and never calls the engine's frame function. Control routes are
plain ``def`` handlers, so FastAPI runs them on its thread pool; they serialise on ``_controls_lock`` and call
``engine.update_*`` (thread-safe by the engine's contract, applied at the next frame boundary). The inference
worker (worker.py) hands each output to the loop with ``call_soon_threadsafe(hub.publish, out)``.

One control page sends frames; a newer one takes over (the older one is told ``replaced`` and closed). Viewers
only receive. Each client has a one-slot outbox: a newer output replaces one not yet sent (counted as dropped),
and the next output is sent only after the client says ``shown`` for the previous one (or ``ack_timeout_s``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import io
import json
import logging
import math
import os
import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal
from urllib.parse import urlsplit

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from . import protocol
from .protocol import Format, ProtocolError
from .worker import InferenceWorker, InputFrame, OutputFrame

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
MAX_PROMPT_CHARS = 2000
SEED_MAX = 2**63 - 1
PRESET_SLOTS = 9


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
    """

    min_frame_ms: float = 0.0
    output_format: Format = Format.JPEG
    jpeg_quality: int = 90
    max_steps: int = 4
    status_interval_s: float = 0.5
    ack_timeout_s: float = 2.0
    presets_path: str | None = None

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


@dataclass
class Controls:
    """What the page controls, as the server last applied it to the engine."""

    prompt_a: str = ""
    prompt_b: str = ""
    blend: float = 0.0  # 0 = all A, 1 = all B
    method: str = "linear"
    negative_prompt: str = ""
    seed: int = 2
    strength: float = 0.35
    steps: int = 1
    t_index_list: list[int] = field(default_factory=lambda: [32])
    guidance_scale: float = 1.2
    delta: float = 1.0
    cfg: str = "none"
    similar_filter: bool = False
    similar_threshold: float = 0.98
    similar_max_skip: int = 10
    cache_enabled: bool = False
    cache_maxframes: int = 1
    cache_interval: int = 1
    paused: bool = False
    frozen: bool = False


# ---- request bodies: every field optional (None = keep), unknown fields rejected ----------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PromptBody(_Body):
    prompt_a: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    prompt_b: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    blend: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    method: Literal["linear", "slerp"] | None = None
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)


class SeedBody(_Body):
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    random: bool = False


class StepsBody(_Body):
    strength: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    steps: int | None = Field(None, ge=1, le=16)
    t_index_list: list[int] | None = Field(None, min_length=1, max_length=16)


class GuidanceBody(_Body):
    guidance_scale: float | None = Field(None, ge=0.0, le=30.0, allow_inf_nan=False)
    delta: float | None = Field(None, ge=0.0, le=10.0, allow_inf_nan=False)
    cfg: Literal["none", "self", "initialize", "full"] | None = None


class FilterBody(_Body):
    enabled: bool | None = None
    threshold: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    max_skip: int | None = Field(None, ge=0, le=1000)


class CacheBody(_Body):
    enabled: bool | None = None
    maxframes: int | None = Field(None, ge=1, le=16)
    interval: int | None = Field(None, ge=1, le=1000)


class PlaybackBody(_Body):
    paused: bool | None = None
    frozen: bool | None = None


class PresetBody(_Body):
    prompt_a: str = Field("", max_length=MAX_PROMPT_CHARS)
    prompt_b: str = Field("", max_length=MAX_PROMPT_CHARS)
    blend: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def t_index_for(strength: float, steps: int, num_inference_steps: int) -> list[int]:
    """Map the page's strength (0 = keep the input, 1 = restyle fully) and step count to a t_index_list.

    The first (noisiest) index is ``round((1 - strength) * (N - 1))``, kept low enough that ``steps`` distinct
    indices fit below N; the others are spread evenly between it and N.
    """
    n = num_inference_steps
    steps = max(1, min(int(steps), n))
    first = min(round((1.0 - strength) * (n - 1)), n - steps)
    out = [first + round(i * (n - first) / steps) for i in range(steps)]
    for i in range(1, steps):  # rounding may repeat an index: keep them strictly increasing
        out[i] = max(out[i], out[i - 1] + 1)
    return out


def prompt_argument(c: Controls) -> str | list[tuple[str, float]]:
    """Prompt A and B with the crossfade, as the engine's update_prompt takes it."""
    if not c.prompt_b or c.blend <= 0.0:
        return c.prompt_a
    if c.blend >= 1.0:
        return c.prompt_b
    return [(c.prompt_a, 1.0 - c.blend), (c.prompt_b, c.blend)]


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


# ---- the websocket side ----------------------------------------------------------------------------------------
class _Client:
    def __init__(self, ws: WebSocket, role: str, number: int) -> None:
        self.ws = ws
        self.role = role
        self.number = number
        self.outbox: OutputFrame | None = None
        self.have_frame = asyncio.Event()
        self.acked = asyncio.Event()
        self.acked.set()
        self.send_lock = asyncio.Lock()
        self.sent = 0
        self.dropped = 0
        self.rejected = 0

    async def send_json(self, obj: dict[str, Any]) -> None:
        async with self.send_lock:
            await self.ws.send_text(json.dumps(obj))

    async def send_bytes(self, data: bytes) -> None:
        async with self.send_lock:
            await self.ws.send_bytes(data)


class Hub:
    """All connected pages, on the event loop. ``publish`` fans one output frame out to every outbox."""

    def __init__(self) -> None:
        self.clients: set[_Client] = set()
        self.controller: _Client | None = None
        self.rejected = 0
        self.connections = 0

    def add(self, ws: WebSocket, role: str) -> tuple[_Client, _Client | None]:
        self.connections += 1
        client = _Client(ws, role, self.connections)
        self.clients.add(client)
        replaced = None
        if role == "control":
            replaced, self.controller = self.controller, client
        return client, replaced

    def remove(self, client: _Client) -> None:
        self.clients.discard(client)
        if self.controller is client:
            self.controller = None

    def publish(self, out: OutputFrame) -> None:
        for c in self.clients:
            if c.outbox is not None:
                c.dropped += 1
            c.outbox = out
            c.have_frame.set()


class DemoServer:
    """Owns the engine's control state, the worker and the hub; ``app`` is the FastAPI application."""

    def __init__(self, engine: Any, options: DemoOptions | None = None, controls: Controls | None = None) -> None:
        self.engine = engine
        self.options = options or DemoOptions()
        self.controls = controls or Controls()
        self.width = int(engine.width)
        self.height = int(engine.height)
        self.max_frame_bytes = protocol.max_frame_bytes(self.width, self.height)
        self.num_inference_steps = _num_inference_steps(engine)
        self.hub = Hub()
        self.worker: InferenceWorker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._controls_lock = threading.Lock()
        self.presets: list[dict[str, Any] | None] = self._load_presets()
        self.app = self._build_app()

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def apply_initial_controls(self) -> None:
        """Push every control to the engine once, so the page and the engine agree from the first frame."""
        c = self.controls
        self.engine.update_prompt(prompt_argument(c), method=c.method, negative_prompt=c.negative_prompt)
        self.engine.update_seed(c.seed)
        self.engine.update(t_index_list=c.t_index_list, guidance_scale=c.guidance_scale, delta=c.delta, cfg=c.cfg,
                           similar_filter=c.similar_filter, similar_threshold=c.similar_threshold,
                           similar_max_skip=c.similar_max_skip)

    async def _startup(self) -> None:
        self._loop = asyncio.get_running_loop()
        loop = self._loop
        hub = self.hub

        def publish(out: OutputFrame) -> None:
            loop.call_soon_threadsafe(hub.publish, out)

        self.worker = InferenceWorker(self.engine, publish, min_frame_ms=self.options.min_frame_ms,
                                      output_format=self.options.output_format,
                                      jpeg_quality=self.options.jpeg_quality)
        self.worker.start()
        self._status_task = asyncio.create_task(self._status_loop(), name="rtdiffusion-demo-status")
        log.info("demo server ready: engine %dx%d, output %s, min frame %.0f ms", self.width, self.height,
                 self.options.output_format.name, self.options.min_frame_ms)

    async def _shutdown(self) -> None:
        self._status_task.cancel()
        for c in list(self.hub.clients):
            try:
                await c.ws.close(1001, "server shutting down")
            except Exception:  # already gone
                pass
        if self.worker is not None:
            await asyncio.to_thread(self.worker.stop)
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
        return {"engine": engine_status, "server": server, "controls": controls}

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.status_interval_s)
            try:
                status = await asyncio.to_thread(self.status)
            except Exception:
                log.exception("could not collect status")
                continue
            message = {"t": "status", "fps": status["server"].get("fps", 0.0),
                       "process_ms": status["server"].get("process_ms", 0.0),
                       "dropped_in": status["server"].get("dropped_in", 0),
                       "backend": status["engine"].get("backend", "?"), "clients": len(self.hub.clients),
                       "controls": status["controls"], "errors": status["server"].get("errors", 0),
                       "last_error": status["server"].get("last_error", "")}
            for c in list(self.hub.clients):
                try:
                    await c.send_json({**message, "dropped_out": c.dropped, "sent": c.sent, "role": c.role})
                except Exception:  # the client's own loop notices the disconnect
                    pass

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
            if body.steps is not None and body.steps > self.options.max_steps:
                raise HttpError(422, f"steps: must be from 1 to {self.options.max_steps}; got {body.steps}")
            def change(current: Controls) -> dict[str, Any]:  # called under the lock
                strength = current.strength if body.strength is None else body.strength
                steps = current.steps if body.steps is None else body.steps
                return {"strength": strength, "steps": steps,
                        "t_index_list": t_index_for(strength, steps, self.num_inference_steps)}
        return self._apply(change, lambda c: self.engine.update(t_index_list=c.t_index_list))

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

    # ---- presets -------------------------------------------------------------------------------------------------
    def _load_presets(self) -> list[dict[str, Any] | None]:
        slots: list[dict[str, Any] | None] = [None] * PRESET_SLOTS
        path = self.options.presets_path
        if not path or not os.path.exists(path):
            return slots
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, list) or len(data) > PRESET_SLOTS:
                raise ValueError(f"expected a JSON list of at most {PRESET_SLOTS} presets (or nulls)")
            for i, item in enumerate(data):
                slots[i] = None if item is None else PresetBody.model_validate(item).model_dump()
        except (OSError, ValueError) as exc:
            raise ValueError(f"presets file {path}: {exc}") from None
        return slots

    def _save_presets(self) -> None:
        path = self.options.presets_path
        if not path:
            return
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".presets-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.presets, f, indent=1)
        os.replace(tmp, path)  # atomic: a crash leaves the old file or the new one

    def put_preset(self, slot: int, body: PresetBody) -> dict[str, Any]:
        _check_slot(slot)
        with self._controls_lock:
            self.presets[slot - 1] = body.model_dump()
            self._save_presets()
            return {"slot": slot, "preset": self.presets[slot - 1]}

    def apply_preset(self, slot: int) -> dict[str, Any]:
        _check_slot(slot)
        preset = self.presets[slot - 1]
        if preset is None:
            raise HttpError(404, f"preset {slot} is empty; store one first (Shift+{slot} in the page, "
                                 f"or PUT /api/presets/{slot})")
        change = {k: preset[k] for k in ("prompt_a", "prompt_b", "blend", "negative_prompt")}
        if preset.get("seed") is not None:
            change["seed"] = preset["seed"]

        def call(c: Controls) -> None:
            self.engine.update_prompt(prompt_argument(c), method=c.method, negative_prompt=c.negative_prompt)
            if "seed" in change:
                self.engine.update_seed(c.seed)

        return self._apply(change, call)

    # ---- websocket (event loop) ------------------------------------------------------------------------------
    def _hello(self, client: _Client) -> dict[str, Any]:
        return {"t": "hello", "role": client.role, "width": self.width, "height": self.height,
                "input_formats": ["rgb", "rgba", "jpeg"], "output_format": self.options.output_format.name.lower(),
                "max_bytes": self.max_frame_bytes, "max_steps": self.options.max_steps,
                "num_inference_steps": self.num_inference_steps, "controls": dataclasses.asdict(self.controls)}

    async def _sender(self, client: _Client) -> None:
        while True:
            await client.have_frame.wait()
            try:
                await asyncio.wait_for(client.acked.wait(), self.options.ack_timeout_s)
            except asyncio.TimeoutError:
                log.debug("client %d did not say 'shown' within %.1f s; sending anyway", client.number,
                          self.options.ack_timeout_s)
            out, client.outbox = client.outbox, None
            client.have_frame.clear()
            if out is None:
                continue
            client.acked.clear()
            await client.send_bytes(out.message)
            client.sent += 1

    async def _on_frame(self, client: _Client, data: bytes) -> None:
        if client is not self.hub.controller:
            raise ProtocolError("not_controller", "only the control page (/ws?role=control) may send frames; "
                                                  "this socket is a viewer")
        if len(data) > self.max_frame_bytes:
            raise ProtocolError("too_large", f"a frame for this {self.width}x{self.height} engine is at most "
                                             f"{self.max_frame_bytes} bytes; got {len(data)}")
        head = protocol.parse_header(data)
        if head.format is Format.JPEG:  # Pillow decodes off the loop
            head, image = await asyncio.to_thread(protocol.decode_input, data, self.width, self.height)
        else:
            head, image = protocol.decode_input(data, self.width, self.height)
        assert self.worker is not None
        self.worker.submit(InputFrame(image, head.frame_id, head.timestamp_ms, time.monotonic()))
        await client.send_json({"t": "ack", "id": head.frame_id})

    async def _on_text(self, client: _Client, text: str) -> None:
        msg = protocol.parse_text(text)
        if msg["t"] == "shown":
            client.acked.set()
        elif msg["t"] == "ping":
            await client.send_json({"t": "pong"})

    async def websocket(self, ws: WebSocket) -> None:
        role = ws.query_params.get("role", "view")
        if not _same_origin(ws):
            await ws.close(1008, "cross-origin websocket refused: open the page from this server")
            return
        await ws.accept()
        if role not in ("control", "view"):
            await ws.send_text(json.dumps(ProtocolError(
                "role", f"role must be 'control' or 'view'; got {role[:40]!r}").to_message()))
            await ws.close(1008, "role must be 'control' or 'view'")
            return
        client, replaced = self.hub.add(ws, role)
        log.info("websocket %d connected as %s (%d clients)", client.number, role, len(self.hub.clients))
        if replaced is not None:
            asyncio.create_task(self._retire(replaced))
        sender = asyncio.create_task(self._sender(client), name=f"rtdiffusion-demo-send-{client.number}")
        try:
            await client.send_json(self._hello(client))
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                try:
                    if msg.get("bytes") is not None:
                        await self._on_frame(client, msg["bytes"])
                    elif msg.get("text") is not None:
                        await self._on_text(client, msg["text"])
                except ProtocolError as exc:
                    client.rejected += 1
                    self.hub.rejected += 1
                    log.info("websocket %d: rejected a message (%s): %s", client.number, exc.code, exc)
                    await client.send_json(exc.to_message())
        except (WebSocketDisconnect, RuntimeError):  # RuntimeError: receive after close
            pass
        finally:
            sender.cancel()
            self.hub.remove(client)
            log.info("websocket %d (%s) disconnected (%d clients)", client.number, role, len(self.hub.clients))

    async def _retire(self, old: _Client) -> None:
        try:
            await old.send_json({"t": "replaced", "message": "a newer control page took over"})
            await old.ws.close(4000, "replaced by a newer control page")
        except Exception:
            pass

    # ---- the app -----------------------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        from contextlib import asynccontextmanager

        @asynccontextmanager
        async def lifespan(app: FastAPI):
            await self._startup()
            try:
                yield
            finally:
                await self._shutdown()

        app = FastAPI(title="rtdiffusion demo", lifespan=lifespan, docs_url=None, redoc_url=None)

        @app.exception_handler(HttpError)
        async def _http_error(request: Request, exc: HttpError) -> JSONResponse:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)

        @app.exception_handler(RequestValidationError)
        async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
            parts = []
            for err in exc.errors():
                loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
                parts.append(f"{loc}: {err.get('msg')}" + (f" (got {err['input']!r})" if "input" in err
                                                             and not isinstance(err["input"], dict) else ""))
            return JSONResponse({"error": "; ".join(parts)}, status_code=422)

        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

        @app.get("/", include_in_schema=False)
        def index() -> FileResponse:
            return FileResponse(STATIC_DIR / "index.html")

        @app.get("/output", include_in_schema=False)
        def output() -> FileResponse:
            return FileResponse(STATIC_DIR / "output.html")

        @app.get("/api/status")
        def get_status() -> dict[str, Any]:
            return self.status()

        @app.post("/api/prompt")
        def post_prompt(body: PromptBody) -> dict[str, Any]:
            return self.set_prompt(body)

        @app.post("/api/seed")
        def post_seed(body: SeedBody) -> dict[str, Any]:
            return self.set_seed(body)

        @app.post("/api/steps")
        def post_steps(body: StepsBody) -> dict[str, Any]:
            return self.set_steps(body)

        @app.post("/api/guidance")
        def post_guidance(body: GuidanceBody) -> dict[str, Any]:
            return self.set_guidance(body)

        @app.post("/api/filter")
        def post_filter(body: FilterBody) -> dict[str, Any]:
            return self.set_filter(body)

        @app.post("/api/cache")
        def post_cache(body: CacheBody) -> dict[str, Any]:
            return self.set_cache(body)

        @app.post("/api/playback")
        def post_playback(body: PlaybackBody) -> dict[str, Any]:
            return self.set_playback(body)

        @app.get("/api/snapshot.png")
        def snapshot() -> Response:
            latest = self.worker.latest if self.worker else None
            if latest is None:
                raise HttpError(404, "no output frame yet: start a source on the control page first")
            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(latest.image, "RGB").save(buf, format="PNG")
            return Response(buf.getvalue(), media_type="image/png",
                            headers={"Content-Disposition": f'attachment; filename="rtdiffusion-{latest.seq}.png"'})

        @app.get("/api/presets")
        def get_presets() -> dict[str, Any]:
            return {"presets": self.presets}

        @app.put("/api/presets/{slot}")
        def put_preset(slot: int, body: PresetBody) -> dict[str, Any]:
            return self.put_preset(slot, body)

        @app.post("/api/presets/{slot}/apply")
        def apply_preset(slot: int) -> dict[str, Any]:
            return self.apply_preset(slot)

        app.add_api_websocket_route("/ws", self.websocket)
        return app


def _check_slot(slot: int) -> None:
    if not 1 <= slot <= PRESET_SLOTS:
        raise HttpError(404, f"preset slots are 1 to {PRESET_SLOTS}; got {slot}")


def _same_origin(ws: WebSocket) -> bool:
    """Browsers send Origin; refuse pages from other sites (any web page could otherwise drive the engine)."""
    origin = ws.headers.get("origin")
    if not origin:
        return True  # not a browser (scripts, TouchDesigner)
    return urlsplit(origin).netloc == ws.headers.get("host", "")


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


def create_app(engine: Any, options: DemoOptions | None = None, controls: Controls | None = None) -> FastAPI:
    """The FastAPI app for ``engine``; controls are pushed to the engine before this returns."""
    server = DemoServer(engine, options, controls)
    server.apply_initial_controls()
    app = server.app
    app.state.demo = server
    return app
