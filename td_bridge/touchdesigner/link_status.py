"""The state of a Script TOP's ring link, handed from the Script TOP's callbacks to the component's Status page.

The two Script TOPs' callbacks (input_top_callbacks.py, output_top_callbacks.py) hold an ``InputSender`` /
``OutputReceiver`` (td_frames.py) whose ``.status`` says what last happened to the link (connected,
reconnected after a crash, a new bridge took over, lost) and ``.reconnects`` counts the reconnects. In
``onCook`` they call ``publish``: the text and the count go into the Script TOP's own storage
(TouchDesigner's documented ``OP.store`` / ``OP.fetch``), written only when they change, each with a startup
value of None (``OP.storeStartupValue``) so a saved project never reopens showing the last session's link.
The component's Execute DAT reads them back every frame with ``read`` (component.show_links) into the
read-only *Input Link* / *Output Link* readouts. Works without the component too: the storage is there for
anything that wants it (``op('input_top').fetch('rtd_link', None)``).

Standard library only (pasted into a DAT it needs nothing else).
"""

from __future__ import annotations

TEXT_KEY = "rtd_link"  # str: what happened last to the link, and what is wrong now if anything
RECONNECTS_KEY = "rtd_link_reconnects"  # int: times a new bridge was picked up after the link was lost


def describe(link, name: str) -> str:
    """One line for the artist: the link's last event, then the problem now if it is another one."""
    status, error = str(link.status), link.error
    if not name:
        return "not connected: no ring name yet (the engine announces it once it is ready)"
    if error and error != status:
        return f"{status}: {error}" if status == "not connected" else f"{status}; now: {error}"
    return status


def publish(top, link, name: str) -> None:
    """Store ``link``'s state on Script TOP ``top`` if it changed (call from onCook; cheap when nothing did)."""
    for key, value in ((TEXT_KEY, describe(link, name)), (RECONNECTS_KEY, int(link.reconnects))):
        if top.fetch(key, None, search=False) != value:
            top.store(key, value)
            top.storeStartupValue(key, None)  # reset when the project is next opened: no stale link state


def read(top) -> tuple[str, int]:
    """(text, reconnects) stored on Script TOP ``top``; ("", 0) before its first cook of this session."""
    text = top.fetch(TEXT_KEY, None, search=False)
    count = top.fetch(RECONNECTS_KEY, None, search=False)
    return (text if isinstance(text, str) else ""), (count if isinstance(count, int) else 0)
