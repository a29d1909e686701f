# OSC In DAT callbacks (port 8248): keep the bridge's announcements where the Script TOPs can read them.
# Paste into the OSC In DAT's callbacks DAT. `targets` maps addresses to (operator path, parameter name);
# adjust the paths to your component. Everything else the bridge sends (fps, framecount, /status JSON,
# /error) is kept in the component's storage under the address, for a Text/Table DAT or a panel to show.

targets = {
    "/stream-info/input-name": ("input_top", "Ringname"),
    "/stream-info/output-name": ("output_top", "Ringname"),
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
    def set_par(path, par, value):
        target = op(path)  # noqa: F821 - op() exists inside TouchDesigner
        if target is not None and getattr(target.par, par).eval() != value:
            setattr(target.par, par, value)

    handle(address, list(args), parent().store, set_par)  # noqa: F821 - parent() exists inside TouchDesigner
    return
