"""The TouchDesigner scripts' frame logic, run outside TouchDesigner against real rings.

TouchDesigner itself is not available here. The Script TOP callbacks are executed with a small stand-in
for the two documented calls they use (TOP.numpyArray(delayed=...) and scriptOp.copyNumpyArray()), which
behave as TouchDesigner documents them: float32 RGBA 0..1 arrays with the bottom row first.
"""

from pathlib import Path

import numpy as np
import pytest

import td_bridge.touchdesigner as td_pkg
from td_bridge.ring import FLAG_CLOSED, PixelFormat, RingLayout, RingReader, RingWriter, RowOrder, to_rgb
from td_bridge.touchdesigner.td_frames import InputSender, OutputReceiver

SCRIPTS = Path(td_pkg.__file__).parent


class Par:
    def __init__(self, value):
        self.value = value

    def eval(self):
        return self.value


class Pars:
    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, Par(v))


class Top:
    """TOP.numpyArray(): float32 RGBA 0..1, bottom row first."""

    def __init__(self, top_down_rgb):
        rgba = np.concatenate([top_down_rgb, np.full(top_down_rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
        self.array = (rgba[::-1] / 255.0).astype(np.float32)

    def numpyArray(self, delayed=False, writable=False):
        return self.array


class ScriptOp:
    def __init__(self, inputs, **pars):
        self.inputs = inputs
        self.par = Pars(**pars)
        self.copied = []
        self.warnings = []

    def copyNumpyArray(self, arr):
        assert arr.ndim == 3 and arr.shape[2] in (3, 4) and arr.dtype in (np.uint8, np.float32)
        self.copied.append(arr.copy())

    def addWarning(self, text):
        self.warnings.append(text)

    def store(self, key, value):  # OP storage, as every TouchDesigner operator has it
        self.__dict__.setdefault("storage", {})[key] = value
        return value

    def fetch(self, key, default=None, search=True, storeDefault=False):
        return self.__dict__.get("storage", {}).get(key, default)

    def storeStartupValue(self, key, value):
        pass


def load(script):
    ns = {"__name__": f"td_script_{script}"}
    exec(compile((SCRIPTS / script).read_text(), str(SCRIPTS / script), "exec"), ns)
    return ns


def picture(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)  # top-down RGB


@pytest.mark.parametrize("row_order", list(RowOrder))
def test_input_script_top_writes_the_picture_upright(shm_name, row_order):
    pic = picture(24, 32)
    bridge_side = RingReader.create(shm_name, RingLayout(32, 24, PixelFormat.RGBA8, row_order))
    try:
        ns = load("input_top_callbacks.py")
        op = ScriptOp([Top(pic)], Ringname=shm_name, Delayed=True)
        ns["onCook"](op)
        raw, rgb = bridge_side.empty_frame(), np.empty_like(pic)
        assert bridge_side.read(raw) is not None
        assert np.array_equal(to_rgb(raw, bridge_side.layout, rgb), pic)  # whatever order the ring keeps
        assert op.copied and not op.warnings
        ns["_sender"].close()
    finally:
        bridge_side.close()


def test_input_sender_explains_a_missing_ring_and_a_wrong_resolution(shm_name):
    s = InputSender()
    assert not s.send(shm_name, np.zeros((8, 8, 4), np.float32))
    assert "no shared memory named" in s.error
    with RingReader.create(shm_name, RingLayout(16, 16)):
        s._next_try = 0.0
        assert not s.send(shm_name, np.zeros((8, 8, 4), np.float32))
        assert "is 8x8 but the bridge runs at 16x16" in s.error
        assert s.send(shm_name, np.zeros((16, 16, 4), np.float32)) and s.error is None
        s.close()


@pytest.mark.parametrize("fmt", list(PixelFormat))
@pytest.mark.parametrize("row_order", list(RowOrder))
def test_output_script_top_shows_the_newest_frame(shm_name, fmt, row_order):
    bridge_side = RingWriter.create(shm_name, RingLayout(32, 24, fmt, row_order))
    try:
        ns = load("output_top_callbacks.py")
        op = ScriptOp([], Ringname=shm_name)
        ns["onCook"](op)
        assert not op.copied  # nothing published yet
        for i in range(3):
            bridge_side.write(picture(24, 32, seed=i), rows=RowOrder.TOP_DOWN)
        ns["onCook"](op)
        shown = op.copied[-1]  # RGBA bottom-up, as copyNumpyArray expects
        assert np.array_equal(shown[::-1, :, :3], picture(24, 32, seed=2))
        assert (shown[..., 3] == 255).all()
        ns["onCook"](op)  # nothing new: the last frame stays up
        assert np.array_equal(op.copied[-1], shown)
        ns["_receiver"].close()
    finally:
        bridge_side.close()


def test_output_receiver_lets_go_when_the_bridge_exits(shm_name):
    r = OutputReceiver()
    w = RingWriter.create(shm_name, RingLayout(8, 8))
    w.write(picture(8, 8))
    assert r.receive(shm_name) is not None and r.received == 1
    w.close()  # the bridge exits: ring marked CLOSED and unlinked
    r.receive(shm_name)
    assert r.reader is None
    r._next_try = 0.0
    r.receive(shm_name)
    assert "no shared memory named" in r.error


def test_osc_in_callbacks_route_ring_names():
    ns = load("osc_in_callbacks.py")
    stored, pars = {}, {}
    ns["handle"]("/stream-info/input-name", ["rtd_in_1"], stored.__setitem__,
                 lambda path, par, v: pars.__setitem__((path, par), v))
    ns["handle"]("/stream-info/fps", [12.5], stored.__setitem__, lambda *a: None)
    assert pars == {("input_top", "Ringname"): "rtd_in_1"}
    assert stored == {"/stream-info/input-name": "rtd_in_1", "/stream-info/fps": 12.5}


def test_controls_send_what_the_bridge_accepts():
    from td_bridge.osc import CONTROLS

    sent = []

    class OscOut:
        def sendOSC(self, address, values):
            sent.append((address, values))

    ns = load("controls.py")
    o = OscOut()
    ns["prompt"](o, "city")
    ns["prompt_list"](o, [("a", 0.5), ("b", 0.5)])
    ns["seed"](o, 3)
    ns["guidance"](o, 1.3)
    ns["t_list"](o, [10, 30])
    for address, values in sent:
        CONTROLS[address].parse(tuple(values))  # raises if the bridge would reject it
    assert [a for a, _ in sent] == ["/prompt", "/prompt_list", "/seed", "/guidance_scale", "/t_list"]


def test_input_sender_does_not_write_into_a_closed_ring(shm_name):
    """A ring whose bridge has exited (CLOSED, about to be unlinked) is refused, not re-opened and written
    into forever; once a bridge serves it again the sender goes back to it."""
    bridge_side = RingReader.create(shm_name, RingLayout(8, 8))
    try:
        s = InputSender()
        assert s.send(shm_name, np.zeros((8, 8, 4), np.float32))
        bridge_side._flags[0] |= FLAG_CLOSED  # the bridge exits (what close() does before unlinking)
        assert not s.send(shm_name, np.zeros((8, 8, 4), np.float32))
        s._next_try = 0.0
        assert not s.send(shm_name, np.zeros((8, 8, 4), np.float32))  # retried: still refused
        assert "closed" in s.error and s.writer is None and bridge_side.closed
        assert bridge_side.published == 1
        bridge_side.clear_closed()  # a bridge adopts the ring again
        s._next_try = 0.0
        assert s.send(shm_name, np.zeros((8, 8, 4), np.float32)) and s.error is None
        assert bridge_side.published == 2
        s.close()
    finally:
        bridge_side.close()


def test_input_sender_reports_a_bad_frame_instead_of_raising(shm_name):
    with RingReader.create(shm_name, RingLayout(8, 8)) as bridge_side:
        s = InputSender()
        for bad in (np.zeros((8, 8, 2), np.float32), np.zeros((8, 8, 4), np.float64)):
            assert not s.send(shm_name, bad)
            assert "takes [8, 8, 3|4] uint8 or float32 frames" in s.error
        assert bridge_side.published == 0
        assert s.send(shm_name, np.zeros((8, 8, 4), np.uint8)) and s.error is None
        s.close()
