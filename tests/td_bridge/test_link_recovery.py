"""Crash recovery of the TouchDesigner link, with real processes: a real bridge process (echo engine, see
_echo_bridge.py) killed with SIGKILL and restarted under the same ring names while the TouchDesigner scripts'
InputSender / OutputReceiver stream; rings truncated and flags scribbled on under a running bridge.

TouchDesigner is not available here: its two Script TOPs are played by the objects their callbacks use,
cooked from a thread. Every wait is on a condition with a generous timeout, never on a pace.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pythonosc.udp_client import SimpleUDPClient

from td_bridge.ring import FLAG_CHECKSUM, FLAG_CLOSED, RingError, RingReader, _open_untracked, probe
from td_bridge.touchdesigner.td_frames import InputSender, OutputReceiver
from osc_inbox import Inbox  # noqa: E402

BRIDGE = Path(__file__).with_name("_echo_bridge.py")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
TIMEOUT = 90.0

pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGKILL, process groups and ftruncate are POSIX")


def wait_until(cond, what, timeout=TIMEOUT):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.01)


class BridgeProc:
    """``python _echo_bridge.py`` in a session of its own (so it and its resource tracker form one group)."""

    def __init__(self, in_name, out_name, checksum=False):
        self.inbox = Inbox()
        cmd = [sys.executable, str(BRIDGE), str(self.inbox.port), in_name, out_name]
        self.proc = subprocess.Popen(cmd + (["--checksum"] if checksum else []), env=ENV, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.log = ""

    def ready(self):
        self.inbox.wait("/stream-info/state", lambda p: p[0] == "ready", timeout=TIMEOUT)
        self.client = SimpleUDPClient("127.0.0.1", self.inbox.all("/stream-info/osc-in-port")[-1][0])
        return self

    def events(self):
        return [p[1] for p in self.inbox.all("/stream-info/ring-event")]

    def kill(self, whole_group):
        if whole_group:  # the bridge and its resource tracker at once: nobody removes the segments
            os.killpg(self.proc.pid, signal.SIGKILL)
        else:  # the bridge alone: its resource tracker (a child) removes the segments it registered
            self.proc.kill()
        self.proc.wait(timeout=TIMEOUT)

    def stop(self):
        self.client.send_message("/stop", [])
        rc = self.proc.wait(timeout=TIMEOUT)
        self.inbox.wait("/server_active", lambda p: p == (0,), timeout=30)
        return rc

    def close(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log = self.proc.communicate(timeout=TIMEOUT)[0]
        self.inbox.close()


class TouchDesigner:
    """The input and output Script TOPs: InputSender.send and OutputReceiver.receive every cook, on a thread.
    ``paused()`` holds the cooks (nothing touches the rings meanwhile)."""

    def __init__(self, in_name, out_name):
        self.in_name, self.out_name = in_name, out_name
        self.sender, self.receiver = InputSender(), OutputReceiver()
        self.lock = threading.Lock()
        self.running = True
        self.failures = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        n = 0
        while self.running:
            frame = np.full((16, 16, 4), (n % 200) / 255.0, np.float32)  # numpyArray(): float32 RGBA 0..1
            with self.lock:
                try:
                    self.sender.send(self.in_name, frame)
                    self.receiver.receive(self.out_name)
                except Exception as exc:  # onCook must never see one
                    self.failures.append(repr(exc))
            n += 1
            time.sleep(0.005)  # TouchDesigner cooks once a frame; the pace does not matter here

    def paused(self):
        return self.lock

    def close(self):
        self.running = False
        self.thread.join(timeout=TIMEOUT)
        self.sender.close()
        self.receiver.close()
        assert not self.failures, self.failures


def names(shm_name):
    return shm_name + "i", shm_name + "o"


@pytest.mark.parametrize("whole_group", [False, True], ids=["segments-removed", "segments-left"])
def test_sigkill_and_restart_with_the_same_names_reconnects_both_sides(shm_name, whole_group):
    """The bridge is killed with SIGKILL while frames stream, and a new one starts with the same names.

    segments-removed: the killed bridge's resource tracker removes its segments (Linux, macOS); the new
    bridge makes new ones; the scripts see the names vanish, then new sessions, and re-attach.
    segments-left: the segments survive (as on Windows while TouchDesigner holds them); the scripts see the
    heartbeat stop, then the new bridge adopts the same segments under a new session."""
    in_name, out_name = names(shm_name)
    first = BridgeProc(in_name, out_name)
    second = td = None
    try:
        first.ready()
        td = TouchDesigner(in_name, out_name)
        wait_until(lambda: td.receiver.received >= 3, "frames through the first bridge")
        assert "connected to ring" in td.sender.status and "connected to ring" in td.receiver.status
        first.kill(whole_group)
        if whole_group:
            assert probe(in_name) and probe(out_name)  # left behind
            wait_until(lambda: "not responding" in (td.sender.error or "")
                       and "not responding" in (td.receiver.error or ""), "both scripts to notice the dead bridge")
        else:
            wait_until(lambda: "lost ring" in td.sender.status and "lost ring" in td.receiver.status,
                       "both scripts to notice that the rings were removed")
            for name in (in_name, out_name):
                with pytest.raises(RingError, match="no shared memory named"):
                    probe(name)
        received, reconnects = td.receiver.received, (td.sender.reconnects, td.receiver.reconnects)
        second = BridgeProc(in_name, out_name).ready()
        t_ready = time.monotonic()
        wait_until(lambda: td.receiver.received >= received + 3, "frames through the new bridge")
        print(f"frames flowed again {time.monotonic() - t_ready:.2f} s after the new bridge was ready")
        # segments-left: frames flow at once (same segment); the new session is noticed at the next check
        wait_until(lambda: (td.sender.reconnects, td.receiver.reconnects) == (reconnects[0] + 1, reconnects[1] + 1),
                   "both scripts to report the reconnect")
        for side in (td.sender, td.receiver):
            assert ("reconnected to ring" in side.status if not whole_group
                    else "a new bridge took over ring" in side.status), side.status
            assert side.error is None, side.error
        events = second.events()
        if whole_group:  # the new bridge says what it found
            assert sum("did not exit cleanly" in e for e in events) == 2, events
        else:
            assert sum(e.startswith("made ring") for e in events) == 2, events
        mark = second.inbox.mark()
        second.client.send_message("/get_status", [])
        rings = json.loads(second.inbox.wait("/status", after=mark, timeout=TIMEOUT)[0])["rings"]
        assert rings["input_session"] == f"{td.sender.writer.session:016x}"
        assert rings["output_session"] == f"{td.receiver.reader.session:016x}"
        assert [e for e in rings["events"] if "/ring/input" in e]
        assert second.stop() == 0
    finally:
        if td is not None:
            td.close()
        for b in (first, second):
            if b is not None:
                b.close()


def truncate(name, size=100):
    """What a stray process could do to a segment on Linux: shrink it (the header page stays)."""
    seg = _open_untracked(name)
    try:
        os.ftruncate(seg._fd, size)
    finally:
        seg.close()


def test_truncated_rings_are_replaced_and_the_bridge_stays_up(shm_name):
    """Before: the bridge died of SIGBUS with no word. Now it sees the size before touching a ring, makes a
    new ring of the same name, says so, and the scripts move to it."""
    in_name, out_name = names(shm_name)
    b = BridgeProc(in_name, out_name)
    td = None
    try:
        b.ready()
        td = TouchDesigner(in_name, out_name)
        wait_until(lambda: td.receiver.received >= 2, "frames")
        for what, name in (("/ring/input", in_name), ("/ring/output", out_name)):
            with td.paused():  # the scripts hold still; the bridge finishes the last frame and idles
                last_sent = td.sender.writer.published - 1
                with RingReader.attach(out_name) as out:
                    frame = out.empty_frame()
                    wait_until(lambda: _newest_source(out, frame) == last_sent, "the bridge to finish the last frame")
                mark = b.inbox.mark()
                truncate(name)
                err = b.inbox.wait("/error", lambda p: p[0] == what and "truncated" in p[1], after=mark,
                                   timeout=TIMEOUT)
            assert "made a new ring" in err[1], err
            assert len([p for p in b.inbox.all("/error", mark) if p[0] == what]) == 1  # one report, not two
            received = td.receiver.received
            wait_until(lambda: td.receiver.received >= received + 3, f"frames after {what} was replaced")
        assert b.proc.poll() is None
        assert td.sender.reconnects >= 1 and td.receiver.reconnects >= 1
        assert b.stop() == 0
    finally:
        if td is not None:
            td.close()
        b.close()
    assert "SIGBUS" not in b.log


def _newest_source(reader, frame):
    """The input frame the newest output frame was made from (-1 before any)."""
    info = reader.read(frame)
    if info is not None:
        reader.newest_source = info.source_index
    return getattr(reader, "newest_source", -1)


def test_each_flags_corruption_is_named_repaired_and_streaming_goes_on(shm_name):
    in_name, out_name = names(shm_name)
    b = BridgeProc(in_name, out_name, checksum=True)
    td = None
    try:
        b.ready()
        td = TouchDesigner(in_name, out_name)
        wait_until(lambda: td.receiver.received >= 2, "frames")
        cases = [("clear", FLAG_CHECKSUM, "CHECKSUM flag was cleared"),
                 ("set", FLAG_CLOSED, "CLOSED flag was set while the bridge serves it"),
                 ("set", 0x100, "unknown flag bits 0x100")]
        for op, bit, words in cases:
            for what, name in (("/ring/input", in_name), ("/ring/output", out_name)):
                mark = b.inbox.mark()
                with RingReader.attach(name) as ring:
                    if op == "clear":
                        ring._flags[0] &= ~np.uint32(bit)
                    else:
                        ring._flags[0] |= np.uint32(bit)
                    err = b.inbox.wait("/error", lambda p: p[0] == what and words in p[1], after=mark,
                                       timeout=TIMEOUT)
                    assert "rewrote the header" in err[1]
                    wait_until(lambda: int(ring._flags[0]) == FLAG_CHECKSUM, "the flags to be repaired")
                received = td.receiver.received
                wait_until(lambda: td.receiver.received >= received + 3, f"frames after {words} on {what}")
        st = b.inbox.all("/stream-info/ring-event")
        assert len(st) >= 2 + 6  # two "made ring" notes, then one per corruption
        assert b.stop() == 0
    finally:
        if td is not None:
            td.close()
        b.close()
