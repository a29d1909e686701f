"""OSC control in, status out: validated at the boundary, latest value per address wins.

Threads and who touches what::

    OSC receive thread (OscReceiver)          frame loop (bridge.Bridge)            heartbeat thread
    -------------------------------------     ----------------------------------    -------------------
    recvfrom(64 KiB) on a socket with a       between two frames:                   every second:
    4 MiB receive buffer                        mailbox.drain() -> [(key, value)]     /server_active 1
    parse (python-osc OscPacket)                apply each to the engine, in the      state, fps, names
    validate (CONTROLS, osc_controls)           order the keys last arrived
      bad   -> /error address reason          actions (pause, play, step, stop)
      value -> mailbox.put(key, value)          are kept in arrival order, not overwritten
      /get_status -> /status JSON at once

The mailbox is the only state the receive thread shares with the frame loop; it is guarded by one lock held
for a dict update. Nothing the receive thread does waits for the frame loop, so a burst of hundreds of
messages is drained from the socket as fast as it arrives (python-osc's stock servers read 8 KiB datagrams
and dispatch on the socket thread; this receiver reads whole 64 KiB datagrams).

Addresses and their validators: osc_controls.py.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Iterable

from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.osc_packet import OscPacket

from rtdiffusion.errors import ConfigError

from .osc_controls import (ACTIONS, ADDRESSES, CONTROLS, MAX_LIST_ITEMS, MAX_TEXT, Action, Control, Key,  # noqa: F401
                           OscError, _action_fires, lookup)

log = logging.getLogger(__name__)

MAX_PACKET = 65536
MAX_DATAGRAM = 65507  # the largest UDP payload over IPv4; a bigger reply cannot be sent at all
MAX_STATUS = 60000  # /status JSON is shortened to fit one datagram with room for the OSC framing
MAX_LOGGED_ADDRESS = 120  # an address is cut to this many characters in log lines and /error replies
LOG_BURST = 5  # rejected messages logged per LOG_WINDOW_S; the rest are counted and summed up once
LOG_WINDOW_S = 10.0
RECV_BUFFER = 4 * 1024 * 1024


# -------------------------------------------------------------------------------------------------- mailbox
class Mailbox:
    """Latest value per key, in the order keys last arrived; actions kept in arrival order. Thread-safe.

    Actions come back from ``drain`` as runs ``[(action, count), ...]`` in the order they arrived, so the frame
    loop can tell "/process_frame then /pause" (the step came while streaming: dropped) from "/pause then
    /process_frame" (one step) even when both arrive between the same two frames."""

    MAX_RUNS = 256  # a flood of alternating actions between two frames keeps only the newest runs

    def __init__(self, stop: threading.Event | None = None) -> None:
        self._lock = threading.Lock()
        self._values: OrderedDict[Key, tuple[str, Any]] = OrderedDict()  # key -> (address, value)
        self.stop = stop or threading.Event()  # set at once by /stop; a loading bridge checks it
        # between load stages (after the model loads, after the warm-up frame), not inside them
        self._actions: list[tuple[Action, int]] = []
        self.changed = threading.Event()  # set on every put, so an idle frame loop can wake at once

    def put(self, key: Key, address: str, value: Any) -> None:
        with self._lock:
            self._values[key] = (address, value)
            self._values.move_to_end(key)
        self.changed.set()

    def merge(self, key: Key, address: str, units: dict[int, dict[str, Any]]) -> None:
        """Per-unit partial updates (ControlNets): merged field by field with what is pending, so
        /controlnet/0/scale and /controlnet/1/scale between two frames both arrive. The value drained is
        {index: (address of the unit's last message, {field: value})}."""
        with self._lock:
            _, pending = self._values.pop(key, ("", {}))
            for index, fields in units.items():
                _, old = pending.get(index, ("", {}))
                pending[index] = (address, {**old, **fields})
            self._values[key] = (address, pending)
        self.changed.set()

    def act(self, action: Action) -> None:
        with self._lock:
            runs = self._actions
            if runs and runs[-1][0] is action:
                runs[-1] = (action, runs[-1][1] + 1)
            else:
                runs.append((action, 1))
                if len(runs) > self.MAX_RUNS:
                    del runs[0]
        if action is Action.STOP:
            self.stop.set()
        self.changed.set()

    def drain(self) -> tuple[list[tuple[Key, tuple[str, Any]]], list[tuple[Action, int]]]:
        with self._lock:
            values, actions = list(self._values.items()), self._actions
            self._values.clear()
            self._actions = []
            self.changed.clear()
        return values, actions


def clip(text: str, limit: int = MAX_LOGGED_ADDRESS) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was (for log lines and /error replies)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class RateLimitedLog:
    """At most ``burst`` warnings per ``window`` seconds; the rest are counted and reported in one line when
    the next window opens. Thread-safe."""

    def __init__(self, logger: logging.Logger, burst: int = LOG_BURST, window: float = LOG_WINDOW_S) -> None:
        self._log, self._burst, self._window = logger, burst, window
        self._lock = threading.Lock()
        self._start = -1e18
        self._count = 0
        self.suppressed = 0  # in the current window
        self.suppressed_total = 0

    def warning(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._start >= self._window:
                if self.suppressed:
                    self._log.warning("%d more rejected OSC messages in the last %.0f s were not logged (each got "
                                      "its /error reply)", self.suppressed, now - self._start)
                self._start, self._count, self.suppressed = now, 0, 0
            self._count += 1
            if self._count > self._burst:
                self.suppressed += 1
                self.suppressed_total += 1
                return
        self._log.warning(msg, *args)


# --------------------------------------------------------------------------------------------------- sender
class OscSender:
    """Sends OSC messages to one host:port. Thread-safe (one datagram per message).

    A message too big for one UDP datagram is not sent: that is logged as a warning and answered with a
    short ``/error <address> <reason>`` instead (never silently dropped)."""

    def __init__(self, host: str, port: int) -> None:
        self.address = (host, port)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_DGRAM)

    def send(self, address: str, *args: Any) -> bool:
        """Send one message; False when it was not sent (too big, or the socket refused it)."""
        b = OscMessageBuilder(address)
        for a in args:
            if isinstance(a, bool):
                b.add_arg(int(a), "i")
            elif isinstance(a, int):
                b.add_arg(a, "i" if -2**31 <= a < 2**31 else "h")
            elif isinstance(a, float):
                b.add_arg(a, "f")
            else:
                b.add_arg(str(a), "s")
        dgram = b.build().dgram
        if len(dgram) > MAX_DATAGRAM:
            reason = (f"the {clip(address)} reply is {len(dgram)} bytes, over the {MAX_DATAGRAM}-byte limit of "
                      f"one UDP datagram; not sent")
            log.warning("OSC: %s", reason)
            if address != "/error":
                self.send("/error", address[:MAX_LOGGED_ADDRESS], reason)
            return False
        try:
            self._sock.sendto(dgram, self.address)
        except OSError as exc:  # nobody listening is not an error for UDP, but e.g. a bad host is
            log.debug("OSC send %s to %s failed: %s", clip(address), self.address, exc)
            return False
        return True

    def error(self, address: str, reason: str, logger: "RateLimitedLog | logging.Logger | None" = None) -> None:
        """Log (at warning, through ``logger`` if given) and send ``/error address reason``; the address is
        cut to MAX_LOGGED_ADDRESS characters in both, the reason to 1000."""
        address, reason = clip(address), clip(reason, 1000)
        (logger or log).warning("OSC %s rejected: %s", address, reason)
        self.send("/error", address, reason)

    def close(self) -> None:
        self._sock.close()


# ------------------------------------------------------------------------------------------------- receiver
class OscReceiver:
    """Receive thread: whole datagrams up to 64 KiB, validated, into a Mailbox; errors go out as /error.

    ``on_status`` is called on the receive thread for /get_status and returns the JSON text to send.
    """

    def __init__(self, host: str, port: int, mailbox: Mailbox, sender: OscSender,
                 on_status: Callable[[], str]) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
        self.recv_buffer = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        if self.recv_buffer < RECV_BUFFER // 2:
            log.warning("OSC receive buffer is %d bytes (asked for %d); a large burst may be dropped. On Linux "
                        "raise it with: sysctl -w net.core.rmem_max=%d", self.recv_buffer, RECV_BUFFER, RECV_BUFFER)
        try:
            self._sock.bind((host, port))
        except OSError as exc:
            self._sock.close()
            raise OscError(f"cannot listen for OSC on {host}:{port}: {exc.strerror or exc}; "
                           f"choose another --osc-in-port") from None
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._mailbox = mailbox
        self._sender = sender
        self._on_status = on_status
        self._stop = threading.Event()
        self._buf = bytearray(MAX_PACKET)
        self.received = 0
        self.rejected = 0
        self.reject_log = RateLimitedLog(log)  # a flood of bad messages gives a few lines, not one each
        self._thread = threading.Thread(target=self._run, name="osc-receive", daemon=True)

    def start(self) -> "OscReceiver":
        self._thread.start()
        return self

    def _run(self) -> None:
        view = memoryview(self._buf)
        while not self._stop.is_set():
            try:
                n, _peer = self._sock.recvfrom_into(self._buf, MAX_PACKET)
            except socket.timeout:
                continue
            except OSError as exc:
                if self._stop.is_set():
                    return
                log.debug("OSC receive: %s", exc)  # e.g. Windows reports an ICMP port unreachable here
                continue
            self.handle_datagram(bytes(view[:n]))

    def handle_datagram(self, dgram: bytes) -> None:
        try:
            messages = [m.message for m in OscPacket(dgram).messages]
        except Exception as exc:  # python-osc raises ParseError, and IndexError/struct.error on some garbage
            self.rejected += 1
            self._sender.error("", f"not a valid OSC packet ({len(dgram)} bytes): {str(exc)[:120]}",
                               self.reject_log)
            return
        for msg in messages:
            self.handle_message(msg.address, tuple(msg.params))

    def handle_message(self, address: str, args: tuple) -> None:
        self.received += 1
        try:
            control = lookup(address)
            if control is not None:
                if control.merge:
                    self._mailbox.merge(control.key, address, control.parse(args))
                else:
                    self._mailbox.put(control.key, address, control.parse(args))
                return
            action = ACTIONS.get(address)
            if action is None:
                raise OscError(f"unknown address; expected one of {', '.join(ADDRESSES)}")
            if not _action_fires(args):
                return
            if action is Action.GET_STATUS:
                self._sender.send("/status", self._on_status())
            else:
                self._mailbox.act(action)
        except (OscError, ConfigError) as exc:
            self.rejected += 1
            self._sender.error(address, str(exc), self.reject_log)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)
        self._sock.close()


def status_json(fields: dict[str, Any], limit: int = MAX_STATUS) -> str:
    """JSON for /status; non-finite numbers become null so every reader can parse it.

    Kept under ``limit`` characters so it fits one UDP datagram: when the full text is longer (long prompts,
    long prompt lists), texts are cut to 200 characters and lists to 16 items, and a ``truncated`` field says
    so; if that is still too long, only the top-level numbers and short texts are kept."""
    def clean(v: Any, text: int | None = None, items: int | None = None) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x, text, items) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x, text, items) for x in (v if items is None else v[:items])]
        if isinstance(v, str):
            return v if text is None else clip(v, text)
        if isinstance(v, (int, float, bool)) or v is None:
            return v
        return clean(str(v), text, items)

    full = json.dumps(clean(fields), separators=(",", ":"))
    if len(full) <= limit:
        return full
    note = (f"status was {len(full)} characters, over what one UDP datagram carries; texts were cut to 200 "
            f"characters and lists to 16 items")
    short = json.dumps({**clean(fields, 200, 16), "truncated": note}, separators=(",", ":"))
    if len(short) <= limit:
        return short
    top = {k: clean(v, 200) for k, v in fields.items() if not isinstance(v, (dict, list, tuple))}
    return json.dumps({**top, "truncated": note + "; nested fields were left out"}, separators=(",", ":"))


def addresses() -> Iterable[str]:
    return ADDRESSES
