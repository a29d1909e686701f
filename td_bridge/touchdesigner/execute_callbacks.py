# Execute DAT (frame_exec) of the rtdiffusion component built by build_component.py. Parameters on:
# Active, Start, Create, Exit, Frame Start.
#   onStart / onCreate: put the component's Repo folder on sys.path (all td_bridge needs) and clear the live
#                       status saved with the project (it would show the last session's "streaming").
#   onFrameStart:       force-cook both Script TOPs every frame. Without this the output TOP, which has no
#                       inputs, cooks once and shows a frozen frame, and the input TOP, a sink, cooks only
#                       while its viewer is visible (never in Perform mode or inside a closed component).
#                       (On TouchDesigner 2025+ the Script TOPs also ask for CookLevel.ALWAYS.)
#                       Then it copies the Script TOPs' link state (connected / lost / reconnected, with
#                       the reconnect counts) into the Status page, and notices an engine process that
#                       exited by itself (State "exited", Error).
#   onExit:             stop the engine process (OSC /stop, then terminate) when TouchDesigner quits.
import sys

_warned = []


def _component():
    comp = parent()  # noqa: F821 - parent() exists inside TouchDesigner
    repo = str(comp.par.Repo.eval()).strip()
    if repo and repo not in sys.path:
        sys.path.insert(0, repo)
    try:
        from td_bridge.touchdesigner import component
    except ImportError as exc:
        if not _warned:  # once, not every frame
            _warned.append(exc)
            comp.par.Error = (f"cannot import td_bridge ({exc}); set Repo to the rtdiffusion repository root "
                              "or add it under Preferences > Python 64-bit Module Path")
        return None, comp
    return component, comp


def onStart():
    component, comp = _component()
    if component is not None:
        component.on_start(comp)
    return


def onCreate():
    onStart()
    return


def onExit():
    component, comp = _component()
    if component is not None:
        component.stop(comp, wait=True)
    return


def onFrameStart(frame):
    component, comp = _component()
    if component is not None:
        component.force_cook(comp)
        component.show_links(comp)  # Input Link / Output Link: what the cooks just saw
        component.watch_engine(comp)  # an engine that exited by itself shows in State and Error
    return
