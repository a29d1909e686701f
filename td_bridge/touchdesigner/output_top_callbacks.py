# Script TOP callbacks: show the newest frame of the bridge's output ring. Paste into the Script TOP's
# callbacks DAT; set Ringname (osc_in_callbacks.py fills it from /stream-info/output-name). Make the
# Script TOP cook every frame (e.g. keep its viewer on, or reference it from a Null TOP that is displayed).
from td_bridge.touchdesigner.td_frames import OutputReceiver

_receiver = OutputReceiver()


def onSetupParameters(scriptOp):
    page = scriptOp.appendCustomPage("Bridge")
    page.appendStr("Ringname", label="Output ring name")
    return


def onPulse(par):
    return


def onCook(scriptOp):
    name = scriptOp.par.Ringname.eval() if hasattr(scriptOp.par, "Ringname") else ""
    frame = _receiver.receive(name)  # [H, W, 4] uint8 RGBA, bottom-up like every TOP
    if frame is not None:
        scriptOp.copyNumpyArray(frame)
    if _receiver.error:
        scriptOp.addWarning(_receiver.error)
    return
