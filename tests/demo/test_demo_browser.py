"""End to end in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium) with a fake
camera: frames come back, moving controls changes the engine's state, keys and MIDI learn work, the projector
page shows frames, and screenshots of both pages are not blank.

Set RTD_DEMO_SCREENSHOTS=<folder> to keep the screenshots."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser_helpers import HAVE_CHROMIUM, SKIP_REASON, chromium
from demo.server import t_index_for

pytestmark = [pytest.mark.browser, pytest.mark.skipif(not HAVE_CHROMIUM, reason=SKIP_REASON)]
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium: pip install rtdiffusion[test]")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402


@pytest.fixture
def browser():
    with chromium(1280, 720) as driver:
        yield driver


def wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def engine_becomes(api, key, want, timeout=15.0):
    """The page keeps streaming, so the engine applies changes within a frame or two."""
    return wait_for(lambda: api.status()["engine"][key] == want, timeout, f"engine {key} == {want!r}") and \
        api.status()["engine"]


def not_blank(png: bytes, box=None) -> np.ndarray:
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
    if box is not None:
        img = img[box[1]:box[3], box[0]:box[2]]
    assert img.std() > 8.0, f"the screenshot looks blank (std {img.std():.1f})"
    assert len(np.unique(img.reshape(-1, 3).astype(np.uint8), axis=0)) > 50, "too few colours for a live frame"
    return img


def keep(name: str, png: bytes) -> None:
    folder = os.environ.get("RTD_DEMO_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / name).write_bytes(png)


def test_live_page_with_fake_camera_controls_and_projector_page(browser, demo, api):
    d = browser
    api.post("/api/prompt", {"prompt_a": "", "prompt_b": "", "blend": 0.0})
    d.get(f"{demo.url}/?source=camera")
    shown = lambda: d.execute_script("return window.rtdApp && window.rtdApp.view.stats.shown")  # noqa: E731
    wait_for(lambda: shown() >= 5, 40, "5 output frames on the control page")
    assert d.find_element(By.ID, "message").text == "camera on"  # the fake camera, not the pattern fallback
    assert d.execute_script("return window.rtdApp.input.sent") >= 5

    # prompt A: type and press Enter
    prompt = d.find_element(By.ID, "promptA")
    prompt.clear()
    prompt.send_keys("neon jellyfish", Keys.ENTER)
    engine_becomes(api, "prompt", [["neon jellyfish", 1.0]])

    # seed: an emptied field sends nothing (not seed 0); then type a number and leave the field
    seed = d.find_element(By.ID, "seed")
    before = api.status()["engine"]["seed"]
    seed_posts = "return window.rtdApp.requests['/api/seed'] || 0"
    posts = d.execute_script(seed_posts)
    seed.clear()
    seed.send_keys(Keys.TAB)  # the change event runs (and would post) before send_keys returns
    assert d.execute_script(seed_posts) == posts
    assert api.status()["engine"]["seed"] == before
    seed.clear()  # the page may have shown the engine's seed again meanwhile
    seed.send_keys("1234", Keys.TAB)
    engine_becomes(api, "seed", [[1234, 1.0]])

    # strength slider moved with the keyboard (real input events), then 2 steps
    slider = d.find_element(By.ID, "strength")
    slider.click()
    slider.send_keys(*[Keys.ARROW_RIGHT] * 5)
    strength = float(slider.get_attribute("value"))
    assert strength != 0.35
    engine_becomes(api, "t_index_list", t_index_for(strength, 1, 50))
    from selenium.webdriver.support.ui import Select
    Select(d.find_element(By.ID, "steps")).select_by_visible_text("2")
    engine_becomes(api, "t_index_list", t_index_for(strength, 2, 50))

    # presets: Shift+4 stores the prompts and seed, 4 brings them back
    stage = d.find_element(By.ID, "out")
    stage.click()
    ActionChains(d).key_down(Keys.SHIFT).send_keys("4").key_up(Keys.SHIFT).perform()
    wait_for(lambda: (api.get("/api/presets").json()["presets"][3] or {}).get("prompt_a") == "neon jellyfish",
             10, "preset 4 stored")
    api.post("/api/prompt", {"prompt_a": "something else"})
    engine_becomes(api, "prompt", [["something else", 1.0]])
    stage.click()
    ActionChains(d).send_keys("4").perform()
    engine_becomes(api, "prompt", [["neon jellyfish", 1.0]])

    # MIDI learn on the guidance slider, with control-change messages fed to the page's MIDI handler
    d.execute_script("""
        const m = window.rtdApp.midi; m.startLearning();
        document.getElementById('guidance').focus();
        m.handle([0xB0, 7, 64]);      // learn: CC 7 on channel 1 -> guidance
        m.handle([0xB0, 7, 127]);     // full scale: 5.0
    """)
    engine_becomes(api, "guidance_scale", 5.0)

    # the performance overlay
    overlay = wait_for(lambda: "fps" in d.find_element(By.ID, "overlay").text and
                       d.find_element(By.ID, "overlay").text, 10, "overlay text")
    assert "latency" in overlay and "eager" in overlay and "skipped" in overlay

    control_png = d.get_screenshot_as_png()
    keep("control.png", control_png)
    rect = stage.rect
    not_blank(control_png, (int(rect["x"]), int(rect["y"]), int(rect["x"] + rect["width"]),
                            int(rect["y"] + rect["height"])))

    # the projector page in a second window, while the control page keeps streaming
    control = d.current_window_handle
    d.switch_to.new_window("window")
    d.set_window_size(1280, 720)
    d.get(f"{demo.url}/output")
    wait_for(lambda: d.execute_script("return window.rtdOutput && window.rtdOutput.view.stats.shown") >= 3, 30,
             "3 frames on the output page")
    assert d.find_elements(By.ID, "promptA") == []
    out_png = d.get_screenshot_as_png()
    keep("output.png", out_png)
    w, h = Image.open(io.BytesIO(out_png)).size
    not_blank(out_png, (w // 2 - h // 3, h // 6, w // 2 + h // 3, 5 * h // 6))  # the middle of the picture
    assert api.status()["server"]["clients"] >= 2
    d.switch_to.window(control)
    assert d.execute_script("return window.rtdApp.view.stats.shown") > 5
    api.post("/api/guidance", {"guidance_scale": 1.2})
