"""The engine's build in the web app. In a real browser on a real `rtdiffusion demo` (random:tiny): until the
engine's first frame is out, the badge says "building" and the top bar shows the stage and a progress bar
(a page that sends no input keeps the build at its last stage, so nothing depends on timing); once frames
flow, the build line goes and the badge goes live. The page served while the model loads (building.py) is
checked over real HTTP on a real socket, which the web app then takes over."""

from __future__ import annotations

import json
import socket
import urllib.request

import pytest

from browser_helpers import HAVE_CHROMIUM, SKIP_REASON, chromium, until
from demo_helpers import DemoProcess


@pytest.mark.browser
@pytest.mark.skipif(not HAVE_CHROMIUM, reason=SKIP_REASON)
def test_badge_says_building_with_the_stage_until_the_first_frame():
    pytest.importorskip("selenium.webdriver", reason="needs selenium: pip install rtdiffusion[test]")
    from selenium.webdriver.common.by import By

    server = DemoProcess()
    try:
        build = json.loads(urllib.request.urlopen(f"{server.url}/api/build", timeout=30).read())
        assert build["building"] is False and build["build"]["done"] is False  # the app is up, no frame yet
        assert build["build"]["stage"] == "text encoders" and build["build"]["count"] == 3
        with chromium(1280, 900) as d:
            d.get(f"{server.url}/?source=none")  # no camera, no pattern: nothing is sent
            until(d, lambda d: d.find_element(By.ID, "conn").text == "building", 60, "the badge 'building'")
            line, bar = d.find_element(By.ID, "build"), d.find_element(By.ID, "buildBar")
            assert line.is_displayed() and bar.is_displayed()
            assert line.text.startswith("text encoders done (2/3) · ") and "left (" in line.text
            assert 0 < float(bar.get_attribute("value")) < 1
            d.execute_script("window.rtdApp.useSource('pattern')")
            until(d, lambda d: d.find_element(By.ID, "conn").text.startswith("live"), 120, "the badge 'live'")
            assert not line.is_displayed() and not bar.is_displayed()
            log = d.execute_script("return window.rtdApp.badgeLog")
            assert not any(x.startswith("live") for x in log[:[i for i, x in enumerate(log) if
                                                                x.startswith("building")][0]]), log
        done = json.loads(urllib.request.urlopen(f"{server.url}/api/build", timeout=30).read())["build"]
        assert done["done"] is True and done["state"] == "done" and done["fraction"] == 1.0
    finally:
        server.stop()


def test_the_page_served_while_loading_then_the_socket_goes_to_the_app(tmp_path):
    from demo.building import BuildingPage
    from demo.server import STATIC_DIR
    from rtdiffusion.progress import LOAD, TEXT, BuildProgress, plan_stages

    sock = socket.create_server(("127.0.0.1", 0))
    url = "http://127.0.0.1:%d" % sock.getsockname()[1]
    page = BuildingPage(sock, STATIC_DIR).start()
    try:
        progress = BuildProgress([page])
        progress.plan(plan_stages("eager", "cpu"), device_type="cpu")
        with progress.stage(LOAD):
            with urllib.request.urlopen(f"{url}/api/build", timeout=30) as r:
                got = json.loads(r.read())
        assert got["building"] is True and got["build"]["stage"] == LOAD and got["build"]["state"] == "start"
        with progress.stage(TEXT):
            pass
        got = json.loads(urllib.request.urlopen(f"{url}/api/build", timeout=30).read())
        assert (got["build"]["stage"], got["build"]["state"], got["build"]["index"]) == (TEXT, "finish", 2)
        html = urllib.request.urlopen(f"{url}/?token=x", timeout=30).read().decode()
        assert 'class="badge building"' in html and "/api/build" in html and "location.reload()" in html
        assert b"buildText" in urllib.request.urlopen(f"{url}/static/common.js", timeout=30).read()
    finally:
        page.stop()
    # the page's server is gone, the socket still listens: a connection waits in its backlog for the app
    client = socket.create_connection(sock.getsockname()[:2], timeout=30)
    conn, _ = sock.accept()
    conn.close()
    client.close()
    sock.close()
