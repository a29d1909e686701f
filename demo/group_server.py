"""The multi-stream web app (``rtdiffusion demo --streams N``): one MultiStreamEngine, one stream per performer.

Every page, API request and websocket belongs to one stream, chosen by ``?stream=i`` (default 0)::

    /?stream=1                       the control page of stream 1: its frames, settings and presets go to stream 1
    /output?stream=1                 the projector page of stream 1 (any number of them)
    /ws?role=control&stream=1        stream 1's control socket (one controller per stream; a newer one takes over)
    POST /api/prompt?stream=1 ...    every control route acts on the stream of the request
    GET  /api/streams                every stream: whether a control page drives it, viewers, fps, counters

A stream index that is not an integer from 0 to N-1 is answered 422 ``{"error": "stream: ..."}`` (HTTP), or an
``error`` message and close 1008 (websocket), naming the range. Presets are shared by all streams (any
performer may store or load any slot); recording records the stream of the page that pressed Record.

How the stream of a request travels: :class:`StreamSelect` (HTTP, inside the guard) and :meth:`GroupHub.serve`
(websocket) check ``?stream=`` and set the context variable ``current_stream`` for that request or socket; it
follows the request into FastAPI's thread pool and into ``asyncio.to_thread``. So the app's own routes and hub
(routes.py, hub.py) work unchanged: ``server.set_prompt(body)`` acts on the lane of ``current_stream``,
``hub.controller`` is the controller of the socket's stream, and ``worker.submit(frame)`` fills that stream's
mailbox. The worker (group_worker.py) runs ticks over every stream; a stream with no new frame passes None.

Per stream the page offers what a group stream has: prompt (A/B crossfade), seed, strength, steps, guidance,
delta, cfg, pause and freeze. The similar-frame filter, the temporal cache, ControlNets and IP-Adapters are
single-engine only (rtdiffusion/multistream_streams.py); turning them on is refused with a 400 naming why.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import json
import logging
import re
import threading
from typing import Any
from urllib.parse import parse_qs

from fastapi import WebSocket
from starlette.middleware import Middleware

from .controls import Controls, HttpError, apply_all
from .guard import short
from .hub import Hub
from .protocol import ProtocolError
from .server import DemoOptions, DemoServer, _json_safe
from .group_worker import GroupOutput, GroupWorker

log = logging.getLogger(__name__)

current_stream: contextvars.ContextVar[int] = contextvars.ContextVar("rtdiffusion_demo_stream", default=0)
INDEX = re.compile(r"^[0-9]{1,3}$")


class GroupEngine:
    """What the server reads of the engine (size, config, status) for a MultiStreamEngine."""

    def __init__(self, group: Any) -> None:
        self.group, self.config = group, group.config
        self.width, self.height = group.config.width, group.config.height

    def __len__(self) -> int:
        return len(self.group)

    def step_all(self, frames: list, *, return_exceptions: bool = False) -> list:
        return self.group.step_all(frames, return_exceptions=return_exceptions)

    def status(self) -> dict[str, Any]:
        return self.group.status()


class StreamTarget:
    """Stream i of the group as the server's control code calls an engine (update, update_prompt, update_seed).

    Settings a group stream does not have are dropped when they say "off" (what the page always sends) and
    refused with a ConfigError-like ValueError when they ask for the feature."""

    UNSUPPORTED = {"similar_filter": "the similar-frame filter", "cache_enabled": "the temporal cache",
                   "ip_adapter_enabled": "an IP-Adapter", "ip_adapter_scale": "an IP-Adapter",
                   "controlnets": "ControlNets"}
    DROPPED = ("similar_threshold", "similar_max_skip", "cache_maxframes", "cache_interval")

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def update(self, **kw: Any) -> None:
        for key, what in self.UNSUPPORTED.items():
            if key in kw and kw.pop(key) not in (False, None, [], 0):
                raise ValueError(f"{key}: {what} is not available with --streams (a multi-stream group serves "
                                 f"prompt, seed, strength, steps, guidance, delta and cfg per stream)")
        for key in self.DROPPED:
            kw.pop(key, None)
        if kw:
            self.stream.update(**kw)

    def update_prompt(self, prompt: Any, method: str = "linear", negative_prompt: str | None = None) -> None:
        self.stream.update_prompt(prompt, method=method, negative_prompt=negative_prompt)

    def update_seed(self, seed: Any) -> None:
        self.stream.update_seed(seed)


class StreamLane:
    """One stream's control state. Its control methods ARE DemoServer's (validate-then-commit under this lane's
    own lock), run against this stream's StreamTarget, Controls and worker lane."""

    def __init__(self, server: "GroupServer", index: int, controls: Controls) -> None:
        self._server, self.index = server, index
        self.engine = StreamTarget(server.group.stream(index))
        self.controls = controls
        self._controls_lock = threading.Lock()
        self.options, self.num_inference_steps = server.options, server.num_inference_steps
        self.presets, self.conditioning = server.presets, server.conditioning

    @property
    def worker(self):  # this stream's mailbox (set_playback); None before the server starts
        return None if self._server.worker is None else self._server.worker.lane(self.index)

    def controls_dict(self) -> dict[str, Any]:
        with self._controls_lock:
            return dataclasses.asdict(self.controls)

    _apply, _check_steps = DemoServer._apply, DemoServer._check_steps
    set_prompt, set_seed, set_steps = DemoServer.set_prompt, DemoServer.set_seed, DemoServer.set_steps
    set_guidance, set_filter, set_cache = DemoServer.set_guidance, DemoServer.set_filter, DemoServer.set_cache
    set_playback, apply_preset = DemoServer.set_playback, DemoServer.apply_preset
    set_controlnet, set_ip_adapter = DemoServer.set_controlnet, DemoServer.set_ip_adapter


PER_STREAM = ("set_prompt", "set_seed", "set_steps", "set_guidance", "set_filter", "set_cache", "set_playback",
              "apply_preset", "set_controlnet", "set_ip_adapter")


class GroupHub(Hub):
    """The hub with one controller per stream; each output goes only to the pages of its stream."""

    def __init__(self, server: "GroupServer") -> None:
        self.controllers: dict[int, Any] = {}
        super().__init__(server)

    @property
    def controller(self):  # the controller of the current socket's stream (hub.py compares against it)
        return self.controllers.get(current_stream.get())

    @controller.setter
    def controller(self, client) -> None:
        if client is None:
            self.controllers.pop(current_stream.get(), None)
        else:
            self.controllers[current_stream.get()] = client

    def add(self, ws, role: str):
        client, replaced = super().add(ws, role)
        client.stream = current_stream.get()
        return client, replaced

    def publish(self, out: GroupOutput) -> None:
        for c in self.clients:
            if c.stream == out.stream:
                if c.outbox is not None:
                    c.dropped += 1
                c.outbox = out
                c.have_frame.set()

    async def broadcast_streams(self, messages: list[dict[str, Any]]) -> None:
        """Each page gets its own stream's status message."""
        for c in list(self.clients):
            try:
                await c.send_json({**messages[c.stream], "dropped_out": c.dropped, "sent": c.sent, "role": c.role})
            except Exception:  # the client's own loop notices the disconnect
                pass

    async def serve(self, ws: WebSocket) -> None:
        try:
            index = self.server.parse_stream(ws.query_params.getlist("stream"))
        except HttpError as exc:
            await ws.accept()
            self.rejected += 1
            await ws.send_text(json.dumps(ProtocolError("stream", str(exc)).to_message()))
            await ws.close(1008, "stream out of range")
            return
        token = current_stream.set(index)
        try:
            await super().serve(ws)
        finally:
            current_stream.reset(token)


class StreamSelect:
    """ASGI middleware (inside the guard): checks ``?stream=`` of every HTTP request and sets ``current_stream``."""

    def __init__(self, app, server: "GroupServer") -> None:
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("stream", [])
        try:
            index = self.server.parse_stream(given)
        except HttpError as exc:
            body = json.dumps({"error": str(exc)}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": exc.status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        token = current_stream.set(index)
        try:
            await self.app(scope, receive, send)
        finally:
            current_stream.reset(token)


class GroupServer(DemoServer):
    """DemoServer over a MultiStreamEngine: one lane (controls, mailbox, controller) per stream."""

    hub_class = GroupHub

    def __init__(self, group: Any, options: DemoOptions | None = None, controls: list[Controls] | None = None) -> None:
        self.group = group
        n = len(group)
        controls = controls or [Controls() for _ in range(n)]
        if len(controls) != n:
            raise ValueError(f"a group server needs one Controls per stream ({n}); got {len(controls)}")
        self.worker_class = self._make_worker  # DemoServer.startup builds the worker through it
        self.record_stream = 0
        super().__init__(GroupEngine(group), options, controls[0])
        self.lanes = [StreamLane(self, i, c) for i, c in enumerate(controls)]
        self.app.user_middleware.append(Middleware(StreamSelect, server=self))  # innermost: after the guard
        self.app.add_api_route("/api/streams", self.streams_summary, methods=["GET"])

    # ---- the stream of a request -----------------------------------------------------------------------------
    def parse_stream(self, given: list[str]) -> int:
        """``?stream=`` values -> a stream index (none given: 0); HttpError 422 naming the range otherwise."""
        n = len(self.group)
        if not given:
            return 0
        if len(given) == 1 and INDEX.match(given[0]) and int(given[0]) < n:
            return int(given[0])
        got = short(given[0]) if len(given) == 1 else f"{len(given)} values"
        raise HttpError(422, f"stream: must be an integer from 0 to {n - 1} (this server runs {n} streams, "
                             f"--streams {n}); got {got}")

    def lane(self) -> StreamLane:
        return self.lanes[current_stream.get()]

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def apply_initial_controls(self) -> None:
        for lane in self.lanes:
            apply_all(lane.engine, lane.controls)

    def _make_worker(self, engine: GroupEngine, publish, **kw) -> GroupWorker:
        """Called by DemoServer.startup on the event loop; ``publish`` is replaced by one that records only the
        stream being recorded and hands each output to the hub, which sends it to that stream's pages."""
        loop, hub, recorder = asyncio.get_running_loop(), self.hub, self.recorder

        def publish_stream(out: GroupOutput) -> None:  # worker thread
            if out.stream == self.record_stream:
                recorder.add(out.image)
            loop.call_soon_threadsafe(hub.publish, out)

        return GroupWorker(engine, publish_stream, current_stream=current_stream.get, **kw)

    def set_recording(self, on: bool) -> dict[str, Any]:
        if on:
            self.record_stream = current_stream.get()
        return super().set_recording(on)

    # ---- status ------------------------------------------------------------------------------------------------
    def streams_summary(self) -> dict[str, Any]:
        """Every stream: controller connected, viewers, fps and counters, and the group's own figures."""
        counts = [{"control": 0, "view": 0} for _ in self.lanes]
        for c in list(self.hub.clients):
            counts[c.stream][c.role] += 1
        streams = []
        for lane in self.lanes:
            stats = self.worker.lane(lane.index).stats() if self.worker else {}
            streams.append({"index": lane.index, "controller": lane.index in self.hub.controllers,
                            "viewers": counts[lane.index]["view"], **stats})
        return {"streams": streams, "ticks": self.worker.ticks if self.worker else 0}

    def status(self) -> dict[str, Any]:
        lane = self.lane()
        try:
            engine_status = _json_safe(self.engine.status())
        except Exception as exc:  # status must never take the page down
            log.warning("group.status() failed: %s", exc)
            engine_status = {"error": f"{type(exc).__name__}: {exc}"}
        summary = self.streams_summary()
        server = dict(summary["streams"][lane.index])
        server.update(stream=lane.index, streams=len(self.lanes), ticks=summary["ticks"], clients=len(self.hub.clients),
                      rejected_messages=self.hub.rejected, width=self.width, height=self.height,
                      output_format=self.options.output_format.name.lower())
        return {"engine": engine_status, "server": server, "streams": summary["streams"],
                "controls": lane.controls_dict(), "record": {**self.recorder.status(), "stream": self.record_stream},
                "conditioning": self.conditioning.status(engine_status), "build": None}  # no build page for a group

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.status_interval_s)
            try:
                summary = await asyncio.to_thread(self.streams_summary)
                backend = self.group.backend if self.group.backend_fallback is None else "eager"
                record = {**self.recorder.status(), "stream": self.record_stream}
                conditioning = self.conditioning.status({})
                brief = [{"index": s["index"], "controller": s["controller"], "viewers": s["viewers"],
                          "fps": s.get("fps", 0.0)} for s in summary["streams"]]
                messages = [{"t": "status", **{k: s.get(k, 0) for k in ("fps", "process_ms", "busy_ms", "frames_in",
                                                                       "frames_out", "dropped_in", "errors")},
                             "last_error": s.get("last_error", ""), "backend": backend,
                             "clients": len(self.hub.clients),
                             "controls": lane.controls_dict(), "record": record, "conditioning": conditioning,
                             "build": None, "stream": lane.index, "streams": brief}
                            for s, lane in zip(summary["streams"], self.lanes)]
            except Exception:
                log.exception("could not collect status")
                continue
            await self.hub.broadcast_streams(messages)

    def hello(self, role: str) -> dict[str, Any]:
        lane = self.lane()
        msg = super().hello(role)
        msg.update(controls=lane.controls_dict(), stream=lane.index, streams=len(self.lanes))
        return msg


def _per_stream(name: str):
    def method(self: GroupServer, *args: Any) -> Any:
        return getattr(self.lane(), name)(*args)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"DemoServer.{name}, on the stream of this request (current_stream)."
    return method


for _name in PER_STREAM:  # every control route acts on the stream of its request
    setattr(GroupServer, _name, _per_stream(_name))
