"""The web app's HTTP routes (see server.py for the list), its error answers, and the guard in front of it.

Control routes are plain ``def`` handlers, so FastAPI runs them on its thread pool, never on the event loop.
A validation error is answered 422 ``{"error": "<field>: <what was expected> (got <at most 60 characters>)"}``:
an error never echoes a whole rejected value.
"""

from __future__ import annotations

import io
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from .building import build_status
from .conditioning import ControlNetBody, IpAdapterBody
from .controls import (CacheBody, FilterBody, GuidanceBody, HttpError, PlaybackBody, PresetBody, PromptBody,
                       RecordBody, SeedBody, StepsBody)
from .guard import Guard, short

if TYPE_CHECKING:
    from .server import DemoServer


def validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        got = f" (got {short(err['input'])})" if "input" in err and not isinstance(err["input"], dict) else ""
        parts.append(f"{loc[:80]}: {err.get('msg')}{got}")
    more = len(exc.errors()) - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def build_app(server: "DemoServer") -> FastAPI:
    static_dir = server.static_dir

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await server.startup()
        try:
            yield
        finally:
            await server.shutdown()

    app = FastAPI(title="rtdiffusion demo", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, policy=server.policy)

    @app.exception_handler(HttpError)
    async def _http_error(request: Request, exc: HttpError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": validation_message(exc)}, status_code=422)

    app.mount("/static", StaticFiles(directory=static_dir), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(static_dir / "index.html")

    @app.get("/output", include_in_schema=False)
    def output() -> FileResponse:
        return FileResponse(static_dir / "output.html")

    @app.get("/api/build")
    def get_build() -> dict[str, Any]:  # the build page (building.py) reloads into the app on "building": false
        return {"building": False, "build": build_status(server.engine)}

    @app.get("/api/status")
    def get_status() -> dict[str, Any]:
        return server.status()

    @app.post("/api/prompt")
    def post_prompt(body: PromptBody) -> dict[str, Any]:
        return server.set_prompt(body)

    @app.post("/api/seed")
    def post_seed(body: SeedBody) -> dict[str, Any]:
        return server.set_seed(body)

    @app.post("/api/steps")
    def post_steps(body: StepsBody) -> dict[str, Any]:
        return server.set_steps(body)

    @app.post("/api/guidance")
    def post_guidance(body: GuidanceBody) -> dict[str, Any]:
        return server.set_guidance(body)

    @app.post("/api/filter")
    def post_filter(body: FilterBody) -> dict[str, Any]:
        return server.set_filter(body)

    @app.post("/api/cache")
    def post_cache(body: CacheBody) -> dict[str, Any]:
        return server.set_cache(body)

    @app.post("/api/playback")
    def post_playback(body: PlaybackBody) -> dict[str, Any]:
        return server.set_playback(body)

    @app.get("/api/snapshot.png")
    def snapshot() -> Response:
        latest = server.worker.latest if server.worker else None
        if latest is None:
            raise HttpError(404, "no output frame yet: start a source on the control page first")
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(latest.image, "RGB").save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png",
                        headers={"Content-Disposition": f'attachment; filename="rtdiffusion-{latest.seq}.png"'})

    @app.get("/api/presets")
    def get_presets() -> dict[str, Any]:
        return {"presets": server.presets.slots}

    @app.put("/api/presets/{slot}")
    def put_preset(slot: int, body: PresetBody) -> dict[str, Any]:
        return server.put_preset(slot, body)

    @app.post("/api/presets/{slot}/apply")
    def apply_preset(slot: int) -> dict[str, Any]:
        return server.apply_preset(slot)

    @app.get("/api/record")
    def get_record() -> dict[str, Any]:
        return server.recorder.status()

    @app.post("/api/record")
    def post_record(body: RecordBody) -> dict[str, Any]:
        return server.set_recording(body.recording)

    @app.get("/api/recordings/{name}")
    def get_recording(name: str) -> FileResponse:
        path = server.recorder.path_of(name)
        if path is None:
            raise HttpError(404, f"no recording named {short(name)}; names look like rtdiffusion-YYYYmmdd-HHMMSS.mp4")
        return FileResponse(path, media_type="video/mp4", filename=name)

    @app.post("/api/controlnet")
    def post_controlnet(body: ControlNetBody) -> dict[str, Any]:
        return server.set_controlnet(body)

    @app.post("/api/ip_adapter")
    def post_ip_adapter(body: IpAdapterBody) -> dict[str, Any]:
        return server.set_ip_adapter(body)

    @app.get("/api/style.png")
    def style_png() -> Response:
        thumb = server.conditioning.thumbnail
        if thumb is None:
            raise HttpError(404, "no style image yet: drop one on the control page's IP-Adapter section")
        return Response(thumb, media_type="image/png", headers={"Cache-Control": "no-store"})

    app.add_api_websocket_route("/ws", server.hub.serve)
    return app
