"""A bridge serving several streams from one engine: one MultiStreamEngine, one ring pair per stream.

``rtdiffusion td --streams N`` (N >= 2; docs/touchdesigner.md, "Several streams from one engine")::

    main (tick loop)                                osc-receive (stream_osc)          osc-heartbeat
    ----------------                                ------------------------          -------------
    load the group, warm up, open N ring pairs      /stream/<i>/... -> boxes[i]       ring beats 4x a second;
    loop until stop:                                /prompt ... -> every box          every second /server_active,
      drain each stream's mailbox ->                /pause /play /stop -> mailbox     state, fps, framecount, and
        group.stream(i).update (between ticks)                                      per stream its names, fps,
      per stream: check its rings (repair /                                         framecount
        recreate), read its newest input frame
        (none new, or a bad ring: None)
      group.step_all(frames) -> one UNet call
      per stream: write its output ring, /stream/<i>/frame_ready

A stream without a new frame this tick gets None (the group holds it: it loses nothing). A stream whose
ring is bad (stuck slot, corrupt counter, truncated) is reported under its own address
(``/error /stream/<i>/ring/input ...``, at most once a second) and sits the tick out; the others are served.
A frame that fails for one stream (StreamErrors) is reported as ``/error /stream/<i>/frame``; the others'
outputs are written. Frames go through host numpy buffers (the group uploads them in one copy); the single
bridge's CUDA zero-copy transfer is not used here.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import numpy as np

from .lifecycle import BridgeLifecycle, State
from .multi_config import MultiConfig
from .osc import Mailbox, OscSender, status_json
from .osc_controls import Action
from .ring import RingError, RingTruncated, RowOrder, to_rgb
from .served_rings import ServedRings
from .stream_osc import StreamOscReceiver, StreamSender, apply_control

log = logging.getLogger(__name__)

RING_BEAT_S = 0.25
RING_BEATS_PER_OSC_BEAT = 4
REPORT_EVERY_S = 1.0


class _StreamPort:
    """Stream ``index``'s rings, frame buffers and counters (used by the tick loop only, except status)."""

    def __init__(self, index: int, config, sender: StreamSender) -> None:
        self.index, self.sender = index, sender
        self.rings = ServedRings(config, sender)
        self.raw: np.ndarray | None = None  # [H, W, C] ring layout
        self.rgb: np.ndarray | None = None  # [H, W, 3] top-down RGB, what the group takes
        self.has_input = False
        self.source = -1
        self.frames_out = 0
        self.last_frame = -1
        self.errors = 0
        self.last_error: str | None = None
        self._reported_at: dict[str, float] = {}

    def open(self, width: int, height: int) -> None:
        self.rings.open(width, height)
        lay = self.rings.reader.layout
        self.raw = np.zeros(lay.shape, np.uint8)
        self.rgb = np.zeros((lay.height, lay.width, 3), np.uint8)

    def report(self, what: str, reason: str) -> None:
        """``/error /stream/<i><what> reason``; the same kind of problem at most once a second."""
        self.last_error = f"{what}: {reason}"
        now = time.monotonic()
        if now - self._reported_at.get(what, -1e9) >= REPORT_EVERY_S:
            self._reported_at[what] = now
            self.sender.error(what, reason)

    def take(self) -> np.ndarray | None:
        """This stream's newest input frame as RGB, or None (nothing new, or its ring is bad: reported)."""
        try:
            info = self.rings.reader.read(self.raw)
        except RingTruncated:  # shrank since the check: the next check replaces it and says so
            return None
        except RingError as exc:  # a stuck slot, a corrupt counter: the same every tick until it is fixed
            self.report("/ring/input", str(exc))
            return None
        if info is None:
            return None
        to_rgb(self.raw, self.rings.reader.layout, self.rgb)
        self.has_input, self.source = True, info.index
        return self.rgb

    def publish(self, out: np.ndarray) -> None:
        try:
            n = self.rings.writer.write(out, rows=RowOrder.TOP_DOWN, source_index=self.source)
        except RingError as exc:  # truncated under us: the next check makes a new one
            self.report("/ring/output", str(exc))
            return
        self.frames_out += 1
        self.last_frame = n
        self.sender.send("/frame_ready", n)

    def names(self) -> tuple[str | None, str | None]:
        r, w = self.rings.reader, self.rings.writer
        return (r.name if r is not None else None), (w.name if w is not None else None)

    def status(self) -> dict[str, Any]:
        inp, out = self.names()
        return {"index": self.index, "input_name": inp, "output_name": out, "frames_out": self.frames_out,
                "last_frame": self.last_frame, "frame_errors": self.errors, "last_error": self.last_error,
                "rings": self.rings.status()}


class MultiBridge(BridgeLifecycle):
    """One MultiStreamEngine behind N ring pairs and one OSC port. ``serve`` runs start, load, run, close."""

    def __init__(self, config: MultiConfig, engine_factory: Callable[[], Any] | None = None) -> None:
        self.config = config
        self._factory = engine_factory or self._default_factory
        self.stop = threading.Event()
        self.mailbox = Mailbox(self.stop)  # the bridge's actions
        self.boxes = [Mailbox() for _ in range(config.streams)]  # each stream's settings
        self.state = State.LOADING
        self.engine = None
        self.sender: OscSender | None = None
        self.receiver: StreamOscReceiver | None = None
        self.ports: list[_StreamPort] = []
        self.paused = False
        self.errors = 0
        self._fps = 0.0
        self._stream_fps = [0.0] * config.streams
        self._state_lock = threading.Lock()
        self._heartbeat: threading.Thread | None = None
        self._opened = False
        self._started_at = time.monotonic()

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> "MultiBridge":
        b = self.config.bridge
        self.sender = OscSender(b.osc_host, b.osc_out_port)
        self.ports = [_StreamPort(i, self.config.stream_config(i), StreamSender(self.sender, i))
                      for i in range(self.config.streams)]  # before the receiver: /stream/<i>/get_status reads them
        self.receiver = StreamOscReceiver(b.osc_listen, b.osc_in_port, self.mailbox, self.boxes, self.sender,
                                          self.status_text)
        self.receiver.start()
        self._heartbeat = threading.Thread(target=self._beat, name="osc-heartbeat", daemon=True)
        self._heartbeat.start()
        log.info("OSC: listening on %s:%d, sending to %s:%d; %d streams", b.osc_listen, self.receiver.port,
                 b.osc_host, b.osc_out_port, self.config.streams)
        self._set_state(State.LOADING)
        return self

    def _default_factory(self):
        from rtdiffusion import MultiStreamEngine

        b = self.config.bridge
        opts = {k: v for k, v in b.engine_options.items() if v is not None}
        return MultiStreamEngine.from_pretrained(b.model, streams=self.config.streams, width=b.width,
                                                 height=b.height, **opts)

    def load(self) -> None:
        """Load the group, run one warm-up tick, open every stream's rings and announce their names."""
        s = self.sender
        s.send("/stream-info/build-progress", 0.0)
        s.send("/stream-info/build-stage", f"loading {self.config.bridge.model} for {self.config.streams} streams")
        self.engine = self._factory()
        if self.stop.is_set():
            return
        s.send("/stream-info/build-progress", 0.6)
        self._set_state(State.BUILDING)
        s.send("/stream-info/build-stage", "warm-up tick")
        e = self.engine
        w, h = e.config.width, e.config.height
        e.step_all([np.zeros((h, w, 3), np.uint8) for _ in self.ports])
        if self.stop.is_set():
            return
        s.send("/stream-info/build-progress", 0.9)
        for p in self.ports:
            p.open(w, h)
        self._opened = True
        s.send("/stream-info/build-progress", 1.0)
        s.send("/stream-info/build-stage", "ready")
        self._announce()
        self._set_state(State.READY)
        log.info("ready: %d streams, rings %s", len(self.ports), [p.names() for p in self.ports])

    def close(self) -> None:
        self.stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=2.0)
        for p in self.ports:
            p.rings.close()
        if self.receiver is not None:
            self.receiver.close()
        if self.sender is not None:
            self._set_state(State.STOPPED)
            self.sender.send("/server_active", 0)
            self.sender.close()
        self.receiver = self.sender = None  # type: ignore[assignment]

    def _announce(self) -> None:
        s = self.sender
        if self._opened:
            for p in self.ports:
                inp, out = p.names()
                p.sender.send("/stream-info/input-name", inp)
                p.sender.send("/stream-info/output-name", out)
            inp, out = self.ports[0].names()  # un-prefixed: stream 0's, so a single-stream client finds one pair
            s.send("/stream-info/input-name", inp)
            s.send("/stream-info/output-name", out)
        s.send("/stream-info/streams", len(self.ports))
        if self.receiver is not None:
            s.send("/stream-info/osc-in-port", self.receiver.port)

    # ------------------------------------------------------------------------------------------ tick loop
    def run(self) -> None:
        step_budget, idle = 0, 0
        while not self.stop.is_set():
            steps = self._apply_controls()
            step_budget = step_budget + steps if self.paused else 0
            if self.stop.is_set():
                break
            replaced = False
            for p in self.ports:
                replaced |= p.rings.check()  # a shrunk ring replaced, a scribbled header rewritten
            if replaced:
                self._announce()
            if self.paused:
                if step_budget <= 0:
                    self.mailbox.changed.wait(0.05)
                    continue
                step_budget -= 1
                # each stream's newest frame, else its last one (a stream with none yet sits the step out)
                frames = [p.take() for p in self.ports]
                frames = [p.rgb if f is None and p.has_input else f for f, p in zip(frames, self.ports)]
                if not any(f is not None for f in frames):
                    self.sender.error("/process_frame", "no input frame has arrived on any stream yet")
                    continue
                self._tick(frames)
                continue
            frames = [p.take() for p in self.ports]
            if not any(f is not None for f in frames):
                idle += 1  # poll at 2 kHz while frames flow, at 500 Hz after 0.1 s without one
                self.mailbox.changed.wait(0.0005 if idle < 200 else 0.002)
                continue
            idle = 0
            if self._tick(frames) and self.state is not State.STREAMING:
                self._set_state(State.STREAMING)

    def _tick(self, frames: list) -> bool:
        """One group tick; writes each stream's output. False when the whole tick failed."""
        try:
            outs = self.engine.step_all(frames, return_exceptions=True)
        except Exception as exc:  # the tick itself failed: say so, keep the loop (and the OSC port) alive
            self.errors += 1
            log.exception("tick failed")
            self.sender.error("/frame", f"{type(exc).__name__}: {exc}"[:1000])
            self._set_state(State.ERROR)
            time.sleep(0.1)
            return False
        for p, out in zip(self.ports, outs):
            if isinstance(out, BaseException):  # this stream's frame or settings failed; the others ran
                p.errors += 1
                p.report("/frame", f"{type(out).__name__}: {out}")
            elif out is not None:
                p.publish(out)
        return True

    def _apply_controls(self) -> int:
        """Each stream's settings that arrived since the last tick, then the bridge's actions; returns how
        many /process_frame steps were asked for."""
        for i, box in enumerate(self.boxes):
            values, _ = box.drain()
            for key, (address, value) in values:
                try:
                    apply_control(self.engine.stream(i), key, value)
                except (ValueError, TypeError) as exc:  # ConfigError is a ValueError; the stream is unchanged
                    where = "" if address.startswith("/stream/") else f"stream {i}: "
                    self.sender.error(address, where + str(exc))
        _, actions = self.mailbox.drain()
        steps = 0
        for action, count in actions:
            if self._run_action(action):  # /stop, /pause, /play
                continue
            if action is Action.PROCESS_FRAME and self.paused:
                steps += count
        return steps

    # ------------------------------------------------------------------------------------------ status
    def _beat(self) -> None:
        last = [p.frames_out for p in self.ports]
        last_t, tick = time.monotonic(), 0
        while True:
            for p in self.ports:
                p.rings.beat()
            tick += 1
            if tick % RING_BEATS_PER_OSC_BEAT == 1 and self.sender is not None:
                now = time.monotonic()
                dt = max(now - last_t, 1e-6)
                counts = [p.frames_out for p in self.ports]
                self._stream_fps = [(n - m) / dt for n, m in zip(counts, last)]
                self._fps, last, last_t = sum(self._stream_fps), counts, now
                try:
                    s = self.sender
                    s.send("/server_active", 1)
                    s.send("/stream-info/state", self.state.value)
                    s.send("/stream-info/fps", float(self._fps))
                    s.send("/framecount", sum(counts))
                    for p, fps in zip(self.ports, self._stream_fps):
                        p.sender.send("/stream-info/fps", float(fps))
                        p.sender.send("/framecount", p.frames_out)
                    self._announce()
                except Exception as exc:  # the socket closed under us at shutdown
                    log.debug("heartbeat: %s", exc)
            if self.stop.wait(RING_BEAT_S):
                return

    def status(self, index: int | None = None) -> dict[str, Any]:
        """The bridge's status (index None) or stream ``index``'s."""
        e = self.engine
        if index is not None:
            st = {**self.ports[index].status(), "fps": self._stream_fps[index], "state": self.state.value}
            if e is not None:
                st["engine"] = _safe(lambda: e.stream(index).status())
            return st
        c = self.config.bridge
        st = {
            "state": self.state.value, "paused": self.paused, "streams": len(self.ports),
            "uptime_s": time.monotonic() - self._started_at, "fps": self._fps, "tick_errors": self.errors,
            "frames_out": sum(p.frames_out for p in self.ports), "pixel_format": c.pixel_format.value,
            "row_order": c.row_order.name.lower().replace("_", "-"), "transfer": "host",
            "osc": {"in_port": self.receiver.port if self.receiver else None, "out_port": c.osc_out_port,
                    "received": self.receiver.received if self.receiver else 0,
                    "rejected": self.receiver.rejected if self.receiver else 0},
            "per_stream": [{**p.status(), "fps": f} for p, f in zip(self.ports, self._stream_fps)],
        }
        if e is not None:
            st["engine"] = _safe(e.status)
        return st

    def status_text(self, index: int | None = None) -> str:
        """/status JSON (receive thread); a failure is answered in the JSON, never raised into the receiver."""
        return status_json(_safe(lambda: self.status(index)))


def _safe(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # status must answer even mid-tick
        return {"error": str(exc)}
