"""The control page as a stage tool, in a real headless Chromium at 1280x900 (one browser for the module):
Hide panel keeps the output full-size, errors and transport controls stay on screen, presets round-trip every
control, MIDI notes (a simulated Web MIDI device) trigger presets and buttons, recording gives a playable
video to download, and input and output can be shown side by side. The badge's "slow" state has its own
server whose every frame takes 5 s."""

from __future__ import annotations

import io
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from browser_helpers import HAVE_CHROMIUM, SKIP_REASON, chromium, region_not_blank, until
from demo.server import t_index_for
from demo_helpers import HEIGHT, WIDTH, DemoProcess

pytestmark = [pytest.mark.browser, pytest.mark.skipif(not HAVE_CHROMIUM, reason=SKIP_REASON)]
pytest.importorskip("selenium.webdriver", reason="needs selenium: pip install rtdiffusion[test]")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

W, H = 1280, 900
BAR = ("conn", "message", "pause", "freeze", "record", "snapshot", "full", "midiLearn", "hide")
DEFAULTS = {"prompt_a": "", "prompt_b": "", "blend": 0.0, "method": "linear", "negative_prompt": "",
            "strength": 0.35, "steps": 1, "guidance_scale": 1.2, "delta": 1.0, "cfg": "none",
            "similar_filter": False, "similar_threshold": 0.98, "similar_max_skip": 10,
            "cache_enabled": False, "cache_maxframes": 1, "cache_interval": 1}


@pytest.fixture(scope="module")
def slow_demo_starting():
    """A server whose every frame takes 5 s, started in the background while the other tests run."""
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(DemoProcess, "--min-frame-ms", "5000")
        yield future
        future.result().stop()


@pytest.fixture(scope="module")
def page(demo, slow_demo_starting):
    with chromium(W, H, fake_midi=True) as d:
        d.get(f"{demo.url}/?source=pattern")
        until(d, lambda d: d.execute_script("return window.rtdApp && window.rtdApp.view.stats.shown") >= 3, 60,
              "3 output frames")
        yield d


@pytest.fixture
def fresh(page, api):
    """Every control back to its default, the panel shown, nothing learning."""
    reset(api)
    page.execute_script("document.body.classList.remove('panel-hidden'); window.rtdApp.midi.stopLearning();")
    yield page
    reset(api)


def reset(api):
    api.post("/api/prompt", {k: DEFAULTS[k] for k in ("prompt_a", "prompt_b", "blend", "method", "negative_prompt")})
    api.post("/api/steps", {"strength": 0.35, "steps": 1})
    api.post("/api/guidance", {"guidance_scale": 1.2, "delta": 1.0, "cfg": "none"})
    api.post("/api/filter", {"enabled": False, "threshold": 0.98, "max_skip": 10})
    api.post("/api/cache", {"enabled": False, "maxframes": 1, "interval": 1})
    api.post("/api/playback", {"paused": False, "frozen": False})


def rect(d, element_id):
    return d.execute_script("const r = document.getElementById(arguments[0]).getBoundingClientRect();"
                            "return {x: r.left, y: r.top, right: r.right, bottom: r.bottom, w: r.width, h: r.height,"
                            " vw: innerWidth, vh: innerHeight};", element_id)


def on_screen(d, element_id) -> bool:
    r = rect(d, element_id)
    return r["w"] > 0 and r["h"] > 0 and r["x"] >= 0 and r["y"] >= 0 and r["right"] <= r["vw"] and \
        r["bottom"] <= r["vh"]


def shown(d) -> int:
    return d.execute_script("return window.rtdApp.view.stats.shown")


def test_hide_panel_keeps_the_output_full_size_and_the_bar_on_screen(fresh):
    d = fresh
    assert d.execute_script("return innerHeight") <= H
    for element_id in BAR:
        assert on_screen(d, element_id), (element_id, rect(d, element_id))
    with_panel = rect(d, "out")
    d.find_element(By.ID, "hide").click()
    until(d, lambda d: rect(d, "out")["w"] >= rect(d, "out")["vw"] - 2, 30, "the output across the whole width")
    out, bar = rect(d, "out"), rect(d, "message")
    assert out["w"] > with_panel["w"] + 300 and out["bottom"] >= out["vh"] - 2 and out["y"] <= bar["bottom"] + 40
    for element_id in BAR:  # the transport stays reachable with the panel hidden
        assert on_screen(d, element_id), (element_id, rect(d, element_id))
    n = shown(d)
    until(d, lambda d: shown(d) >= n + 2, 60, "new frames after hiding the panel")
    side = min(out["w"], out["h"])  # the picture is letterboxed into the canvas: check its middle
    cx, cy = out["x"] + out["w"] / 2, out["y"] + out["h"] / 2
    region_not_blank(d.get_screenshot_as_png(), (cx - side / 3, cy - side / 3, cx + side / 3, cy + side / 3))
    d.find_element(By.ID, "out").click()
    ActionChains(d).send_keys("h").perform()
    until(d, lambda d: rect(d, "panel")["w"] > 100, 30, "the panel back after H")


def test_a_rejected_setting_is_shown_on_screen_and_short(fresh, api):
    d = fresh
    d.execute_script("document.getElementById('panel').scrollTop = 1e6;")  # scrolled far from the top
    d.execute_script("const el = document.getElementById('promptA'); el.value = 'z'.repeat(5000);"
                     "el.dispatchEvent(new Event('change'));")
    until(d, lambda d: "prompt_a" in d.find_element(By.ID, "message").text, 30, "the error in the bar")
    text = d.find_element(By.ID, "message").text
    assert "at most 2000 characters" in text and len(text) < 300 and "z" * 80 not in text
    assert on_screen(d, "message")
    assert api.status()["controls"]["prompt_a"] == ""  # nothing changed


PRESET = {"prompt_a": "glass city", "prompt_b": "moss", "blend": 0.3, "method": "slerp", "negative_prompt": "text",
          "seed": 4321, "strength": 0.6, "steps": 2, "guidance_scale": 2.5, "delta": 0.5, "cfg": "self",
          "similar_filter": True, "similar_threshold": 0.95, "similar_max_skip": 7, "cache_enabled": True,
          "cache_maxframes": 2, "cache_interval": 3}
FIELDS = {"prompt_a": "promptA", "prompt_b": "promptB", "blend": "blend", "method": "method",
          "negative_prompt": "negative", "seed": "seed", "strength": "strength", "steps": "steps",
          "guidance_scale": "guidance", "delta": "delta", "cfg": "cfg", "similar_filter": "filter",
          "similar_threshold": "threshold", "similar_max_skip": "maxSkip", "cache_enabled": "cache",
          "cache_maxframes": "cacheFrames", "cache_interval": "cacheInterval"}


def page_values(d) -> dict:
    return d.execute_script("""
        const out = {};
        for (const [k, id] of Object.entries(arguments[0])) {
          const el = document.getElementById(id);
          out[k] = el.type === "checkbox" ? el.checked : el.value;
        }
        return out;""", FIELDS)


def as_page(values: dict) -> dict:
    return {k: v if isinstance(v, bool) else str(v) for k, v in values.items()}


def test_the_badge_says_stalled_when_no_output_comes_and_the_engine_is_idle(fresh):
    d = fresh
    until(d, lambda d: "live" in d.find_element(By.ID, "conn").text, 30, "live")
    d.execute_script("document.getElementById('send').width = 32;")  # every frame now has the wrong size
    until(d, lambda d: "stalled" in d.find_element(By.ID, "conn").get_attribute("class"), 60, "the stalled badge")
    assert "no output for" in d.find_element(By.ID, "conn").text
    assert "frames must be 64x64" in d.find_element(By.ID, "message").text and on_screen(d, "message")
    d.execute_script("document.getElementById('send').width = 64;")
    until(d, lambda d: "live" in d.find_element(By.ID, "conn").text, 60, "live again")


def test_a_preset_round_trips_every_control(fresh, api):
    d = fresh
    # set every control in the page as a user does (each field's own input/change event sends it)
    d.execute_script("""
        for (const [k, id] of Object.entries(arguments[0])) {
          const el = document.getElementById(id), v = arguments[1][k];
          if (el.type === "checkbox") el.checked = v; else el.value = v;
          el.dispatchEvent(new Event(el.type === "range" ? "input" : "change"));
        }""", FIELDS, PRESET)
    want = {k: v for k, v in PRESET.items()}
    until(d, lambda d: {k: api.status()["controls"][k] for k in PRESET} == want, 30, "the server has every control")
    until(d, lambda d: page_values(d) == as_page(PRESET), 30, "the page showing every control (after any sync)")
    d.execute_script("document.getElementById('out').click();")
    ActionChains(d).key_down(Keys.SHIFT).click(d.find_element(By.ID, "preset9")).key_up(Keys.SHIFT).perform()
    until(d, lambda d: api.get("/api/presets").json()["presets"][8] == PRESET, 30, "preset 9 with every control")
    reset(api)
    api.post("/api/seed", {"seed": 1})
    until(d, lambda d: page_values(d)["prompt_a"] == "" and page_values(d)["seed"] == "1", 30, "the page reset")
    d.find_element(By.ID, "preset9").click()
    until(d, lambda d: {k: api.status()["controls"][k] for k in PRESET} == want, 30, "preset 9 applied")
    until(d, lambda d: page_values(d) == as_page(PRESET), 30, "every field of the page showing preset 9")
    c = api.status()["controls"]
    assert c["t_index_list"] == t_index_for(0.6, 2, 50)
    # the engine itself took every setting (the page streams, so it applies them at the next frame)
    until(d, lambda d: api.status()["engine"]["seed"] == [[4321, 1.0]], 30, "the engine's seed")
    e = api.status()["engine"]
    assert e["prompt"] == [["glass city", 0.7], ["moss", 0.3]] and e["prompt_method"] == "slerp"
    assert e["seed"] == [[4321, 1.0]] and e["t_index_list"] == c["t_index_list"]
    assert (e["guidance_scale"], e["delta"], e["cfg"], e["negative_prompt"]) == (2.5, 0.5, "self", "text")
    assert e["similar_filter"] == {"enabled": True, "threshold": 0.95, "max_skip": 7}
    assert (e["cache"]["enabled"], e["cache"]["maxframes"], e["cache"]["interval"]) == (True, 2, 3)


def learn(d, element_id, midi_bytes):
    d.find_element(By.ID, "midiLearn").click()
    until(d, lambda d: d.execute_script("return window.fakeMidi.connected && window.rtdApp.midi.learning"), 30,
          "MIDI learn with the (simulated) device connected")
    d.find_element(By.ID, element_id).click()  # while learning, a click picks the button, it does not press it
    d.execute_script("window.fakeMidi.send(arguments[0]);", midi_bytes)
    until(d, lambda d: not d.execute_script("return window.rtdApp.midi.learning"), 30, f"{element_id} learned")


def test_midi_notes_trigger_presets_and_buttons(fresh, api):
    d = fresh
    assert api.put("/api/presets/8", {"prompt_a": "midi preset", "guidance_scale": 3.0}).status == 200
    learn(d, "preset8", [0x90, 60, 100])  # note 60 (middle C), channel 1
    assert "note 60" in d.find_element(By.ID, "message").text
    assert api.status()["controls"]["prompt_a"] == ""  # learning did not load the preset
    learn(d, "pause", [0x99, 36, 90])  # a drum pad: note 36 on channel 10
    assert api.status()["controls"]["paused"] is False  # learning did not press Pause
    d.execute_script("window.fakeMidi.send([0x90, 60, 0]);")  # a note-off (velocity 0) does nothing
    d.execute_script("window.fakeMidi.send([0x90, 60, 127]);")
    until(d, lambda d: api.status()["controls"]["prompt_a"] == "midi preset", 30, "the note loading preset 8")
    assert api.status()["controls"]["guidance_scale"] == 3.0
    d.execute_script("window.fakeMidi.send([0x99, 36, 90]);")
    until(d, lambda d: api.status()["controls"]["paused"] is True, 30, "the pad pausing")
    d.execute_script("window.fakeMidi.send([0x99, 36, 90]);")
    until(d, lambda d: api.status()["controls"]["paused"] is False, 30, "the pad resuming")
    # knobs still go to sliders: CC 21 learned on Delta, then turned to full scale (2.0)
    d.find_element(By.ID, "midiLearn").click()
    d.execute_script("document.getElementById('delta').focus(); window.fakeMidi.send([0xB0, 21, 10]);")
    until(d, lambda d: not d.execute_script("return window.rtdApp.midi.learning"), 30, "CC 21 learned")
    d.execute_script("window.fakeMidi.send([0xB0, 21, 127]);")
    until(d, lambda d: api.status()["controls"]["delta"] == 2.0, 30, "the knob moving Delta")


def test_record_the_output_and_download_it(fresh, api):
    import av

    d = fresh
    before = api.status()["record"]["last"]  # another test may have recorded on this server: its link shows
    d.find_element(By.ID, "record").click()
    until(d, lambda d: api.status()["record"]["recording"], 30, "recording on the server")
    until(d, lambda d: re.search(r"\((\d+)\)", d.find_element(By.ID, "record").text) and
          int(re.search(r"\((\d+)\)", d.find_element(By.ID, "record").text).group(1)) >= 6, 60,
          "6 frames recorded")
    d.find_element(By.ID, "record").click()
    until(d, lambda d: not api.status()["record"]["recording"] and api.status()["record"]["last"] != before, 60,
          "the recording stopped on the server")
    name = api.status()["record"]["last"]["file"]
    link = until(d, lambda d: d.find_element(By.ID, "recording").is_displayed() and
                 d.find_element(By.ID, "recording").get_attribute("href").endswith(name) and
                 d.find_element(By.ID, "recording"), 60, f"the download link to {name}")
    assert on_screen(d, "recording") and "Download rtdiffusion-" in link.text
    href = link.get_attribute("href")
    assert link.get_attribute("download").endswith(".mp4")
    r = api.get(href[href.index("/api/"):])
    assert r.status == 200 and "attachment" in r.headers["content-disposition"]
    with av.open(io.BytesIO(r.body)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    last = api.status()["record"]["last"]
    assert len(frames) == last["frames"] >= 6 and frames[0].shape == (HEIGHT, WIDTH, 3)
    assert frames[-1].std() > 1.0  # a picture, not a blank
    assert api.get("/api/recordings/..%2Fpresets.json").status == 404


def test_input_beside_output(fresh):
    d = fresh
    assert not d.find_element(By.ID, "inView").is_displayed()
    d.find_element(By.ID, "compare").click()
    until(d, lambda d: d.find_element(By.ID, "inView").is_displayed(), 30, "the input view")
    n = shown(d)
    until(d, lambda d: shown(d) >= n + 3, 60, "outputs with the input beside them")
    i, o = rect(d, "inView"), rect(d, "out")
    assert i["right"] <= o["x"] + 1 and abs(i["w"] - o["w"]) < 4 and i["h"] > 100  # side by side, same size
    png = d.get_screenshot_as_png()
    for r in (i, o):
        side = min(r["w"], r["h"])
        cx, cy = r["x"] + r["w"] / 2, r["y"] + r["h"] / 2
        region_not_blank(png, (cx - side / 3, cy - side / 3, cx + side / 3, cy + side / 3))
    d.find_element(By.ID, "compare").click()
    until(d, lambda d: not d.find_element(By.ID, "inView").is_displayed(), 30, "the input view hidden again")


def test_rates_and_the_frame_time_graph(fresh):
    d = fresh
    rates = until(d, lambda d: re.fullmatch(r"in \d+/s · out [\d.]+/s · skipped \d+/s",
                                            d.find_element(By.ID, "rates").text), 30, "the rates line")
    assert float(re.search(r"out ([\d.]+)/s", rates.group(0)).group(1)) > 0
    bars = ("const c = document.getElementById('graph'), px = c.getContext('2d').getImageData(0, 0, c.width,"
            " c.height).data; let n = 0; for (let i = 0; i < px.length; i += 4) if (px[i + 1] > 100 && px[i] < 120)"
            " n++; return n;")  # the green bars of the outputs shown in the last 5 s
    until(d, lambda d: d.execute_script(bars) > 20, 30, "bars in the frame-time graph")
    assert on_screen(d, "graph") and "skipped" in d.find_element(By.ID, "overlay").text


def test_the_badge_says_slow_while_the_engine_is_on_a_long_frame_then_live(page, slow_demo_starting):
    d = page
    slow_demo = slow_demo_starting.result()
    d.execute_script("window.open(arguments[0], 'slow');", f"{slow_demo.url}/?source=pattern")
    main = d.current_window_handle
    d.switch_to.window([h for h in d.window_handles if h != main][0])
    try:
        until(d, lambda d: d.execute_script("return window.rtdApp && window.rtdApp.view.stats.shown") >= 1, 90,
              "the first (5 s) frame")
        until(d, lambda d: "live" in d.find_element(By.ID, "conn").text, 30, "live after the first frame")
        states = d.execute_script("return window.rtdApp.badgeLog")  # every change of state, from page load
        slow = [s for s in states if s.startswith("slow:")]
        assert slow and "on the first frame" in slow[0], states
        assert not any(s.startswith("live") for s in states[:states.index(slow[0])]), states
    finally:
        d.close()
        d.switch_to.window(main)
