"""Every control route against a real `rtdiffusion demo` process with the real engine (random:tiny).

Each accepted change must show in the engine's own status; each rejected one must name what was expected and
leave both the server's controls and the engine unchanged.
"""

from __future__ import annotations

import io
import json
import time

import pytest
from PIL import Image

from demo.server import t_index_for
from demo_helpers import HEIGHT, WIDTH, WsClient


def ok(r):
    assert r.status == 200, r.body
    return r.json()


def rejected(r, status, *words):
    assert r.status == status, (r.status, r.body)
    msg = r.json()["error"]
    for w in words:
        assert w in msg, msg
    return msg


def test_pages_and_static_files_are_served(api):
    index = api.get("/")
    assert index.status == 200 and b'id="promptA"' in index.body and b"/static/app.js" in index.body
    out = api.get("/output")
    assert out.status == 200 and b"/static/output.js" in out.body and b'id="promptA"' not in out.body
    for name in ("common.js", "app.js", "output.js", "style.css"):
        assert api.get(f"/static/{name}").status == 200
    for page in (index.body, out.body):  # nothing loaded from outside loopback
        assert b"https://" not in page and b"http://" not in page


def test_status_reports_engine_server_and_controls(api):
    s = api.status()
    assert s["engine"]["backend"] == "eager" and s["engine"]["width"] == WIDTH
    assert s["server"]["width"] == WIDTH and s["server"]["height"] == HEIGHT
    assert set(s["controls"]) >= {"prompt_a", "prompt_b", "blend", "seed", "strength", "steps", "t_index_list",
                                  "guidance_scale", "delta", "cfg", "similar_filter", "cache_enabled", "paused"}


def test_prompt_a_b_crossfade_and_negative(api):
    c = ok(api.post("/api/prompt", {"prompt_a": "a cat", "prompt_b": "a dog", "blend": 0.25, "method": "slerp",
                                    "negative_prompt": "blurry"}))
    assert (c["prompt_a"], c["prompt_b"], c["blend"], c["method"]) == ("a cat", "a dog", 0.25, "slerp")
    e = api.engine()
    assert e["prompt"] == [["a cat", 0.75], ["a dog", 0.25]]
    assert e["prompt_method"] == "slerp" and e["negative_prompt"] == "blurry"
    ok(api.post("/api/prompt", {"blend": 0}))  # partial update: only the slider moved
    assert api.engine()["prompt"] == [["a cat", 1.0]]
    ok(api.post("/api/prompt", {"blend": 1.0}))
    assert api.engine()["prompt"] == [["a dog", 1.0]]


@pytest.mark.parametrize("body, words", [
    ({"blend": 2}, ["blend", "less than or equal to 1"]),
    ({"blend": -0.1}, ["blend", "greater than or equal to 0"]),
    ({"method": "cubic"}, ["method", "'linear' or 'slerp'"]),
    ({"prompt_a": 5}, ["prompt_a", "valid string"]),
    ({"prompt_a": "x" * 2001}, ["prompt_a", "at most 2000"]),
    ({"colour": "red"}, ["colour", "Extra inputs are not permitted"]),
], ids=["blend_high", "blend_low", "method", "type", "too_long", "unknown_field"])
def test_prompt_rejects_bad_values_and_changes_nothing(api, body, words):
    ok(api.post("/api/prompt", {"prompt_a": "keep me", "prompt_b": "", "blend": 0.0}))
    before = api.status()["controls"]
    rejected(api.post("/api/prompt", body), 422, *words)
    assert api.status()["controls"] == before
    assert api.engine()["prompt"] == [["keep me", 1.0]]


def test_malformed_json_body_is_rejected(api):
    rejected(api.post("/api/prompt", raw=b"{not json"), 422, "JSON")


def test_seed_explicit_and_random(api):
    assert ok(api.post("/api/seed", {"seed": 42}))["seed"] == 42
    assert api.engine()["seed"] == [[42, 1.0]]
    seeds = {ok(api.post("/api/seed", {"random": True}))["seed"] for _ in range(3)}
    assert len(seeds) >= 2 and 42 not in seeds
    assert api.engine()["seed"][0][0] in seeds


@pytest.mark.parametrize("body, words", [
    ({"seed": -1}, ["seed", "greater than or equal to 0"]),
    ({"seed": 2**63}, ["seed", "less than or equal to"]),
    ({"seed": "abc"}, ["seed", "valid integer"]),
    ({"seed": 1.5}, ["seed", "valid integer"]),
    ({"seed": 3, "random": True}, ["either 'seed'"]),
    ({}, ["either 'seed'"]),
], ids=["negative", "too_big", "string", "float", "both", "neither"])
def test_seed_rejects(api, body, words):
    ok(api.post("/api/seed", {"seed": 7}))
    rejected(api.post("/api/seed", body), 422, *words)
    assert api.engine()["seed"] == [[7, 1.0]]


def test_steps_from_strength_and_count(api):
    c = ok(api.post("/api/steps", {"strength": 0.5, "steps": 3}))
    assert c["t_index_list"] == t_index_for(0.5, 3, 50)
    assert api.engine()["t_index_list"] == c["t_index_list"]
    c = ok(api.post("/api/steps", {"strength": 0.35}))  # steps kept
    assert c["steps"] == 3 and api.engine()["t_index_list"] == t_index_for(0.35, 3, 50)
    c = ok(api.post("/api/steps", {"t_index_list": [10, 40]}))
    assert c["steps"] == 2 and api.engine()["t_index_list"] == [10, 40]
    ok(api.post("/api/steps", {"strength": 0.35, "steps": 1}))


def test_concurrent_strength_and_steps_updates_are_both_kept(api):
    # one client moves only strength while another moves only steps, released together each round: each request
    # must keep the other's value as committed, so both updates hold (a stale read outside the lock lost one)
    import threading

    ok(api.post("/api/steps", {"strength": 0.5, "steps": 1}))
    barrier = threading.Barrier(2)
    errors: list[object] = []
    rounds = [(round(0.2 + 0.01 * i, 2), 1 + i % 4) for i in range(30)]

    def send(body):
        try:
            barrier.wait(10)
            ok(api.post("/api/steps", body))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    for strength, steps in rounds:
        threads = [threading.Thread(target=send, args=({"strength": strength},)),
                   threading.Thread(target=send, args=({"steps": steps},))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        c = api.status()["controls"]
        assert (c["strength"], c["steps"]) == (strength, steps), c
        assert c["t_index_list"] == t_index_for(strength, steps, 50)
    ok(api.post("/api/steps", {"strength": 0.35, "steps": 1}))


@pytest.mark.parametrize("body, status, words", [
    ({"t_index_list": [40, 10]}, 400, ["strictly increasing"]),  # the engine's own ConfigError
    ({"t_index_list": [60]}, 400, ["from 0 to 49"]),
    ({"t_index_list": []}, 422, ["t_index_list", "at least 1"]),
    ({"steps": 5}, 422, ["steps", "from 1 to 4"]),
    ({"strength": 1.5}, 422, ["strength", "less than or equal to 1"]),
    ({"strength": 0.5, "t_index_list": [3]}, 422, ["not both"]),
], ids=["decreasing", "past_end", "empty", "too_many_steps", "strength_high", "both"])
def test_steps_rejects(api, body, status, words):
    ok(api.post("/api/steps", {"strength": 0.35, "steps": 1}))
    rejected(api.post("/api/steps", body), status, *words)
    assert api.engine()["t_index_list"] == [32]
    assert api.status()["controls"]["t_index_list"] == [32]


def test_guidance_delta_cfg(api):
    ok(api.post("/api/guidance", {"guidance_scale": 1.5, "delta": 0.8, "cfg": "self"}))
    e = api.engine()
    assert (e["guidance_scale"], e["delta"], e["cfg"], e["effective_cfg"]) == (1.5, 0.8, "self", "self")
    rejected(api.post("/api/guidance", {"guidance_scale": 31}), 422, "guidance_scale", "less than or equal to 30")
    rejected(api.post("/api/guidance", {"delta": float("nan")}), 422, "delta")
    rejected(api.post("/api/guidance", {"cfg": "sometimes"}), 422, "cfg", "'none', 'self', 'initialize' or 'full'")
    assert api.engine()["guidance_scale"] == 1.5
    ok(api.post("/api/guidance", {"guidance_scale": 1.2, "delta": 1.0, "cfg": "none"}))


def test_similar_frame_filter(api):
    ok(api.post("/api/filter", {"enabled": True, "threshold": 0.95, "max_skip": 4}))
    assert api.engine()["similar_filter"] == {"enabled": True, "threshold": 0.95, "max_skip": 4}
    rejected(api.post("/api/filter", {"threshold": 1.01}), 422, "threshold")
    rejected(api.post("/api/filter", {"enabled": "yes"}), 422, "enabled", "valid boolean")
    rejected(api.post("/api/filter", {"max_skip": -1}), 422, "max_skip")
    ok(api.post("/api/filter", {"enabled": False}))
    assert api.engine()["similar_filter"]["enabled"] is False


def test_temporal_cache(api):
    ok(api.post("/api/cache", {"enabled": True, "maxframes": 2, "interval": 3}))
    cache = api.engine()["cache"]
    assert (cache["enabled"], cache["maxframes"], cache["interval"]) == (True, 2, 3)
    rejected(api.post("/api/cache", {"maxframes": 0}), 422, "maxframes")
    rejected(api.post("/api/cache", {"interval": 1001}), 422, "interval")
    ok(api.post("/api/cache", {"enabled": False, "maxframes": 1, "interval": 1}))


def test_presets_store_apply_and_persist(api, presets_file):
    body = {"prompt_a": "neon city", "prompt_b": "forest", "blend": 0.5, "negative_prompt": "text", "seed": 99}
    assert ok(api.put("/api/presets/3", body))["preset"] == body
    assert ok(api.get("/api/presets"))["presets"][2] == body
    assert json.loads(presets_file.read_text())[2] == body  # saved to --presets
    ok(api.post("/api/prompt", {"prompt_a": "something else", "blend": 0.0}))
    c = ok(api.post("/api/presets/3/apply"))
    assert (c["prompt_a"], c["seed"]) == ("neon city", 99)
    e = api.engine()
    assert e["prompt"] == [["neon city", 0.5], ["forest", 0.5]] and e["seed"] == [[99, 1.0]]
    rejected(api.post("/api/presets/9/apply"), 404, "preset 9 is empty")
    rejected(api.put("/api/presets/10", body), 404, "slots are 1 to 9")
    rejected(api.put("/api/presets/2", {**body, "blend": 3}), 422, "blend")


def test_playback_pause_and_freeze_with_frames_flowing(api, demo):
    with WsClient(demo.ws_url, "control") as page:
        def stream(seconds, first_id):
            frames, i, t_end = 0, first_id, time.monotonic() + seconds
            while time.monotonic() < t_end:
                page.send_frame(i)
                page.recv_json(lambda m: m["t"] in ("ack", "error"))
                i += 1
                frames += 1
                time.sleep(0.03)
            return i

        i = stream(1.0, 1)
        assert ok(api.post("/api/playback", {"paused": True}))["paused"] is True
        time.sleep(0.5)  # the frame in the engine finishes
        n0 = api.status()["server"]["frames_out"]
        i = stream(1.0, i)
        assert api.status()["server"]["frames_out"] == n0, "frames were processed while paused"
        ok(api.post("/api/playback", {"paused": False, "frozen": True}))
        time.sleep(0.5)
        s0 = api.status()["server"]
        i = stream(1.0, i)
        s1 = api.status()["server"]
        assert s1["frozen"] and s1["frames_out"] > s0["frames_out"]  # the held frame goes on being processed
        assert s1["ignored_frozen"] > s0["ignored_frozen"]  # the camera is ignored
        c = ok(api.post("/api/playback", {"frozen": False}))
        assert (c["paused"], c["frozen"]) == (False, False)
        rejected(api.post("/api/playback", {"paused": 1}), 422, "paused", "valid boolean")


def test_snapshot_is_the_latest_output_as_png(api, demo):
    with WsClient(demo.ws_url, "control") as page:
        page.send_frame(1)
        page.next_output()
    r = api.get("/api/snapshot.png")
    assert r.status == 200 and r.headers["content-type"] == "image/png"
    assert "attachment" in r.headers["content-disposition"]
    img = Image.open(io.BytesIO(r.body))
    assert img.size == (WIDTH, HEIGHT) and img.mode == "RGB"


def test_presets_store_every_control_and_keep_the_rest_when_partial(api):
    full = {"prompt_a": "tide", "prompt_b": "", "blend": 0.0, "method": "slerp", "negative_prompt": "",
            "seed": 12, "strength": 0.8, "steps": 2, "guidance_scale": 2.0, "delta": 0.7, "cfg": "self",
            "similar_filter": True, "similar_threshold": 0.9, "similar_max_skip": 3, "cache_enabled": False,
            "cache_maxframes": 1, "cache_interval": 1}
    assert ok(api.put("/api/presets/5", full))["preset"] == full
    ok(api.put("/api/presets/6", {"guidance_scale": 0.5}))  # a partial preset changes only what it holds
    ok(api.post("/api/prompt", {"prompt_a": "before", "blend": 0.0}))
    c = ok(api.post("/api/presets/5/apply"))
    assert {k: c[k] for k in full} == full and c["t_index_list"] == t_index_for(0.8, 2, 50)
    e = api.engine()
    assert (e["guidance_scale"], e["cfg"], e["t_index_list"]) == (2.0, "self", c["t_index_list"])
    assert e["similar_filter"] == {"enabled": True, "threshold": 0.9, "max_skip": 3}
    c = ok(api.post("/api/presets/6/apply"))
    assert c["guidance_scale"] == 0.5 and c["prompt_a"] == "tide" and c["cfg"] == "self"
    rejected(api.put("/api/presets/7", {"steps": 5}), 422, "steps", "from 1 to 4")
    rejected(api.put("/api/presets/7", {"cfg": "often"}), 422, "cfg")
    ok(api.post("/api/steps", {"strength": 0.35, "steps": 1}))
    ok(api.post("/api/guidance", {"guidance_scale": 1.2, "delta": 1.0, "cfg": "none"}))
    ok(api.post("/api/filter", {"enabled": False, "threshold": 0.98, "max_skip": 10}))


def test_recording_start_stop_and_download(api, demo):
    import av

    assert ok(api.get("/api/record"))["recording"] is False
    rejected(api.post("/api/record", {"recording": False}), 409, "not recording")
    started = ok(api.post("/api/record", {"recording": True}))
    assert started["recording"] and started["file"].endswith(".mp4")
    rejected(api.post("/api/record", {"recording": True}), 409, "already recording")
    with WsClient(demo.ws_url, "control") as page:
        for i in range(5):
            page.send_frame(500 + i)
            while page.next_output()[0].frame_id != 500 + i:
                pass
    stopped = ok(api.post("/api/record", {"recording": False}))
    last = stopped["last"]
    assert not stopped["recording"] and last["frames"] >= 5 and last["error"] == "" and last["bytes"] > 0
    r = api.get(last["url"])
    assert r.status == 200 and r.headers["content-type"] == "video/mp4"
    assert f'filename="{last["file"]}"' in r.headers["content-disposition"]
    with av.open(io.BytesIO(r.body)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height) == (WIDTH, HEIGHT)
        assert sum(1 for _ in container.decode(video=0)) == last["frames"]
    rejected(api.get("/api/recordings/rtdiffusion-20000101-000000.mp4"), 404, "no recording named")
    rejected(api.get("/api/recordings/presets.json"), 404, "no recording named")
    rejected(api.post("/api/record", {"recording": "yes"}), 422, "recording")
