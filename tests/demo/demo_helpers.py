"""Helpers for the demo tests: a real `rtdiffusion demo` process and a scripted websocket page."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np

from websockets.sync.client import connect

from demo import protocol

WIDTH = HEIGHT = 64
ENGINE_ARGS = ["--model", "random:tiny", "--width", str(WIDTH), "--height", str(HEIGHT), "--device", "cpu",
               "--dtype", "float32", "--backend", "auto"]
SERVING = re.compile(r"serving http://127\.0\.0\.1:(\d+)/")


class DemoProcess:
    """`rtdiffusion demo` in a child process; the port is whatever --port 0 got, read from its log."""

    def __init__(self, *extra: str, startup_s: float = 120.0) -> None:
        cmd = [sys.executable, "-c", "import sys; from rtdiffusion.cli import main; sys.exit(main())", "demo",
               *ENGINE_ARGS, "--host", "127.0.0.1", "--port", "0", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self._port: int | None = None
        self._found = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._found.wait(startup_s) or self._port is None:
            self.stop()
            raise RuntimeError("rtdiffusion demo did not start:\n" + "".join(self.lines[-40:]))
        self.port = self._port
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"
        deadline = time.monotonic() + 30
        while True:
            try:
                if Api(self.url).get("/api/status").status in (200, 401):  # 401: up, and wants its token
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("rtdiffusion demo never answered /api/status:\n" + "".join(self.lines[-40:]))
            time.sleep(0.1)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            m = SERVING.search(line)
            if m and self._port is None:
                self._port = int(m.group(1))
                self._found.set()
        self._found.set()

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def log(self) -> str:
        return "".join(self.lines)


class Response:
    def __init__(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.status, self.body, self.headers = status, body, headers

    def json(self) -> Any:
        return json.loads(self.body)


class Api:
    """A small HTTP client on the standard library (urllib): real requests to the real server."""

    def __init__(self, base: str, ws_url: str | None = None) -> None:
        self.base = base
        self.ws_url = ws_url

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> Response:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return Response(r.status, r.read(), dict(r.headers))
        except urllib.error.HTTPError as e:
            return Response(e.code, e.read(), dict(e.headers))

    def get(self, path: str) -> Response:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None, raw: bytes | None = None) -> Response:
        return self.request("POST", path, body, raw)

    def put(self, path: str, body: Any) -> Response:
        return self.request("PUT", path, body)

    def status(self) -> dict[str, Any]:
        r = self.get("/api/status")
        assert r.status == 200, r.body
        return r.json()

    def engine(self) -> dict[str, Any]:
        """The engine's status once a frame has gone through (updates apply at the next frame boundary)."""
        frame_id = next(_ids)
        with WsClient(self.ws_url, "control") as page:
            page.send_frame(frame_id)
            while page.next_output()[0].frame_id != frame_id:
                pass
        return self.status()["engine"]


_ids = itertools.count(1_000_000)


def test_image(i: int = 0) -> np.ndarray:
    """A moving pattern, uint8 [H, W, 3]."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    img = np.stack([(x * 4 + i * 7) % 256, (y * 4 + i * 3) % 256, ((x + y) * 2 + i * 11) % 256], axis=2)
    return img.astype(np.uint8)


test_image.__test__ = False  # not a test


class WsClient:
    """A scripted page: a real websocket client speaking the demo protocol."""

    def __init__(self, ws_url: str, role: str, **kw) -> None:
        self._cm = connect(f"{ws_url}?role={role}", max_size=None, open_timeout=10, **kw)
        self.ws = self._cm.__enter__()
        self.hello = self.recv_json(lambda m: m["t"] == "hello")
        self.texts: list[dict] = []

    def close(self) -> None:
        self._cm.__exit__(None, None, None)

    def recv(self, timeout: float = 10.0):
        return self.ws.recv(timeout=timeout)

    def recv_json(self, want, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(max(0.01, deadline - time.monotonic()))
            if isinstance(msg, str):
                obj = json.loads(msg)
                if want(obj):
                    return obj

    def send_frame(self, frame_id: int, image: np.ndarray | None = None, fmt=protocol.Format.JPEG,
                   ts: float | None = None) -> float:
        ts = time.time() * 1000.0 if ts is None else ts
        self.ws.send(protocol.encode_input(test_image(frame_id) if image is None else image, fmt, frame_id, ts))
        return ts

    def next_output(self, timeout: float = 20.0, ack: bool = True) -> tuple[protocol.FrameHeader, bytes, float]:
        """The next output frame (texts seen on the way are kept in ``texts``); says 'shown' unless ack=False."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(max(0.01, deadline - time.monotonic()))
            if isinstance(msg, bytes):
                now = time.time() * 1000.0
                head = protocol.parse_header(msg)
                if ack:
                    self.ws.send(json.dumps({"t": "shown", "id": head.frame_id}))
                return head, msg, now
            self.texts.append(json.loads(msg))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
