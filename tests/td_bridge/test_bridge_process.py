"""`rtdiffusion td` as a real process with the real engine (random:tiny on the CPU), driven the way
TouchDesigner drives it: frames through shared memory from other processes, control over loopback OSC.

One bridge process serves the whole module (loading a model takes seconds); the tests run in file order.
"""

import json
import os
import socket
import subprocess
import sys
import time
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import pytest
from pythonosc.udp_client import SimpleUDPClient

from td_bridge.ring import RingError, RingReader, RingWriter, RowOrder
from osc_inbox import Inbox  # noqa: E402

WRITER = Path(__file__).with_name("_writer_proc.py")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


@pytest.fixture(scope="module")
def bridge():
    inbox = Inbox()
    tag = f"{os.getpid() % 100000}{int(time.time() * 1000) % 100000}"
    squatter = shared_memory.SharedMemory(name=f"rtdq{tag}", create=True, size=1000)  # a wrong-size "ring"
    cmd = [sys.executable, "-c", "import sys; from rtdiffusion.cli import main; sys.exit(main(sys.argv[1:]))",
           "td", "--model", "random:tiny", "--width", "64", "--height", "64", "--device", "cpu",
           "--dtype", "float32", "--osc-in-port", "0", "--osc-out-port", str(inbox.port),
           "--input-name", f"rtdq{tag}", "--output-name", f"rtdo{tag}", "--pixel-format", "bgra8", "--flip-rows",
           "--checksum"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state = {"proc": proc, "inbox": inbox}
    try:
        inbox.wait("/stream-info/state", lambda p: p[0] == "ready", timeout=120)
        state["in"] = inbox.all("/stream-info/input-name")[-1][0]
        state["out"] = inbox.all("/stream-info/output-name")[-1][0]
        state["client"] = SimpleUDPClient("127.0.0.1", inbox.all("/stream-info/osc-in-port")[-1][0])
        yield state
    finally:
        if proc.poll() is None:
            proc.kill()
        state["log"] = proc.communicate(timeout=30)[0]
        inbox.close()
        squatter.close()
        squatter.unlink()


def next_output(reader, out, timeout=60.0):
    info = reader.wait(out, timeout)
    assert info is not None, "no output frame"
    return info


def test_heartbeat_states_and_a_wrong_size_input_ring(bridge):
    inbox = bridge["inbox"]
    states = [p[0] for p in inbox.all("/stream-info/state")]
    assert states[0] == "loading" and "building" in states and states[-1] == "ready"
    assert inbox.all("/server_active")[0] == (1,)
    assert inbox.all("/stream-info/build-stage")  # the engine's own load messages came through
    # --input-name named a 1000-byte segment that is not a ring: the bridge said so and made its own
    err = [p for p in inbox.all("/error") if p[0] == "/ring/input"][0]
    assert "is 1000 bytes" in err[1] or "not an rtdiffusion frame ring" in err[1]
    assert bridge["in"] != os.path.basename(err[1]) and bridge["in"] in err[1]


def test_fast_writer_process_every_result_complete_and_in_order(bridge):
    inbox = bridge["inbox"]
    mark = inbox.mark()
    reader = RingReader.attach(bridge["out"])
    assert reader.layout.checksum and reader.layout.row_order is RowOrder.BOTTOM_UP
    writer = subprocess.Popen([sys.executable, str(WRITER), bridge["in"], "6"], env=ENV, stdout=subprocess.PIPE)
    try:
        out = reader.empty_frame()
        got = []
        while writer.poll() is None or reader.new_frame():
            info = reader.read(out)  # crc32-checked: a torn or half-written frame never comes back
            if info is not None:
                assert (out[..., 3] == 255).all()  # bgra8: alpha filled on the way out
                got.append(info)
            time.sleep(0.001)
        written = int(writer.communicate(timeout=30)[0])
    finally:
        if writer.poll() is None:
            writer.kill()
        reader.close()
    assert len(got) >= 2, got
    assert [g.index for g in got] == sorted({g.index for g in got})
    assert [g.source_index for g in got] == sorted(g.source_index for g in got)
    assert written > got[-1].source_index  # the writer was far faster than the engine
    inbox.wait("/frame_ready", lambda p: p[0] == got[-1].index, after=mark, timeout=10)
    inbox.wait("/stream-info/state", lambda p: p[0] == "streaming", after=mark, timeout=10)


def write_frames_until_output(bridge, n_outputs=1, timeout=90.0):
    """Play TouchDesigner: keep writing frames until the bridge has published n more results."""
    w, r = RingWriter.attach(bridge["in"]), RingReader.attach(bridge["out"])
    try:
        r.last_index = r.published - 1
        out, frame = r.empty_frame(), np.random.default_rng(0).random((64, 64, 4), dtype=np.float32)
        end, got = time.monotonic() + timeout, []
        while len(got) < n_outputs and time.monotonic() < end:
            w.write(frame, rows=RowOrder.BOTTOM_UP)  # float32 RGBA 0..1, as TOP.numpyArray() gives it
            info = r.wait(out, 0.2)
            if info is not None:
                got.append(info)
        assert len(got) == n_outputs, "the bridge stopped producing frames"
        return got
    finally:
        w.close()
        r.close()


def status(bridge):
    inbox = bridge["inbox"]
    mark = inbox.mark()
    bridge["client"].send_message("/get_status", [])
    return json.loads(inbox.wait("/status", after=mark, timeout=10)[0])


def test_prompt_seed_and_status_over_osc(bridge):
    c = bridge["client"]
    c.send_message("/prompt", "a neon city at night")
    c.send_message("/seed", 77)
    c.send_message("/guidance_scale", 1.4)
    write_frames_until_output(bridge, 2)
    st = status(bridge)
    assert st["engine"]["prompt"] == [["a neon city at night", 1.0]]
    assert st["engine"]["seed"] == [[77, 1.0]]
    assert st["engine"]["guidance_scale"] == pytest.approx(1.4)
    assert st["state"] == "streaming" and st["transfer"] == "host"


def test_burst_of_500_and_a_40_kib_prompt_list(bridge):
    c = bridge["client"]
    for i in range(500):
        if i % 2:
            c.send_message("/seed", i)
        else:
            c.send_message("/delta", i / 1000)
    pairs = [[f"style {i} " + "y" * 2100, 1.0] for i in range(20)]
    text = json.dumps(pairs)
    assert len(text) > 40 * 1024
    c.send_message("/prompt_list", text)
    write_frames_until_output(bridge, 2)
    st = status(bridge)
    assert not bridge["inbox"].all("/error")[1:], bridge["inbox"].all("/error")
    assert st["engine"]["seed"] == [[499, 1.0]], st
    assert st["engine"]["delta"] == pytest.approx(0.498)
    assert len(st["engine"]["prompt"]) == 20
    assert st["osc"]["received"] >= 505 and st["osc"]["rejected"] == 0


def test_bad_input_is_answered_and_streaming_continues(bridge):
    inbox, c = bridge["inbox"], bridge["client"]
    mark = inbox.mark()
    c.send_message("/seed", "seven")
    c.send_message("/guidance_scale", float("nan"))
    c.send_message("/t_list", [10, 999])  # in range for OSC, out of range for this engine's 50 steps
    c.send_message("/prompt_list", "[[\"a\", 1.0]")
    c.send_message("/launch_missiles", 1)
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.sendto(os.urandom(512), ("127.0.0.1", c._port))
    raw.close()
    # a client scribbles over the input ring's header
    shm = shared_memory.SharedMemory(name=bridge["in"])
    try:
        shm.buf[:8] = b"XXXXXXXX"
        inbox.wait("/error", lambda p: p[0] == "/ring/input" and "XXXXXXXX" in p[1], after=mark, timeout=10)
        write_frames_until_output(bridge, 2)  # the bridge repaired the header and keeps streaming
    finally:
        shm.close()
    # a client that expects another geometry is told what the ring is
    with pytest.raises(RingError, match="64x64 bgra8 bottom-up"):
        from td_bridge.ring import RingLayout
        RingReader.attach(bridge["out"], expect=RingLayout(128, 128))
    with inbox.lock:
        errors = {p[0]: p[1] for a, p in inbox.messages[mark:] if a == "/error"}
    for address, words in [("/seed", "expected an integer"), ("/guidance_scale", "finite"),
                           ("/t_list", "t_index_list"), ("/prompt_list", "could not parse"),
                           ("/launch_missiles", "unknown address"), ("", "not a valid OSC packet"),
                           ("/ring/input", "rewrote the header")]:
        assert address in errors and words in errors[address], (address, errors.get(address))
    st = status(bridge)
    assert st["engine"]["seed"] == [[499, 1.0]] and st["engine"]["t_index_list"] == [32]  # nothing changed
    assert st["state"] == "streaming"


def test_pause_single_step_and_play(bridge):
    inbox, c = bridge["inbox"], bridge["client"]
    mark = inbox.mark()
    c.send_message("/pause", [])
    inbox.wait("/stream-info/state", lambda p: p[0] == "paused", after=mark, timeout=30)
    r = RingReader.attach(bridge["out"])
    try:
        r.last_index = r.published - 1
        out = r.empty_frame()
        time.sleep(0.5)
        assert r.read(out) is None  # paused: nothing new even though frames were written before
        c.send_message("/process_frame", [])
        next_output(r, out)
        assert r.wait(out, 1.0) is None  # exactly one step
    finally:
        r.close()
    mark = inbox.mark()
    c.send_message("/play", [])
    write_frames_until_output(bridge, 1)
    assert status(bridge)["paused"] is False


def test_stop_exits_cleanly_and_unlinks_the_rings(bridge):
    proc = bridge["proc"]
    bridge["client"].send_message("/stop", [])
    assert proc.wait(timeout=60) == 0
    assert bridge["inbox"].all("/server_active")[-1] == (0,)
    for name in (bridge["in"], bridge["out"]):
        with pytest.raises(RingError, match="no shared memory named"):
            RingReader.attach(name)


def test_sigterm_stops_the_bridge_and_unlinks_its_rings():
    import signal

    inbox = Inbox()
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from rtdiffusion.cli import main; sys.exit(main(sys.argv[1:]))",
         "td", "--model", "random:tiny", "--width", "64", "--height", "64", "--device", "cpu", "--dtype", "float32",
         "--osc-in-port", "0", "--osc-out-port", str(inbox.port)],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        inbox.wait("/stream-info/state", lambda p: p[0] == "ready", timeout=120)
        names = [inbox.all(a)[-1][0] for a in ("/stream-info/input-name", "/stream-info/output-name")]
        assert names == [f"rtd_in_{proc.pid}", f"rtd_out_{proc.pid}"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        for name in names:
            with pytest.raises(RingError, match="no shared memory named"):
                RingReader.attach(name)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
        inbox.close()


def test_build_stages_arrive_as_engine_stage(bridge):
    """/engine/stage: name index count fraction elapsed_s estimate_s state source, for every stage of the
    cold build (random:tiny, eager on the CPU: load weights, text encoders, first frame = the warm-up)."""
    msgs = bridge["inbox"].all("/engine/stage")
    starts = [m[0] for m in msgs if m[6] == "start"]
    assert starts == ["load weights", "text encoders", "first frame"]
    assert [m[1] for m in msgs if m[6] == "start"] == [1, 2, 3] and {m[2] for m in msgs} == {3}
    fractions = [m[3] for m in msgs]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and msgs[-1][6] == "done"
    assert all(m[4] >= 0 and m[5] >= 0 and m[7] in ("recorded", "mixed", "prior") for m in msgs)
    progress = [p[0] for p in bridge["inbox"].all("/stream-info/build-progress")]
    assert progress == sorted(progress) and progress[-1] == 1.0
