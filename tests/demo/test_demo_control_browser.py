"""The ControlNet panel and the IP-Adapter section in the real page (headless Chromium at 1280x900, the server of
test_demo_control.py): one row per ControlNet beside a full-size output, sliders and toggles (and a MIDI-learned
knob) reach the engine, the engine's own state is shown, a style image chosen through the file input reaches
the engine (thumbnail and an encode), a corrupt one dropped on the drop zone is refused on screen, and presets
stored from the page carry the conditioning settings."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from browser_helpers import HAVE_CHROMIUM, SKIP_REASON, chromium, until
from demo_helpers import Api

pytestmark = [pytest.mark.browser, pytest.mark.skipif(not HAVE_CHROMIUM, reason=SKIP_REASON)]
pytest.importorskip("selenium.webdriver", reason="needs selenium: pip install rtdiffusion[test]")
from selenium.webdriver.common.by import By  # noqa: E402

W, H = 1280, 900


@pytest.fixture(scope="module")
def page(control_demo):
    with chromium(W, H, fake_midi=True) as d:
        d.get(f"{control_demo.url}/?source=pattern")
        until(d, lambda d: d.execute_script("return window.rtdApp && window.rtdApp.view.stats.shown") >= 2, 90,
              "2 output frames")
        yield d


def engine(server) -> dict:
    return Api(server.url).status()["engine"]


def rect(d, selector):
    return d.execute_script("const r = document.querySelector(arguments[0]).getBoundingClientRect();"
                            "return {x: r.left, y: r.top, right: r.right, bottom: r.bottom, w: r.width, h: r.height,"
                            " vw: innerWidth, vh: innerHeight};", selector)


def slide(d, element_id, value):
    d.execute_script("const el = document.getElementById(arguments[0]); el.value = arguments[1];"
                     "el.dispatchEvent(new Event('input'));", element_id, value)


def test_the_panel_has_one_row_per_controlnet_beside_a_full_size_output(page, control_demo):
    d = page
    rows = d.find_elements(By.CSS_SELECTOR, "#controlnets .cn")
    assert len(rows) == 2 and d.find_element(By.ID, "cnSection").is_displayed()
    assert [r.find_element(By.CSS_SELECTOR, ".cn-pre").text for r in rows] == ["canny", "tile"]
    assert all(r.find_element(By.CSS_SELECTOR, ".cn-name").text == "random:controlnet-tiny" for r in rows)
    assert d.find_element(By.ID, "ipSection").is_displayed()
    assert d.find_element(By.ID, "cnScale1").get_attribute("value") == "0.5"
    style = Api(control_demo.url).status()["conditioning"]["style"]  # --style-image at start, or a later upload
    assert f"{style['name']} · {style['width']}×{style['height']}" in d.find_element(By.ID, "styleText").text
    out = rect(d, "#out")
    assert out["w"] > 600 and out["h"] > 600 and out["right"] <= out["vw"]  # the output keeps its room
    for selector in ("#cn1", "#styleDrop"):  # reachable in the panel, inside the window
        d.execute_script("document.querySelector(arguments[0]).scrollIntoView({block: 'nearest'})", selector)
        r = rect(d, selector)
        assert r["x"] >= 0 and r["right"] <= 330 and r["y"] >= 0 and r["bottom"] <= r["vh"] + 1, (selector, r)
    # the engine's own state under each control
    until(d, lambda d: "engine: on · scale 0.50" in d.find_element(By.ID, "cnState1").text, 30, "ControlNet 1 state")
    until(d, lambda d: "tokens" in d.find_element(By.ID, "ipState").text, 30, "the IP-Adapter state")


def test_sliders_toggles_and_a_midi_knob_reach_the_engine(page, control_demo):
    d = page
    slide(d, "cnScale1", 0.2)
    d.find_element(By.ID, "cnOn0").click()
    slide(d, "ipScale", 1.3)
    until(d, lambda d: math.isclose(engine(control_demo)["controlnets"][1]["scale"], 0.2) and
          engine(control_demo)["controlnets"][0]["enabled"] is False and
          math.isclose(engine(control_demo)["ip_adapter"]["scale"], 1.3), 60, "the settings in the engine")
    until(d, lambda d: "engine: off" in d.find_element(By.ID, "cnState0").text, 30, "ControlNet 0 shown off")
    # MIDI learn works for the rows built after the page loaded: CC 21 -> ControlNet 0's end slider
    d.find_element(By.ID, "midiLearn").click()
    until(d, lambda d: d.execute_script("return window.fakeMidi.connected"), 30, "the simulated MIDI input")
    d.execute_script("document.getElementById('cnEnd0').dispatchEvent(new PointerEvent('pointerdown', {bubbles: true}))")
    d.execute_script("window.fakeMidi.send([0xB0, 21, 127])")  # learn
    d.execute_script("window.fakeMidi.send([0xB0, 21, 0])")  # end -> 0.0 ... then start must stay <= end
    until(d, lambda d: engine(control_demo)["controlnets"][0]["end"] == 0.0, 60, "the knob in the engine")
    d.execute_script("window.fakeMidi.send([0xB0, 21, 127])")
    # ... and a pad (note 40) learned for ControlNet 0's toggle turns it back on
    d.find_element(By.ID, "midiLearn").click()
    d.find_element(By.ID, "cnOn0").click()  # while learning, a click picks the toggle without flipping it
    assert d.find_element(By.ID, "cnOn0").is_selected() is False
    d.execute_script("window.fakeMidi.send([0x90, 40, 100])")  # learn
    d.execute_script("window.fakeMidi.send([0x90, 40, 100])")  # press
    slide(d, "cnScale1", 0.5)
    slide(d, "ipScale", 0.6)
    until(d, lambda d: (lambda u: u["enabled"] and u["end"] == 1.0)(engine(control_demo)["controlnets"][0]), 60,
          "ControlNet 0 back on, end 1.0")


def png_file(tmp_path, seed=1, size=(48, 32)) -> str:
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path = tmp_path / f"style-{seed}.png"
    Image.fromarray(rgb).save(path)
    return str(path)


def test_a_style_image_from_the_file_input_reaches_the_engine_and_a_corrupt_drop_is_refused(page, control_demo,
                                                                                            tmp_path):
    d = page
    encodes = engine(control_demo)["ip_adapter"]["encodes"]
    d.find_element(By.ID, "styleFile").send_keys(png_file(tmp_path))
    until(d, lambda d: engine(control_demo)["ip_adapter"]["encodes"] == encodes + 1, 60, "an encode in the engine")
    until(d, lambda d: d.execute_script("const i = document.getElementById('styleThumb');"
                                        "return !i.hidden && i.complete && i.naturalWidth") == 48, 30, "the thumbnail")
    assert "style-1.png · 48×32" in d.find_element(By.ID, "styleText").text
    assert "style image set" in d.find_element(By.ID, "message").text
    # a corrupt "PNG" dropped on the drop zone: refused on screen, the engine keeps its style
    d.execute_script("""
        const dt = new DataTransfer();
        dt.items.add(new File([new Uint8Array([137, 80, 78, 71, 13, 10, 26, 10, 1, 2, 3])], "broken.png", {type: "image/png"}));
        document.getElementById('styleDrop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));""")
    until(d, lambda d: "style image refused" in d.find_element(By.ID, "message").text, 30, "the refusal on screen")
    assert "broken.png could not be read as a PNG or JPEG file" in d.find_element(By.ID, "message").get_attribute("title")
    assert engine(control_demo)["ip_adapter"]["encodes"] == encodes + 1
    assert "style-1.png · 48×32" in d.find_element(By.ID, "styleText").text  # the previous style is still shown


def test_a_preset_stored_from_the_page_carries_the_conditioning(page, control_demo):
    d = page
    slide(d, "ipScale", 0.6)
    slide(d, "cnScale0", 0.7)
    until(d, lambda d: math.isclose(engine(control_demo)["controlnets"][0]["scale"], 0.7), 60, "scale 0.7")
    d.execute_script("document.getElementById('preset8').dispatchEvent(new MouseEvent('click', {shiftKey: true, bubbles: true}))")
    until(d, lambda d: (Api(control_demo.url).get("/api/presets").json()["presets"][7] or {}).get("controlnets"), 30,
          "preset 8 stored")
    stored = Api(control_demo.url).get("/api/presets").json()["presets"][7]
    assert [u["scale"] for u in stored["controlnets"]] == [0.7, 0.5] and stored["ip_adapter_scale"] == 0.6
    slide(d, "cnScale0", 1.0)
    until(d, lambda d: math.isclose(engine(control_demo)["controlnets"][0]["scale"], 1.0), 60, "scale 1.0")
    d.find_element(By.ID, "preset8").click()
    until(d, lambda d: math.isclose(engine(control_demo)["controlnets"][0]["scale"], 0.7), 60, "the preset applied")
    until(d, lambda d: d.find_element(By.ID, "cnScale0").get_attribute("value") == "0.7", 30, "the slider follows")
    slide(d, "cnScale0", 1.0)
