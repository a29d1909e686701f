"""The websocket side of the web app: every connected page, on the event loop.

One control page sends frames; a newer one takes over (the older one is told ``replaced`` and closed). Viewers
only receive. Each client has a one-slot outbox: a newer output replaces one not yet sent (counted as dropped),
and the next output is sent only after the client says ``shown`` for the previous one (or ``ack_timeout_s``).
Host, token and Origin were checked before the upgrade reached this module (guard.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from fastapi import WebSocket, WebSocketDisconnect

from pydantic import ValidationError

from . import protocol
from .conditioning import ControlNetBody, IpAdapterBody, is_style_message, parse_style
from .controls import HttpError
from .protocol import Format, ProtocolError
from .routes import validation_message
from .worker import InputFrame, OutputFrame

if TYPE_CHECKING:
    from .server import DemoServer

log = logging.getLogger(__name__)


class Client:
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
    """All connected pages. ``publish`` (on the loop) fans one output frame out to every outbox."""

    def __init__(self, server: "DemoServer") -> None:
        self.server = server
        self.clients: set[Client] = set()
        self.controller: Client | None = None
        self.rejected = 0
        self.connections = 0
        self._tasks: set[asyncio.Task] = set()  # style uploads in progress (kept referenced until done)

    def add(self, ws: WebSocket, role: str) -> tuple[Client, Client | None]:
        self.connections += 1
        client = Client(ws, role, self.connections)
        self.clients.add(client)
        replaced = None
        if role == "control":
            replaced, self.controller = self.controller, client
        return client, replaced

    def remove(self, client: Client) -> None:
        self.clients.discard(client)
        if self.controller is client:
            self.controller = None

    def publish(self, out: OutputFrame) -> None:
        for c in self.clients:
            if c.outbox is not None:
                c.dropped += 1
            c.outbox = out
            c.have_frame.set()

    async def close_all(self) -> None:
        for c in list(self.clients):
            try:
                await c.ws.close(1001, "server shutting down")
            except Exception:  # already gone
                pass

    async def broadcast_status(self, message: dict[str, Any]) -> None:
        for c in list(self.clients):
            try:
                await c.send_json({**message, "dropped_out": c.dropped, "sent": c.sent, "role": c.role})
            except Exception:  # the client's own loop notices the disconnect
                pass

    # ---- one socket -------------------------------------------------------------------------------------------
    async def _sender(self, client: Client) -> None:
        timeout = self.server.options.ack_timeout_s
        while True:
            await client.have_frame.wait()
            try:
                await asyncio.wait_for(client.acked.wait(), timeout)
            except asyncio.TimeoutError:
                log.debug("client %d did not say 'shown' within %.1f s; sending anyway", client.number, timeout)
            out, client.outbox = client.outbox, None
            client.have_frame.clear()
            if out is None:
                continue
            client.acked.clear()
            await client.send_bytes(out.message)
            client.sent += 1

    async def _on_frame(self, client: Client, data: bytes) -> None:
        s = self.server
        if is_style_message(data):
            return await self._on_style(client, data)
        if client is not self.controller:
            raise ProtocolError("not_controller", "only the control page (/ws?role=control) may send frames; "
                                                  "this socket is a viewer")
        if len(data) > s.max_frame_bytes:
            raise ProtocolError("too_large", f"a frame for this {s.width}x{s.height} engine is at most "
                                             f"{s.max_frame_bytes} bytes; got {len(data)}")
        head = protocol.parse_header(data)
        if head.format is Format.JPEG:  # Pillow decodes off the loop
            head, image = await asyncio.to_thread(protocol.decode_input, data, s.width, s.height)
        else:
            head, image = protocol.decode_input(data, s.width, s.height)
        assert s.worker is not None
        s.worker.submit(InputFrame(image, head.frame_id, head.timestamp_ms, time.monotonic()))
        await client.send_json({"t": "ack", "id": head.frame_id})

    async def _on_text(self, client: Client, text: str) -> None:
        msg = protocol.parse_text(text)
        if msg["t"] == "shown":
            client.acked.set()
        elif msg["t"] == "ping":
            await client.send_json({"t": "pong"})
        elif msg["t"] in ("controlnet", "ip_adapter"):
            await self._on_conditioning(client, msg)

    async def _on_conditioning(self, client: Client, msg: dict[str, Any]) -> None:
        """A live ControlNet / IP-Adapter setting: validated, applied on a worker thread, answered 'applied'."""
        what = msg["t"]
        if client is not self.controller:
            raise ProtocolError("not_controller", f"only the control page (/ws?role=control) may change {what} "
                                                  "settings; this socket is a viewer", what)
        body_type, apply = ((ControlNetBody, self.server.set_controlnet) if what == "controlnet" else
                            (IpAdapterBody, self.server.set_ip_adapter))
        try:
            body = body_type.model_validate(msg)
        except ValidationError as exc:
            raise ProtocolError("invalid", f"{what}: {validation_message(exc)}", what) from None
        try:
            controls = await asyncio.to_thread(apply, body)
        except HttpError as exc:
            raise ProtocolError("rejected", f"{what}: {exc}", what) from None
        await client.send_json({"t": "applied", "what": what, "controls": controls})

    async def _on_style(self, client: Client, data: bytes) -> None:
        """A style image upload (conditioning.py): the header is checked here; decoding and handing it to the engine
        run on a worker thread in their own task, so the page's frames keep flowing meanwhile (a large PNG takes
        a second to decode). Answered 'applied' or an error with what = 'style_image'."""
        try:
            if client is not self.controller:
                raise ProtocolError("not_controller", "only the control page (/ws?role=control) may set the style "
                                                      "image; this socket is a viewer")
            request_id, name, payload = parse_style(data)
        except ProtocolError as exc:
            exc.what = "style_image"
            raise
        task = asyncio.create_task(self._set_style(client, request_id, name, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _set_style(self, client: Client, request_id: int, name: str, payload: memoryview) -> None:
        try:
            try:
                style = await asyncio.to_thread(self.server.conditioning.set_style_image, payload,
                                                name[:60] or "the style image")
            except HttpError as exc:
                raise ProtocolError("rejected", f"style image: {exc}") from None
            reply = {"t": "applied", "what": "style_image", "id": request_id, "style": style}
        except ProtocolError as exc:
            exc.what = "style_image"
            self._count_rejected(client, exc)
            reply = {**exc.to_message(), "id": request_id}
        try:
            await client.send_json(reply)
        except Exception:  # the page went away meanwhile
            pass

    def _count_rejected(self, client: Client, exc: ProtocolError) -> None:
        client.rejected += 1
        self.rejected += 1
        log.info("websocket %d: rejected a message (%s): %s", client.number, exc.code, exc)

    async def serve(self, ws: WebSocket) -> None:
        role = ws.query_params.get("role", "view")
        await ws.accept()
        if role not in ("control", "view"):
            await ws.send_text(json.dumps(ProtocolError(
                "role", f"role must be 'control' or 'view'; got {role[:40]!r}").to_message()))
            await ws.close(1008, "role must be 'control' or 'view'")
            return
        client, replaced = self.add(ws, role)
        log.info("websocket %d connected as %s (%d clients)", client.number, role, len(self.clients))
        if replaced is not None:
            asyncio.create_task(self._retire(replaced))
        sender = asyncio.create_task(self._sender(client), name=f"rtdiffusion-demo-send-{client.number}")
        try:
            await client.send_json(self.server.hello(role))
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
                    self._count_rejected(client, exc)
                    await client.send_json(exc.to_message())
        except (WebSocketDisconnect, RuntimeError):  # RuntimeError: receive after close
            pass
        finally:
            sender.cancel()
            self.remove(client)
            log.info("websocket %d (%s) disconnected (%d clients)", client.number, role, len(self.clients))

    async def _retire(self, old: Client) -> None:
        try:
            await old.send_json({"t": "replaced", "message": "a newer control page took over"})
            await old.ws.close(4000, "replaced by a newer control page")
        except Exception:
            pass
