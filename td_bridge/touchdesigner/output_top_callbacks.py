# Script TOP callbacks: show the newest frame of the bridge's output ring. Paste into the Script TOP's
# callbacks DAT; the ring name is this Script TOP's Ringname parameter (osc_in_callbacks.py fills it from
# /stream-info/output-name). This TOP has no inputs, so TouchDesigner cooks it once and then shows a frozen
# frame unless something cooks it every frame: the component's Execute DAT force-cooks it in onFrameStart,
# and on TouchDesigner 2025+ onGetCookLevel asks for ALWAYS. Swaprb: hand copyNumpyArray() BGRA instead of
# RGBA (turn on only if the component's red test frame says numpyArray() is BGRA on this machine).
# The link's state (connected, lost, reconnected after a bridge crash, and the reconnect count) is stored on
# this TOP every cook it changes (link_status.publish, through script_top.report); the component's Status page shows it as Output Link.
from td_bridge.touchdesigner import script_top
from td_bridge.touchdesigner.channel_order import SwapOut
from td_bridge.touchdesigner.td_frames import OutputReceiver

_receiver = OutputReceiver()
_swap = SwapOut()


def onSetupParameters(scriptOp):
    script_top.add_bridge_page(scriptOp, "Output Ring Name")
    return


def onGetCookLevel(scriptOp):
    return CookLevel.ALWAYS  # noqa: F821 - TouchDesigner 2025+; older builds never call this


def onPulse(par):
    return


def onCook(scriptOp):
    name, swap = script_top.ring_and_swap(scriptOp)
    frame = _receiver.receive(name)  # [H, W, 4] uint8 RGBA, bottom-up like every TOP
    if frame is not None:
        scriptOp.copyNumpyArray(_swap(frame, swap))
    script_top.report(scriptOp, _receiver, name)
    return
