# Parameter Execute DAT (par_exec) of the rtdiffusion component built by build_component.py. It watches the
# component's custom control parameters (OPs: .., Parameters: the names in build_component.WATCHED;
# Value Change and On Pulse on) and sends each change to the engine as the OSC message the bridge
# understands (see td_bridge/touchdesigner/controls.py). Start / Stop launch and stop the engine process.
from td_bridge.touchdesigner import component


def onValueChange(par, prev):
    component.on_parameter(par.owner, par)
    return


def onPulse(par):
    component.on_parameter(par.owner, par)
    return
