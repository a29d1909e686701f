# OSC In DAT callbacks (port 8248): keep the bridge's announcements where the Script TOPs can read them.
# In the built component this is the callbacks DAT of oscin1. `targets` maps addresses to (operator path,
# parameter name); adjust the paths if your operators have other names. Everything else the bridge sends
# (fps, framecount, /status JSON, /error) is kept in the component's storage under the address
# (parent().fetch('/stream-info/fps')), with a startup value of None so a saved project never shows the last
# session's values; a component with the status parameters (built by build_component.py) also shows them
# there (State, Fps, Frames, Buildstage, Error, and the last /stream-info/ring-event <what> <text> as
# Ringevent: the bridge made, adopted, re-made or repaired a ring).

targets = {
    "/stream-info/input-name": ("input_top", "Ringname"),
    "/stream-info/output-name": ("output_top", "Ringname"),
    "/stream-info/control-name": ("control_top", "Ringname"),  # only with an 'external' ControlNet
    "/stream-info/style-name": ("style_top", "Ringname"),  # only with an IP-Adapter
}


def handle(address, args, store, set_par):
    """The part that does not need TouchDesigner (tested outside it)."""
    if not args:
        return
    value = args[0] if len(args) == 1 else list(args)
    store(address, value)
    if address in targets and isinstance(value, str):
        path, par = targets[address]
        set_par(path, par, value)


def onReceiveOSC(dat, rowIndex, message, bytes, timeStamp, address, args, peer):
    comp = parent()  # noqa: F821 - parent() exists inside TouchDesigner

    def set_par(path, par, value):
        target = comp.op(path)
        if target is not None and getattr(target.par, par).eval() != value:
            setattr(target.par, par, value)

    def store(key, value):
        comp.store(key, value)
        comp.storeStartupValue(key, None)  # reset when the project is next opened: no stale status

    handle(address, list(args), store, set_par)
    if hasattr(comp.par, "State"):  # the built component: status parameters too
        from td_bridge.touchdesigner import component
        component.on_osc(comp, address, list(args))
    return
