# Script TOP callbacks: send the IP-Adapter's style picture (the TOP wired into this Script TOP's first input:
# in the component, style_select -> style_fit, following the IP-Adapter page's Style TOP) to the bridge's
# style ring. Unlike the input TOP it sends only when asked: on the component's IP-Adapter Update pulse
# (component.py calls request() through this DAT's module) and when a bridge's style ring is (re)attached;
# the bridge encodes each new picture once (never per frame). The ring name is this TOP's Ringname parameter,
# which osc_in_callbacks.py fills from /stream-info/style-name. A problem is a warning on this TOP, never raised.
import numpy as np

from td_bridge.touchdesigner import script_top
from td_bridge.touchdesigner.channel_order import as_rgb_view
from td_bridge.touchdesigner.td_frames import StyleSender

_sender = StyleSender()
_blank = np.zeros((1, 1, 4), np.uint8)


def request():
    """Send the style picture at the next cook (the IP-Adapter Update pulse)."""
    _sender.request()


def onSetupParameters(scriptOp):
    script_top.add_bridge_page(scriptOp, "Style Ring Name")
    return


def onGetCookLevel(scriptOp):
    return CookLevel.ALWAYS  # noqa: F821 - TouchDesigner 2025+; older builds never call this


def onPulse(par):
    return


def onCook(scriptOp):
    name, swap = script_top.ring_and_swap(scriptOp)
    if scriptOp.inputs and _sender.wants(name):
        frame = scriptOp.inputs[0].numpyArray()  # [H, W, 4] float32 0..1, bottom row first; once per request
        if frame is not None:
            _sender.send(name, as_rgb_view(frame, swap))
    scriptOp.copyNumpyArray(_blank)
    script_top.report(scriptOp, _sender, name)
    return
