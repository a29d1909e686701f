"""ControlNet and IP-Adapter for the bridge: live settings from OSC, control and style images from rings.

Who calls what (all on the frame loop's thread, between frames)::

    bridge._apply_controls  apply(key, value)   /controlnets, /controlnet/<i>/<field> -> engine.update(controlnets=)
                                                /ipadapter_scale, /ipadapter_enable -> engine.update(ip_adapter_...)
                            request_style()     /ipadapter_update: re-read the style ring before the next frame
    bridge.run              before_frame()      control ring: its newest frame, if new, -> engine.set_control_image
                                                  for every 'external' ControlNet (the engine keeps the last one)
                                                style ring: a new frame whose pixels differ from the last one
                                                  encoded (or a requested update) -> engine.set_style_image
                                                  (encoded once per change, never per frame, even if
                                                  TouchDesigner writes the same picture every frame)

A bad message or image is answered with ``/error <address> <reason>`` and leaves the engine's previous settings.
Buffers are allocated once (on the first frame of each ring); nothing here allocates per frame.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from .osc_controls import LIVE_CN_FIELDS, Key
from .ring import RingError, RingTruncated, to_rgb

log = logging.getLogger(__name__)

REPORT_EVERY_S = 1.0  # a ring problem that stays is reported at most this often


class _Feed:
    """One extra ring read into top-down RGB: [H, W, C] raw and [H, W, 3] rgb buffers, made once."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.raw: np.ndarray | None = None
        self.rgb: np.ndarray | None = None
        self.frames = 0
        self.error: str | None = None

    def read(self, ring, newest: bool = False) -> np.ndarray | None:
        """The ring's newest frame as [H, W, 3] uint8 RGB if it is new (or, with ``newest``, even if not)."""
        lay = ring.layout
        if self.raw is None or self.raw.shape != lay.shape:
            self.raw = np.zeros(lay.shape, np.uint8)
            self.rgb = np.zeros((lay.height, lay.width, 3), np.uint8)
        if newest and ring.published > 0:
            ring.last_index = min(ring.last_index, ring.published - 2)
        if ring.read(self.raw) is None:
            return None
        self.frames += 1
        return to_rgb(self.raw, lay, self.rgb)


class Conditioning:
    """The engine's ControlNets and IP-Adapter as the bridge drives them."""

    def __init__(self, engine, rings, sender, external: tuple[int, ...] = ()) -> None:
        self.engine, self.rings, self.sender = engine, rings, sender
        self.external = external  # indices of the ControlNets whose image comes from the control ring
        self.control = _Feed("/ring/control")
        self.style = _Feed("/ring/style")
        self.style_updates = 0  # style images handed to the engine (each encoded once)
        self._style_requested = False
        self._last_style: np.ndarray | None = None  # [H, W, 3] the last style image handed over
        self._reported: dict[str, float] = {}

    # ----------------------------------------------------------------------------------------- settings
    def apply(self, key: Key, address: str, value: Any) -> None:
        """One pending control; raises ValueError / TypeError (ConfigError) naming what was expected."""
        e = self.engine
        if key is Key.IP_ADAPTER_SCALE:
            e.update(ip_adapter_scale=value)
        elif key is Key.IP_ADAPTER_ENABLED:
            e.update(ip_adapter_enabled=value)
        elif key is Key.CONTROLNETS:
            for index, (unit_address, fields) in sorted(value.items()):
                try:
                    self._controlnet(index, fields)
                except (ValueError, TypeError) as exc:  # one unit's error leaves the other units' updates
                    self.sender.error(unit_address, str(exc))

    def _controlnet(self, index: int, fields: dict[str, Any]) -> None:
        units = self.engine.status().get("controlnets") or []
        if index >= len(units):
            have = f"ControlNets 0 to {len(units) - 1}" if units else "no ControlNet (start it with --controlnet)"
            raise ValueError(f"ControlNet index {index} is out of range: the engine has {have}")
        unit = units[index]
        for field in ("model", "preprocessor"):
            if field in fields and str(fields[field]) != str(unit.get(field)):
                raise ValueError(f"ControlNet {index} runs {field} {unit.get(field)!r}; {field} cannot change while "
                                 f"streaming (got {fields[field]!r}); restart the engine with it")
        live = {k: v for k, v in fields.items() if k in LIVE_CN_FIELDS}
        if live:
            self.engine.update(controlnets={index: live})

    def request_style(self) -> None:
        """/ipadapter_update: read the style ring's newest frame before the next frame, even if not new."""
        self._style_requested = True

    # ----------------------------------------------------------------------------------------- images
    def before_frame(self) -> None:
        rings = self.rings.extras
        ring = rings.get("/ring/control")
        if ring is not None and self.external:
            self._feed_control(ring)
        ring = rings.get("/ring/style")
        if ring is not None and (self._style_requested or ring.new_frame()):
            self._feed_style(ring)

    def _feed_control(self, ring) -> None:
        try:
            rgb = self.control.read(ring)
            if rgb is None:
                return
            for i in self.external:
                self.engine.set_control_image(rgb, index=i)
            self.control.error = None
        except RingTruncated:
            return  # the next rings.check() replaces it and says so
        except (RingError, ValueError, TypeError) as exc:
            self._problem(self.control, str(exc))

    def _feed_style(self, ring) -> None:
        forced, self._style_requested = self._style_requested, False
        try:
            rgb = self.style.read(ring, newest=forced)
            if rgb is None:
                if forced:
                    self._problem(self.style, "/ipadapter_update: the style ring holds no frame yet; send the style "
                                              f"TOP to ring {ring.name!r} first", address="/ipadapter_update")
                return
            if not forced and self._last_style is not None and np.array_equal(rgb, self._last_style):
                return  # the same picture again: no encode
            self.engine.set_style_image(rgb.copy())
            if self._last_style is None:
                self._last_style = np.empty_like(rgb)
            np.copyto(self._last_style, rgb)
            self.style_updates += 1
            self.style.error = None
            self.sender.send("/stream-info/style-updates", self.style_updates)
        except RingTruncated:
            return
        except (RingError, ValueError, TypeError, OSError) as exc:
            self._problem(self.style, str(exc))

    def _problem(self, feed: _Feed, text: str, address: str | None = None) -> None:
        feed.error = text
        now = time.monotonic()
        if now - self._reported.get(text, -1e9) >= REPORT_EVERY_S:
            if len(self._reported) > 64:
                self._reported.clear()
            self._reported[text] = now
            self.sender.error(address or feed.what, text)

    # ----------------------------------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        rings = self.rings.extras if self.rings is not None else {}
        st: dict[str, Any] = {}
        if "/ring/control" in rings:
            st.update(control_ring=rings["/ring/control"].name, control_frames=self.control.frames,
                      control_error=self.control.error, external_controlnets=list(self.external))
        if "/ring/style" in rings:
            st.update(style_ring=rings["/ring/style"].name, style_updates=self.style_updates,
                      style_error=self.style.error)
        return st
