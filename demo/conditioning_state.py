"""The server's side of ControlNet and IP-Adapter: what the engine was built with, and the current style image.

The live settings (scales, toggles, step ranges) are part of ``Controls`` and change through the server's
validate-then-commit path like every other control; this object holds what does not: the labels the page
shows for each ControlNet, whether there is an IP-Adapter, and the style image (its thumbnail for the page,
its name and size). Style images are decoded and encoded one at a time (``_lock``), on the thread the request
came in on (the hub hands uploads to a worker thread), never on the event loop.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from .conditioning import MAX_STYLE_BYTES, controlnet_info, controlnet_state, decode_style, thumbnail_png
from .controls import Controls, HttpError
from .protocol import ProtocolError

log = logging.getLogger(__name__)

NO_IP_ADAPTER = "this engine has no IP-Adapter (start the demo with --ip-adapter MODEL)"


class Conditioning:
    """The engine's ControlNets and IP-Adapter as built; fills ``controls``' live settings from the engine
    unless they already match its ControlNets (a server started with saved controls keeps them)."""

    def __init__(self, engine: Any, controls: Controls) -> None:
        self.engine = engine
        try:
            status = engine.status()
        except Exception as exc:  # status must never keep the page from starting
            log.warning("engine.status() failed: %s", exc)
            status = {}
        self.controlnets = controlnet_info(status)  # [{index, model, preprocessor, family}]
        ip = status.get("ip_adapter") or None
        self.ip_adapter = {"model": str(ip.get("model", "?"))} if isinstance(ip, dict) else None
        if len(controls.controlnets) != len(self.controlnets):
            controls.controlnets = controlnet_state(status)
        if self.ip_adapter is None:
            controls.ip_adapter_scale = None
        elif controls.ip_adapter_scale is None:
            controls.ip_adapter_scale = float(ip.get("scale", 1.0))
            controls.ip_adapter_enabled = bool(ip.get("enabled", True))
        self._lock = threading.Lock()
        self.style: dict[str, Any] | None = None  # {name, width, height, version} of the current style image
        self.thumbnail: bytes | None = None  # PNG, at most THUMB_SIDE pixels

    def hello(self) -> dict[str, Any]:
        return {"controlnets": self.controlnets, "ip_adapter": self.ip_adapter, "style": self.style,
                "max_style_bytes": MAX_STYLE_BYTES}

    def status(self, engine_status: dict[str, Any]) -> dict[str, Any]:
        """What the engine reports of its ControlNets and IP-Adapter, and the current style image."""
        return {"controlnets": engine_status.get("controlnets") or [], "ip_adapter": engine_status.get("ip_adapter"),
                "style": self.style}

    def check_ip_adapter(self) -> None:
        if self.ip_adapter is None:
            raise HttpError(400, NO_IP_ADAPTER)

    def set_style_image(self, data: bytes | memoryview, name: str = "the style image") -> dict[str, Any]:
        """Decode a PNG/JPEG file and make it the IP-Adapter's style image. Raises ProtocolError (a bad file) or
        HttpError (no IP-Adapter, or the engine refused it); either way the engine keeps its previous style."""
        self.check_ip_adapter()
        image = decode_style(data, name)  # [H, W, 3] uint8
        with self._lock:
            try:
                self.engine.set_style_image(image)  # encoded once here, never per frame
            except ValueError as exc:  # ConfigError / FrameError
                raise HttpError(400, f"the engine refused the style image: {exc}") from None
            self._show(image, name[:120])
            log.info("style image %s (%dx%d) set", name[:120], image.shape[1], image.shape[0])
            return dict(self.style)

    def note_style_files(self, paths: list[str]) -> None:
        """The style image(s) the engine was started with (--style-image): shown on the page, not sent again."""
        if not paths:
            return
        try:
            with open(paths[0], "rb") as f:
                image = decode_style(f.read(), paths[0])
        except (OSError, ProtocolError) as exc:  # the engine read it already; only the thumbnail is missing
            log.warning("no thumbnail for the style image %s: %s", paths[0], exc)
            return
        with self._lock:
            self._show(image, Path(paths[0]).name + (f" + {len(paths) - 1} more" if len(paths) > 1 else ""))

    def _show(self, image, name: str) -> None:  # under _lock
        version = (self.style or {}).get("version", 0) + 1
        self.thumbnail = thumbnail_png(image)
        self.style = {"name": name, "width": int(image.shape[1]), "height": int(image.shape[0]), "version": version}
