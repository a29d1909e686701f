"""OSC for a multi-stream bridge: one namespace per stream (``/stream/<i>/...``), replies per stream.

Addresses (``rtdiffusion td --streams N``; docs/touchdesigner.md, "Several streams from one engine")::

    /stream/<i>/prompt s, /stream/<i>/seed i, /stream/<i>/strength f, ...   stream <i> only (0-based)
    /prompt s, /seed i, /strength f, ...                                    every stream
    /stream/<i>/get_status                                                  -> /stream/<i>/status (JSON)
    /pause /play /process_frame /get_status /stop                           the whole bridge

Every per-stream address the single bridge accepts and a multi-stream group has (prompt, negative prompt,
prompt list and interpolation, seed and seed list, guidance scale, delta, t_list, strength, steps) works in
both forms. The single engine's other controls (similar-frame filter, cached attention, ControlNets,
IP-Adapter) are refused with ``/error`` naming why. A stream index out of range gets ``/error`` naming the
valid range. Values are validated on the receive thread (the single bridge's validators, osc_controls.py)
and go into that stream's Mailbox; the frame loop drains each stream's mailbox between ticks into
``group.stream(i).update(...)``, whose own check (ConfigError) is answered with ``/error`` for that
stream's address.

Replies: ``StreamSender`` prefixes what one stream's parts send (ServedRings' ring events, /frame_ready,
/error about its rings) with ``/stream/<i>``, so ``/error /ring/input`` of stream 1 arrives as
``/error /stream/1/ring/input <reason>``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from rtdiffusion.errors import ConfigError

from .osc import Mailbox, OscReceiver, OscSender
from .osc_controls import ACTIONS, CONTROLS, Action, Key, OscError, _action_fires, lookup
from .stream_settings import SETTING_KEYS, apply_setting

log = logging.getLogger(__name__)

PREFIX = "/stream/"
GROUP_KEYS = SETTING_KEYS  # what a multi-stream group's streams can change
STREAM_ADDRESSES = sorted(a for a, c in CONTROLS.items() if c.key in GROUP_KEYS)
BRIDGE_ACTIONS = (Action.PAUSE, Action.PLAY, Action.PROCESS_FRAME, Action.GET_STATUS, Action.STOP)


def split_stream(address: str, streams: int) -> tuple[int | None, str]:
    """``/stream/<i>/rest`` -> (i, "/rest"); any other address -> (None, address). OscError for a malformed
    prefix or an index outside 0..streams-1."""
    if not address.startswith(PREFIX):
        return None, address
    parts = address.split("/", 3)  # ['', 'stream', i, rest]
    if len(parts) < 4 or not parts[3]:
        raise OscError(f"expected /stream/<i>/<address> with i from 0 to {streams - 1}; got {address[:120]!r}")
    idx = parts[2]
    if not (idx.isascii() and idx.isdigit()) or not 0 <= int(idx) < streams:
        raise OscError(f"stream index must be an integer from 0 to {streams - 1} (this bridge serves {streams} "
                       f"streams); got {idx[:20]!r}")
    return int(idx), "/" + parts[3]


def apply_control(stream: Any, key: Key, value: Any) -> None:
    """One drained OSC value into a group stream's settings (ConfigError when the stream refuses it)."""
    if key not in GROUP_KEYS:  # the receiver refuses every other key; kept as a guard
        raise ConfigError(f"{key.value} is not a per-stream setting of a multi-stream group")
    apply_setting(stream, key, value)


class StreamSender:
    """What stream ``index``'s parts send, under ``/stream/<index>``; /error's address is prefixed too."""

    def __init__(self, sender: OscSender, index: int) -> None:
        self._sender, self.index = sender, index
        self.prefix = f"/stream/{index}"

    def send(self, address: str, *args: Any) -> bool:
        return self._sender.send(self.prefix + address, *args)

    def error(self, address: str, reason: str, logger: Any = None) -> None:
        self._sender.error(self.prefix + address, reason, logger)


class StreamOscReceiver(OscReceiver):
    """The single bridge's receiver, with addresses routed per stream into ``boxes[i]``; the bridge's
    actions (/pause, /play, /process_frame, /stop) go to ``mailbox``.

    on_status(index): the /status JSON text, of the bridge (index None) or of stream ``index``."""

    def __init__(self, host: str, port: int, mailbox: Mailbox, boxes: list[Mailbox], sender: OscSender,
                 on_status: Callable[[int | None], str]) -> None:
        super().__init__(host, port, mailbox, sender, lambda: on_status(None))
        self.boxes = boxes
        self._stream_status = on_status

    def handle_message(self, address: str, args: tuple) -> None:
        self.received += 1
        n = len(self.boxes)
        try:
            index, rest = split_stream(address, n)
            control = lookup(rest)
            if control is not None:
                if control.key not in GROUP_KEYS:
                    raise OscError(f"{rest} is not available on a multi-stream bridge (--streams {n}): a group's "
                                   f"streams take {', '.join(STREAM_ADDRESSES)}; the similar-frame filter, cached "
                                   "attention, ControlNets and IP-Adapters need a single-stream bridge")
                value = control.parse(args)
                for i in (range(n) if index is None else (index,)):
                    self.boxes[i].put(control.key, address, value)
                return
            action = ACTIONS.get(rest)
            if action is None or action not in BRIDGE_ACTIONS:
                raise OscError(f"unknown address; expected /stream/<i>/<address> (i from 0 to {n - 1}) or "
                               f"<address> for every stream, with <address> one of {', '.join(STREAM_ADDRESSES)}; "
                               f"or one of {', '.join(a.value for a in BRIDGE_ACTIONS)}")
            if index is not None and action is not Action.GET_STATUS:
                raise OscError(f"{rest} acts on the whole bridge (every stream); send it as {rest}")
            if not _action_fires(args):
                return
            if action is Action.GET_STATUS:
                self._sender.send("/status" if index is None else f"/stream/{index}/status",
                                  self._stream_status(index))
            else:
                self._mailbox.act(action)
        except (OscError, ConfigError) as exc:
            self.rejected += 1
            self._sender.error(address, str(exc), self.reject_log)
