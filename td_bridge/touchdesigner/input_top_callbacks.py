# Script TOP callbacks: send the TOP wired into this Script TOP's first input to the bridge's input ring.
# Paste into the Script TOP's callbacks DAT. The ring name comes from the component's Inputname parameter,
# which osc_in_callbacks.py fills from /stream-info/input-name. Uses only TouchDesigner's documented Python:
# TOP.numpyArray() and scriptOp.copyNumpyArray().
import numpy as np

from td_bridge.touchdesigner.td_frames import InputSender

_sender = InputSender()
_blank = np.zeros((1, 1, 4), np.uint8)


def onSetupParameters(scriptOp):
    page = scriptOp.appendCustomPage("Bridge")
    page.appendStr("Ringname", label="Input ring name")
    page.appendToggle("Delayed", label="Delayed readback (one frame late, no GPU stall)")
    scriptOp.par.Delayed = True
    return


def onPulse(par):
    return


def onCook(scriptOp):
    name = scriptOp.par.Ringname.eval() if hasattr(scriptOp.par, "Ringname") else ""
    delayed = bool(scriptOp.par.Delayed.eval()) if hasattr(scriptOp.par, "Delayed") else True
    if scriptOp.inputs:
        frame = scriptOp.inputs[0].numpyArray(delayed=delayed)  # [H, W, 4] float32 0..1, bottom row first
        _sender.send(name, frame)
    scriptOp.copyNumpyArray(_blank)  # this TOP is only a sink; show a 1x1 pixel
    if _sender.error:
        scriptOp.addWarning(_sender.error)
    return
