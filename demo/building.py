"""The page `rtdiffusion demo` serves while its engine is being built (before the web app exists).

The listening socket is bound first (a busy port fails before the model loads); while
``StreamEngine.from_pretrained`` runs, a small server on a duplicate of that socket answers every GET with a
page showing the build: the top bar with the badge "building", the stage, a progress bar and the estimate
of what is left, read from ``GET /api/build`` twice a second. When the engine is built this server stops
(requests wait in the socket's backlog meanwhile) and the web app takes the same socket; its own
``/api/build`` says ``"building": false``, and the page reloads into the app, whose top bar shows the rest
of the build (the first frame) the same way.

Threads: the server runs its own event loop on a thread ("demo-building"); the build's listener
(:meth:`BuildingPage.__call__`, called on the building thread) only replaces ``self.last``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any

log = logging.getLogger(__name__)

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rtdiffusion: building</title>
<link rel="stylesheet" href="/static/style.css"><link rel="icon" href="data:,"></head>
<body class="control building-page">
<header id="bar">
  <span class="brand">rtdiffusion</span>
  <span id="conn" class="badge building">building</span>
  <progress id="buildBar" max="1" value="0"></progress>
  <span id="build">loading the model</span>
</header>
<script src="/static/common.js"></script>
<script>
(() => {
  const log = window.rtdBuildLog = [];
  async function poll() {
    try {
      const r = await fetch("/api/build", { cache: "no-store" });
      const j = r.ok ? await r.json() : null;
      if (!j || j.building === false) { location.reload(); return; }  // the web app is up
      if (j.build) {
        const text = RTD.buildText(j.build);
        RTD.showBuild(document.getElementById("build"), document.getElementById("buildBar"), j.build, text);
        if (log[log.length - 1] !== text) log.push(text);
      }
    } catch (e) { /* between the two servers: try again */ }
    setTimeout(poll, 500);
  }
  poll();
})();
</script>
</body></html>
"""


def build_status(engine: Any) -> dict[str, Any] | None:
    """The engine's build (rtdiffusion.progress): its last stage event and whether it is over (the first frame
    is out); None for an engine built without one."""
    progress = getattr(engine, "build_progress", None)
    last = getattr(progress, "last", None)
    if last is None:
        return None
    return {**last.as_dict(), "done": bool(progress.done)}


class BuildingPage:
    """Serves :data:`PAGE`, ``/static/common.js`` and ``/static/style.css`` and ``/api/build`` on a duplicate
    of ``sock`` until :meth:`stop`. Subscribe the instance to the engine's BuildProgress."""

    def __init__(self, sock: socket.socket, static_dir) -> None:
        import uvicorn
        from fastapi import FastAPI
        from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

        self.last: dict[str, Any] | None = None
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

        @app.get("/api/build")
        def build() -> JSONResponse:
            return JSONResponse({"building": True, "build": self.last}, headers={"Cache-Control": "no-store"})

        @app.get("/static/{name}")
        def static(name: str):
            if name not in ("common.js", "style.css"):
                return JSONResponse({"error": "the web app is still being built"}, status_code=503)
            return FileResponse(static_dir / name)

        @app.get("/{path:path}")
        def page(path: str) -> HTMLResponse:
            return HTMLResponse(PAGE, headers={"Cache-Control": "no-store"})

        self._sock = sock.dup()  # the server closes its socket when it stops; the original stays listening
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self._thread = threading.Thread(target=self._run, name="demo-building", daemon=True)

    def __call__(self, event) -> None:  # a BuildProgress listener (the building thread)
        self.last = {**event.as_dict(), "done": False}

    def start(self) -> "BuildingPage":
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._server.serve(sockets=[self._sock]))
        except Exception:  # noqa: BLE001 - the page is a courtesy: the build goes on without it
            log.exception("the build page stopped")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10.0)
        self._sock.close()
