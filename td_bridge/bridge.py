"""The bridge: an engine behind an input ring, an output ring and an OSC control port.

Threads::

    main (frame loop)                     osc-receive                    osc-heartbeat
    -----------------                     -----------                    -------------
    load engine, warm up, open rings      from the start: validate,      4 times a second: ring heartbeats
    loop until stop:                        mailbox.put / act,           (clients tell a live bridge by them)
      drain mailbox -> engine.update*       /error, /status              every second: /server_active 1,
      (between frames only)                                                state, fps, framecount, ring
      check both rings (size, header,                                      names, VRAM
        flags): repair / recreate
      transfer.poll()  (publish results)
      transfer.read() -> submit() -> /frame_ready

States sent as ``/stream-info/state``: loading -> building -> ready -> streaming <-> paused; error when a
frame fails (the loop keeps going and returns to streaming with the next good frame). While loading and
building, each build stage (rtdiffusion/progress.py) goes out as ``/engine/stage name index count fraction
elapsed_s estimate_s state source`` and its fraction as ``/stream-info/build-progress``.

Rings (see served_rings.py): the bridge creates both (``--input-name`` / ``--output-name``, default
``rtd_in_<pid>`` / ``rtd_out_<pid>``) and unlinks them at exit. If a segment of that name already exists and
is a ring of the same geometry (say TouchDesigner made it, or a crashed bridge left it), the bridge serves it
under a new session id and leaves it in place at exit, marked CLOSED. If it exists but is something else, the
bridge says why in ``/error`` and the log, creates its own under ``<name>_<pid>`` and announces that name. A
ring truncated under the bridge is replaced by a new one of the same name; a scribbled header or flags word
is rewritten; both are reported (``/error``, ``/stream-info/ring-event``, the log, ``/status``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable

import numpy as np

from .bridge_config import BridgeConfig  # noqa: F401 - part of this module's API
from .conditioning import Conditioning
from .lifecycle import BridgeLifecycle, State  # noqa: F401 - State is part of this module's API
from .osc import Action, Key, Mailbox, OscReceiver, OscSender, status_json
from .ring import RingError, RingReader, RingTruncated, RingWriter
from .served_rings import ServedRings
from .stream_settings import SETTING_KEYS, apply_setting
from .transfer import make_transfer

log = logging.getLogger(__name__)

RING_BEAT_S = 0.25  # ring heartbeat period; the OSC heartbeat goes out every 4th beat (once a second)
RING_BEATS_PER_OSC_BEAT = 4


class _BuildLog(logging.Handler):
    """Forwards the engine's INFO log lines while it loads as /stream-info/build-stage."""

    def __init__(self, sender: OscSender) -> None:
        super().__init__(logging.INFO)
        self._sender = sender

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._sender.send("/stream-info/build-stage", record.getMessage()[:1000])
        except Exception:  # never let status reporting break loading
            pass


class Bridge(BridgeLifecycle):
    """Owns the OSC threads, the rings, the transfer and the frame loop. Use ``start``, ``load``, ``run``,
    ``close`` in that order (``serve`` does all four); ``close`` is safe at any point."""

    def __init__(self, config: BridgeConfig, engine_factory: Callable[[], Any] | None = None) -> None:
        self.config = config
        self._factory = engine_factory or self._default_factory
        self.stop = threading.Event()
        self.mailbox = Mailbox(self.stop)
        self.state = State.LOADING
        self.engine = None
        self.rings: ServedRings | None = None
        self.transfer = None
        self.conditioning: Conditioning | None = None
        self.sender: OscSender | None = None
        self.receiver: OscReceiver | None = None
        self.frames_out = 0
        self.last_frame = -1
        self.errors = 0
        self.paused = False
        self._fps = 0.0
        self._state_lock = threading.Lock()
        self._heartbeat: threading.Thread | None = None
        self._started_at = time.monotonic()
        self._staged = False  # the engine reports build stages (/engine/stage)

    @property
    def reader(self) -> RingReader | None:
        return self.rings.reader if self.rings is not None else None

    @property
    def writer(self) -> RingWriter | None:
        return self.rings.writer if self.rings is not None else None

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> "Bridge":
        """OSC in and out, and the heartbeat, from the first moment (before the model loads)."""
        c = self.config
        self.sender = OscSender(c.osc_host, c.osc_out_port)
        self.receiver = OscReceiver(c.osc_listen, c.osc_in_port, self.mailbox, self.sender, self.status_text)
        self.receiver.start()
        self.rings = ServedRings(c, self.sender, c.extra_rings)
        self._heartbeat = threading.Thread(target=self._beat, name="osc-heartbeat", daemon=True)
        self._heartbeat.start()
        log.info("OSC: listening on %s:%d, sending to %s:%d", c.osc_listen, self.receiver.port, c.osc_host,
                 c.osc_out_port)
        self._set_state(State.LOADING)
        return self

    def _default_factory(self):
        from rtdiffusion import StreamEngine
        from rtdiffusion.cli.progress_view import TerminalProgress
        from rtdiffusion.progress import BuildProgress

        c = self.config
        progress = BuildProgress([self._on_stage, TerminalProgress()])  # OSC /engine/stage and stderr
        return StreamEngine.from_pretrained(c.model, width=c.width, height=c.height, progress=progress,
                                            **c.engine_options)

    def _on_stage(self, e) -> None:
        """A build stage (rtdiffusion.progress.StageEvent) as /engine/stage name index count fraction
        elapsed_s estimate_s state source, and its fraction as /stream-info/build-progress."""
        self._staged = True
        sender = self.sender
        if sender is None:
            return
        sender.send("/engine/stage", e.stage, e.index, e.count, float(e.fraction), float(e.elapsed_s),
                    float(e.estimate_s), e.state.value, e.source.value)
        sender.send("/stream-info/build-progress", float(e.fraction))

    def load(self) -> None:
        """Load and warm up the engine, then open the rings and announce their names.

        ``stop`` (set at once by /stop) is checked after the engine loads and after the warm-up frame; when
        set, load returns early with the rings unopened and ``serve`` exits cleanly."""
        sender = self.sender
        handler = _BuildLog(sender)
        watched = [logging.getLogger(n) for n in ("rtdiffusion", "engines")]
        for lg in watched:
            lg.addHandler(handler)
        try:
            sender.send("/stream-info/build-progress", 0.0)
            self.engine = self._factory()
            if self.stop.is_set():  # /stop (or SIGTERM) arrived while the model loaded
                return
            if self.config.style_image is not None:  # --style-image: encoded once, before the warm-up frame
                self.engine.set_style_image(self.config.style_image)
            if not self._staged:  # an engine factory without stages: coarse steps
                sender.send("/stream-info/build-progress", 0.6)
            self._set_state(State.BUILDING)
            sender.send("/stream-info/build-stage", "warm-up frame")
            e = self.engine
            self.engine(np.zeros((e.height, e.width, 3), np.uint8))  # captures / compiles what it needs
            if self.stop.is_set():
                return
            if not self._staged:
                sender.send("/stream-info/build-progress", 0.9)
            self.rings.open(e.width, e.height)
            self.transfer = make_transfer(e, self.reader, self.writer, self._published)
            self.conditioning = Conditioning(e, self.rings, sender, self.config.external_controlnets)
        finally:
            for lg in watched:
                lg.removeHandler(handler)
        sender.send("/stream-info/build-progress", 1.0)
        sender.send("/stream-info/build-stage", "ready")
        self._announce()
        self._set_state(State.READY)
        log.info("ready: input ring %s, output ring %s (%s), %s transfer", self.reader.name, self.writer.name,
                 self.writer.layout.describe(), self.transfer.name)

    def close(self) -> None:
        self.stop.set()
        if self.transfer is not None:
            try:
                self.transfer.close()
            except Exception as exc:  # the device may be gone; still unlink the rings below
                log.warning("flushing the last frames failed: %s", exc)
        if self.rings is not None:
            self.rings.close()
        if self.receiver is not None:
            self.receiver.close()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=2.0)
        if self.sender is not None:
            self._set_state(State.STOPPED)
            self.sender.send("/server_active", 0)
            self.sender.close()
        self.transfer = self.receiver = self.sender = None  # type: ignore[assignment]

    # ------------------------------------------------------------------------------------------ rings
    def _announce(self) -> None:
        s = self.sender
        if self.reader is not None:
            s.send("/stream-info/input-name", self.reader.name)
            s.send("/stream-info/output-name", self.writer.name)
            for what, ring in self.rings.extras.items():  # /stream-info/control-name, /stream-info/style-name
                s.send(f"/stream-info/{what.rsplit('/', 1)[1]}-name", ring.name)
        if self.receiver is not None:
            s.send("/stream-info/osc-in-port", self.receiver.port)

    # ------------------------------------------------------------------------------------------ frame loop
    def run(self) -> None:
        tr, rings = self.transfer, self.rings
        step_budget = 0
        read_error_at = 0.0
        idle = 0
        while not self.stop.is_set():
            steps = self._apply_controls()
            # /process_frame steps only while paused (counted in _apply_controls); pulses that arrive while
            # streaming are dropped, not saved up for the next /pause
            step_budget = step_budget + steps if self.paused else 0
            if self.stop.is_set():
                break
            if rings.check():  # before touching either ring: a shrunk one was replaced, headers repaired
                tr.reader, tr.writer = rings.reader, rings.writer
                self._announce()
            tr.poll()
            try:
                if self.paused:
                    if step_budget <= 0:
                        self.mailbox.changed.wait(0.05)
                        continue
                    step_budget -= 1
                    tr.read()
                    if not tr.has_input:
                        self.sender.error("/process_frame", "no input frame has arrived yet; nothing to process")
                        continue
                    self.conditioning.before_frame()
                    tr.submit()
                    continue
                if tr.read() is None:
                    idle += 1  # poll at 2 kHz while frames flow, at 500 Hz after 0.1 s without one
                    self.mailbox.changed.wait(0.0005 if idle < 200 else 0.002)
                    continue
                idle = 0
                self.conditioning.before_frame()  # control / style images from their rings, when new
                tr.submit()
                if self.state is not State.STREAMING:
                    self._set_state(State.STREAMING)
            except RingTruncated:  # shrank since rings.check() above: the next check replaces it and says so
                continue
            except RingError as exc:  # a slot stuck mid-write, a corrupt `published`: the same every loop
                now = time.monotonic()
                if now - read_error_at > 1.0:  # at most one report a second while it stays broken
                    self.sender.error("/ring/input", str(exc))
                    read_error_at = now
                self.mailbox.changed.wait(0.05)  # back off instead of spinning on the broken ring
            except Exception as exc:  # a failed frame: say so, keep the loop (and the OSC port) alive
                self.errors += 1
                log.exception("frame failed")
                self.sender.error("/frame", f"{type(exc).__name__}: {exc}"[:1000])
                self._set_state(State.ERROR)
                time.sleep(0.1)
        tr.close()

    def _published(self, index: int, source: int) -> None:
        self.frames_out += 1
        self.last_frame = index
        self.sender.send("/frame_ready", index)

    def _apply_controls(self) -> int:
        """Apply what arrived since the last frame; returns how many /process_frame steps were asked for."""
        values, actions = self.mailbox.drain()
        e = self.engine
        for key, (address, value) in values:
            try:
                if key in SETTING_KEYS:  # what a multi-stream group's streams have too
                    apply_setting(e, key, value)
                elif key is Key.SIMILAR_FILTER:
                    enabled, threshold = value
                    kw = {"similar_filter": enabled}
                    if threshold is not None:
                        kw["similar_threshold"] = threshold
                    e.update(**kw)
                elif key is Key.CACHED_ATTENTION:
                    e.update(**value)
                else:  # ControlNets, IP-Adapter
                    self.conditioning.apply(key, address, value)
            except (ValueError, TypeError) as exc:  # ConfigError is a ValueError; state unchanged
                self.sender.error(address, str(exc))
        steps = 0
        for action, count in actions:  # in arrival order
            if self._run_action(action):  # /stop, /pause, /play
                continue
            if action is Action.IPADAPTER_UPDATE:
                if self.rings is None or "/ring/style" not in self.rings.extras:
                    self.sender.error("/ipadapter_update", "this engine has no IP-Adapter (start it with "
                                                           "--ip-adapter MODEL), so there is no style ring to read")
                else:
                    self.conditioning.request_style()
            elif action is Action.PROCESS_FRAME and self.paused:
                steps += count  # a step that arrived while streaming is dropped, not saved up
        return steps

    # ------------------------------------------------------------------------------------------ status
    def _vram(self) -> tuple[float, float]:
        dev = getattr(self.engine, "device", None)
        if dev is None or getattr(dev, "type", "cpu") != "cuda":
            return 0.0, 0.0
        import torch

        free, total = torch.cuda.mem_get_info(dev)
        return (total - free) / 2**30, total / 2**30

    def _beat(self) -> None:
        """Ring heartbeats four times a second (clients tell a live bridge from a dead one by them); the OSC
        heartbeat every fourth tick."""
        last_n, last_t = self.frames_out, time.monotonic()
        tick = 0
        while True:
            rings = self.rings
            if rings is not None:
                rings.beat()
            tick += 1
            if tick % RING_BEATS_PER_OSC_BEAT != 1:
                if self.stop.wait(RING_BEAT_S):
                    return
                continue
            s = self.sender
            if s is None:
                return
            now = time.monotonic()
            n = self.frames_out
            self._fps = (n - last_n) / max(now - last_t, 1e-6)
            last_n, last_t = n, now
            try:
                s.send("/server_active", 1)
                s.send("/stream-info/state", self.state.value)
                s.send("/stream-info/fps", float(self._fps))
                s.send("/framecount", n)
                used, total = self._vram()
                s.send("/vram/used", float(used))
                s.send("/vram/total", float(total))
                self._announce()
                self._conditioning_info(s)
            except Exception as exc:  # the socket closed under us at shutdown
                log.debug("heartbeat: %s", exc)
            if self.stop.wait(RING_BEAT_S):
                return

    def _conditioning_info(self, s: OscSender) -> None:
        """/stream-info/controlnets and /stream-info/ipadapter (JSON, as in status()) once a second, when the
        engine has them."""
        if self.engine is None or self.conditioning is None:
            return
        st = self.engine.status()
        for key, address in (("controlnets", "/stream-info/controlnets"), ("ip_adapter", "/stream-info/ipadapter")):
            if st.get(key):
                s.send(address, json.dumps(st[key], default=str))

    def status(self) -> dict[str, Any]:
        c = self.config
        st: dict[str, Any] = {
            "state": self.state.value, "paused": self.paused, "uptime_s": time.monotonic() - self._started_at,
            "frames_out": self.frames_out, "last_frame": self.last_frame, "fps": self._fps,
            "frame_errors": self.errors,
            "input_name": self.reader.name if self.reader else None,
            "output_name": self.writer.name if self.writer else None,
            "ring": self.writer.layout.describe() if self.writer else None,
            "pixel_format": c.pixel_format.value, "row_order": c.row_order.name.lower().replace("_", "-"),
            "transfer": self.transfer.name if self.transfer else None,
            "osc": {"in_port": self.receiver.port if self.receiver else None, "out_port": c.osc_out_port,
                    "received": self.receiver.received if self.receiver else 0,
                    "rejected": self.receiver.rejected if self.receiver else 0,
                    "recv_buffer": self.receiver.recv_buffer if self.receiver else 0},
            "input_retries": self.reader.retries if self.reader else 0,
            "rings": self.rings.status() if self.rings is not None else None,
            "conditioning": self.conditioning.status() if self.conditioning is not None else {},
        }
        if self.engine is not None:
            try:
                st["engine"] = self.engine.status()
            except Exception as exc:  # status must answer even mid-frame
                st["engine"] = {"error": str(exc)}
        return st

    def status_text(self) -> str:
        return status_json(self.status())
