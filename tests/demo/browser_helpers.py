"""Headless Debian chromium for the web-app tests (Selenium + chromium-driver), a fake camera, and a simulated
Web MIDI device injected before the page's own scripts run."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from contextlib import contextmanager

import numpy as np
from PIL import Image

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
HAVE_CHROMIUM = os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)
SKIP_REASON = (f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
               "apt-get install chromium chromium-driver")

# One MIDI input whose messages the test sends with window.fakeMidi.send([status, data1, data2]).
FAKE_MIDI = """
(() => {
  const input = { id: "fake-pad", name: "test pad", manufacturer: "rtdiffusion tests", onmidimessage: null };
  const access = { inputs: new Map([[input.id, input]]), outputs: new Map(), onstatechange: null, sysexEnabled: false };
  Object.defineProperty(navigator, "requestMIDIAccess", { configurable: true, value: () => Promise.resolve(access) });
  window.fakeMidi = {
    get connected() { return typeof input.onmidimessage === "function"; },
    send(bytes) { input.onmidimessage({ data: Uint8Array.from(bytes), timeStamp: performance.now() }); },
  };
})();
"""


@contextmanager
def chromium(width: int, height: int, fake_midi: bool = False):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="rtd-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
                "--disable-backgrounding-occluded-windows", "--autoplay-policy=no-user-gesture-required",
                f"--window-size={width},{height}", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": profile})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    try:
        if fake_midi:
            driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": FAKE_MIDI})
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def until(driver, predicate, timeout: float = 60.0, what: str = "condition"):
    """WebDriverWait on ``predicate(driver)``; the message names what was awaited."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: predicate(d),
                                                                     message=f"waiting for {what}")


def region_not_blank(png: bytes, box) -> None:
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
    x0, y0, x1, y1 = (int(v) for v in box)
    img = img[y0:y1, x0:x1]
    assert img.size, f"empty region {box}"
    assert img.std() > 8.0, f"the region {box} looks blank (std {img.std():.1f})"
    assert len(np.unique(img.reshape(-1, 3).astype(np.uint8), axis=0)) > 50, f"too few colours in {box}"
