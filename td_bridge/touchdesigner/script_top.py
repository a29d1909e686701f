"""What the three Script TOPs' callbacks (input_top, output_top, style_top) share: their Bridge page, reading it
back in onCook, and reporting the link afterwards.

Each callbacks DAT imports this module the way it imports link_status (td_bridge on TouchDesigner's sys.path,
put there by the component's Execute DAT). Standard library only.
"""

from __future__ import annotations

from td_bridge.touchdesigner import link_status

SWAP_LABEL = "Swap R and B (BGRA)"


def add_bridge_page(script_top, ring_label: str, toggles: tuple[tuple[str, str], ...] = ()):
    """Custom page "Bridge": Ringname (labelled ``ring_label``), the extra ``(name, label)`` toggles, Swaprb."""
    page = script_top.appendCustomPage("Bridge")
    page.appendStr("Ringname", label=ring_label)
    for name, label in toggles:
        page.appendToggle(name, label=label)
    page.appendToggle("Swaprb", label=SWAP_LABEL)
    return page


def ring_and_swap(script_top) -> tuple[str, bool]:
    """The ring name ("" before osc_in_callbacks.py fills it) and the Swaprb toggle (False where it is missing)."""
    par = script_top.par
    name = par.Ringname.eval() if hasattr(par, "Ringname") else ""
    swap = bool(par.Swaprb.eval()) if hasattr(par, "Swaprb") else False
    return name, swap


def report(script_top, link, name: str) -> None:
    """End of onCook: the link's problem as a warning on the TOP (never raised), its state stored on the TOP."""
    if link.error:
        script_top.addWarning(link.error)
    link_status.publish(script_top, link, name)
