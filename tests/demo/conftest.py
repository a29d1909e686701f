"""Fixtures for the demo tests: real `rtdiffusion demo` processes on loopback, with the real engine (random:tiny).

``demo`` is one server for the whole session (API, websocket and browser tests share it; each test sets the
controls it relies on and the ``api`` fixture resumes playback afterwards).
"""

from __future__ import annotations

from pathlib import Path

import pytest

for _mod in ("fastapi", "uvicorn", "websockets", "PIL"):
    pytest.importorskip(_mod, reason=f"the demo tests need {_mod}: pip install rtdiffusion[web,test]")

from demo_helpers import Api, DemoProcess  # noqa: E402


@pytest.fixture(scope="session")
def presets_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("presets") / "presets.json"


@pytest.fixture(scope="session")
def demo(presets_file):
    server = DemoProcess("--presets", str(presets_file))
    yield server
    code = server.stop()
    assert code in (0, 130) and "demo server stopped" in server.log(), \
        f"the demo server did not stop cleanly (exit {code}):\n{server.log()[-3000:]}"


# ControlNet / IP-Adapter: two tiny ControlNets (canny; tile at 0.5) and a tiny IP-Adapter on the tiny SD 1.5-style
# model (SD 2.x has no IP-Adapter); one server for test_demo_control*.py
CONTROL_ARGS = ("--model", "random:tiny-sd15", "--controlnet", "random:controlnet-tiny",
                "--controlnet", "random:controlnet-tiny:tile:0.5", "--ip-adapter", "random:ip-adapter-tiny")


@pytest.fixture(scope="session")
def control_demo(tmp_path_factory):
    from PIL import Image

    style = tmp_path_factory.mktemp("style") / "start-style.png"
    Image.new("RGB", (24, 16), (200, 40, 90)).save(style)
    server = DemoProcess(*CONTROL_ARGS, "--style-image", str(style))
    yield server
    server.stop()


@pytest.fixture
def api(demo):
    client = Api(demo.url, demo.ws_url)
    yield client
    client.post("/api/playback", {"paused": False, "frozen": False})


