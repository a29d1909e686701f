"""The bridge's load and frame loop in this process, fast: real OSC over loopback, real shared-memory rings,
and a small echo engine handed in through ``engine_factory`` (the bridge is under test, not the model; the
real model is driven in test_bridge_process.py)."""

import os
import threading
import time
from multiprocessing import shared_memory

import numpy as np
import pytest
from pythonosc.udp_client import SimpleUDPClient

from td_bridge.bridge import Bridge, BridgeConfig
from td_bridge.ring import FLAG_CLOSED, RingError, RingLayout, RingReader, RingWriter
from _echo_bridge import Echo  # noqa: E402
from osc_inbox import Inbox  # noqa: E402


class Running:
    """A Bridge serving on a thread; ``stop()`` sends /stop over OSC and returns serve()'s exit code.

    ``factory(bridge)`` makes the engine; it is handed the Bridge (made before its thread starts), so a
    factory never reads state that the test assigns after the thread is running."""

    def __init__(self, factory=lambda bridge: Echo(), **config):
        self.inbox = Inbox()
        self.engine = None

        def make():
            self.engine = factory(self.bridge)
            return self.engine

        cfg = BridgeConfig(osc_in_port=0, osc_out_port=self.inbox.port, **config)
        self.bridge = Bridge(cfg, make)
        self.result = []
        self.thread = threading.Thread(target=lambda: self.result.append(self.bridge.serve()), daemon=True)
        self.thread.start()
        end = time.monotonic() + 60
        while self.bridge.receiver is None or self.bridge.receiver.port == 0:
            assert time.monotonic() < end, "the bridge did not start"
            time.sleep(0.005)
        self.client = SimpleUDPClient("127.0.0.1", self.bridge.receiver.port)

    def ready(self):
        self.inbox.wait("/stream-info/state", lambda p: p[0] == "ready")
        return self

    def send(self, address):
        self.client.send_message(address, [])

    def stop(self):
        self.send("/stop")
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "the bridge did not stop"
        self.inbox.wait("/server_active", lambda p: p == (0,), timeout=30)  # its last message is in
        self.inbox.close()
        return self.result[0]


def wait_until(cond, what, timeout=60.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_process_frame_while_streaming_is_not_saved_up_for_the_next_pause(shm_name):
    b = Running(input_name=shm_name + "i", output_name=shm_name + "o").ready()
    try:
        with RingWriter.attach(shm_name + "i") as w:
            w.write(np.zeros((16, 16, 3), np.uint8))
            b.inbox.wait("/frame_ready")
            n = b.bridge.frames_out  # no new input frame: streaming makes nothing more
            for _ in range(3):  # pulses while streaming: nothing to step, so they must not count
                b.send("/process_frame")
            b.send("/pause")  # the pulses and the pause may reach the frame loop in the same gap
            b.inbox.wait("/stream-info/state", lambda p: p[0] == "paused")
            time.sleep(0.4)  # room for a wrongly saved-up step to show
            assert b.bridge.frames_out == n  # before the fix: three queued steps ran here
            b.send("/process_frame")
            wait_until(lambda: b.bridge.frames_out > n, "the step")
            time.sleep(0.2)
            assert b.bridge.frames_out == n + 1  # exactly one step
    finally:
        assert b.stop() == 0


def test_an_unreadable_input_ring_is_reported_at_a_bounded_rate_and_streaming_resumes(shm_name):
    b = Running(input_name=shm_name + "i", output_name=shm_name + "o", slots=2).ready()
    try:
        with RingWriter.attach(shm_name + "i") as w:
            w.write(np.zeros((16, 16, 3), np.uint8))
            b.inbox.wait("/frame_ready")
            mark = b.inbox.mark()
            w._published[0] = 1001  # corrupt: points at a slot holding an older frame, every read fails
            first = b.inbox.wait("/error", lambda p: p[0] == "/ring/input", after=mark)
            assert "published counter is corrupt" in first[1] and "more slots" not in first[1]
            t0 = time.monotonic()
            time.sleep(1.0)  # the loop keeps failing on every read meanwhile
            window = time.monotonic() - t0
            errors = [p for p in b.inbox.all("/error", mark) if p[0] == "/ring/input"]
            assert len(errors) <= window / 1.0 + 2, len(errors)  # at most one a second (before: thousands)
            assert b.thread.is_alive()
            mark = b.inbox.mark()
            w.write(np.zeros((16, 16, 3), np.uint8))  # a good frame: published is sane again
            b.inbox.wait("/frame_ready", after=mark)
    finally:
        assert b.stop() == 0


def test_stop_while_loading_exits_before_warm_up_and_opens_no_rings(shm_name):
    loading = threading.Event()
    woken_by_stop = []

    def slow_load(bridge):  # a model load that lasts until /stop arrives in the middle of it
        loading.set()
        woken_by_stop.append(bridge.stop.wait(120))
        return Echo()

    b = Running(slow_load, input_name=shm_name + "i", output_name=shm_name + "o")
    assert loading.wait(60)
    assert b.stop() == 0
    assert woken_by_stop == [True]  # the load was still running when /stop came, and /stop ended it
    assert b.engine.calls == 0  # no warm-up frame
    states = [p[0] for p in b.inbox.all("/stream-info/state")]
    assert "ready" not in states and "building" not in states and states[-1] == "stopped"
    assert b.inbox.all("/server_active")[-1] == (0,)
    for name in (shm_name + "i", shm_name + "o"):
        with pytest.raises(RingError, match="no shared memory named"):
            RingReader.attach(name)


def test_a_taken_fallback_name_is_reported_and_another_name_is_used(shm_name):
    name = shm_name + "i"
    fallback = f"{name[:20]}_{os.getpid()}"
    squatters = [shared_memory.SharedMemory(name=n, create=True, size=1000) for n in (name, fallback)]
    try:
        b = Running(input_name=name, output_name=shm_name + "o").ready()
        try:
            err = [p for p in b.inbox.all("/error") if p[0] == "/ring/input"][0][1]
            used = b.inbox.all("/stream-info/input-name")[-1][0]
            assert name in err and fallback in err and used in err and used not in (name, fallback)
            with RingWriter.attach(used) as w:  # and it works
                w.write(np.zeros((16, 16, 3), np.uint8))
                b.inbox.wait("/frame_ready")
        finally:
            assert b.stop() == 0
    finally:
        for s in squatters:
            s.close()
            s.unlink()


def test_closed_flag_cleared_only_on_a_ring_the_bridge_adopts(shm_name):
    good = RingReader.create(shm_name + "i", RingLayout(16, 16))  # right geometry, its creator "gone"
    wrong = RingReader.create(shm_name + "o", RingLayout(8, 8))  # wrong geometry: rejected
    try:
        for r in (good, wrong):
            r._flags[0] |= FLAG_CLOSED
        b = Running(input_name=shm_name + "i", output_name=shm_name + "o").ready()
        try:
            assert b.bridge.reader.name == shm_name + "i"
            assert not good.closed  # adopted: open again, so clients will write into it
            assert b.bridge.writer.name != shm_name + "o"
            assert wrong.closed  # rejected: left as it was
        finally:
            assert b.stop() == 0
    finally:
        good.close()
        wrong.close()


def test_a_ring_name_removed_under_the_bridge_is_made_again(shm_name):
    """Say the resource tracker of a bridge that crashed removes the names just after a new bridge made them:
    the new bridge looks its names up once a second, makes the ring again and says so."""
    from td_bridge.segment import _unlink_name

    b = Running(input_name=shm_name + "i", output_name=shm_name + "o").ready()
    try:
        mark = b.inbox.mark()
        _unlink_name(shm_name + "i")
        err = b.inbox.wait("/error", lambda p: p[0] == "/ring/input" and "was removed" in p[1], after=mark)
        assert "made a new ring" in err[1]
        with RingWriter.attach(shm_name + "i") as w:  # the name works again
            w.write(np.zeros((16, 16, 3), np.uint8))
            b.inbox.wait("/frame_ready", after=mark)
    finally:
        assert b.stop() == 0
