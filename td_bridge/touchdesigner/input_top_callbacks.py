# Script TOP callbacks: send the TOP wired into this Script TOP's first input to the bridge's input ring.
# Paste into the Script TOP's callbacks DAT. The ring name is this Script TOP's Ringname parameter, which
# osc_in_callbacks.py fills from /stream-info/input-name. Uses only TouchDesigner's documented Python:
# TOP.numpyArray() and scriptOp.copyNumpyArray().
# numpyArray() gives [H, W, 4] float32 0..1, bottom row first; channel order RGBA on the machines we know of,
# but check it with the component's red test frame (Checkorder): if it says BGRA, turn Swaprb on.
# This TOP is a sink: something must cook it every frame (the component's Execute DAT does, and on
# TouchDesigner 2025+ onGetCookLevel asks for ALWAYS), or it sends only while its viewer is visible.
# A ring that cannot be opened (missing, closed, no permission) is shown as a warning on this TOP, not raised.
# The link's state (connected, lost, reconnected after a bridge crash, and the reconnect count) is stored on
# this TOP every cook it changes (script_top.report -> link_status.publish: op.store, startup value None); the
# component's Status page shows it as Input Link / Input Reconnects.
import numpy as np

from td_bridge.touchdesigner import script_top
from td_bridge.touchdesigner.channel_order import as_rgb_view
from td_bridge.touchdesigner.td_frames import InputSender

_sender = InputSender()
_blank = np.zeros((1, 1, 4), np.uint8)
_sent_frame = [None]  # absTime.frame of the last send: a forced cook plus a CookLevel.ALWAYS cook in one
# frame must not send the same picture twice


def onSetupParameters(scriptOp):
    script_top.add_bridge_page(scriptOp, "Input Ring Name",
                               (("Delayed", "Delayed Readback"),))  # Delayed: one frame late, no GPU stall
    scriptOp.par.Delayed = True
    return


def onGetCookLevel(scriptOp):
    return CookLevel.ALWAYS  # noqa: F821 - TouchDesigner 2025+; older builds never call this


def onPulse(par):
    return


def _frame_number():
    try:
        return absTime.frame  # noqa: F821 - TouchDesigner's absolute frame count
    except NameError:  # outside TouchDesigner
        return None


def onCook(scriptOp):
    name, swap = script_top.ring_and_swap(scriptOp)
    delayed = bool(scriptOp.par.Delayed.eval()) if hasattr(scriptOp.par, "Delayed") else True
    now = _frame_number()
    if scriptOp.inputs and (now is None or now != _sent_frame[0]):
        frame = scriptOp.inputs[0].numpyArray(delayed=delayed)  # [H, W, 4] float32 0..1, bottom row first
        if frame is not None:  # delayed=True gives None on the very first frame
            _sender.send(name, as_rgb_view(frame, swap))
            _sent_frame[0] = now
    scriptOp.copyNumpyArray(_blank)  # this TOP is only a sink; show a 1x1 pixel
    script_top.report(scriptOp, _sender, name)
    return
