"""OSC control in, status out: validated at the boundary, latest value per address wins.

Threads and who touches what::

    OSC receive thread (OscReceiver)          frame loop (bridge.Bridge)            heartbeat thread
    -------------------------------------     ----------------------------------    -------------------
    recvfrom(64 KiB) on a socket with a       between two frames:                   every second:
    4 MiB receive buffer                        mailbox.drain() -> [(key, value)]     /server_active 1
    parse (python-osc OscPacket)                apply each to the engine, in the      state, fps, names
    validate (CONTROLS table below)             order the keys last arrived
      bad   -> /error address reason          actions (pause, play, step, stop)
      value -> mailbox.put(key, value)          are kept in arrival order, not overwritten
      /get_status -> /status JSON at once

The mailbox is the only state the receive thread shares with the frame loop; it is guarded by one lock held
for a dict update. Nothing the receive thread does waits for the frame loop, so a burst of hundreds of
messages is drained from the socket as fast as it arrives (python-osc's stock servers read 8 KiB datagrams
and dispatch on the socket thread; this receiver reads whole 64 KiB datagrams).

Addresses (the names StreamDiffusionTD users know)::

    /prompt s                text
    /negative_prompt s       text
    /prompt_list s           JSON [[text, weight], ...], weights finite >= 0, sum > 0
    /prompt_interpolation s  "linear" | "slerp"
    /seed i                  0 .. 2**63-1 (an integral float such as 42.0 from a CHOP is accepted)
    /seed_list s             JSON [[seed, weight], ...]
    /guidance_scale f        0 .. 30
    /delta f                 0 .. 10
    /t_list i...             1 to 16 step indices, strictly increasing
    /similar_filter f        0 = off; 0 < threshold <= 1 = on with that cosine-similarity threshold
    /cached_attention s      JSON {"enabled": bool, "maxframes": 1..16, "interval": 1..1000}, any subset
    /pause /play /process_frame /get_status /stop
                             no argument, or one number (0 / false is ignored: a pulse's release)
"""

from __future__ import annotations

import enum
import json
import logging
import math
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.osc_packet import OscPacket

from rtdiffusion.config import PromptBlend, PromptSpec, SeedSpec, parse_enum
from rtdiffusion.errors import ConfigError

log = logging.getLogger(__name__)

MAX_PACKET = 65536
MAX_DATAGRAM = 65507  # the largest UDP payload over IPv4; a bigger reply cannot be sent at all
MAX_STATUS = 60000  # /status JSON is shortened to fit one datagram with room for the OSC framing
MAX_LOGGED_ADDRESS = 120  # an address is cut to this many characters in log lines and /error replies
LOG_BURST = 5  # rejected messages logged per LOG_WINDOW_S; the rest are counted and summed up once
LOG_WINDOW_S = 10.0
RECV_BUFFER = 4 * 1024 * 1024
MAX_TEXT = 60000
MAX_LIST_ITEMS = 1024


class OscError(ValueError):
    """A message that cannot be applied; the text says what was expected."""


class Key(enum.Enum):
    """What a control message sets. Messages with the same key overwrite each other (latest wins)."""

    PROMPT = "prompt"  # /prompt and /prompt_list
    NEGATIVE_PROMPT = "negative_prompt"
    PROMPT_INTERPOLATION = "prompt_interpolation"
    SEED = "seed"  # /seed and /seed_list
    GUIDANCE_SCALE = "guidance_scale"
    DELTA = "delta"
    T_LIST = "t_list"
    SIMILAR_FILTER = "similar_filter"
    CACHED_ATTENTION = "cached_attention"


class Action(enum.Enum):
    PAUSE = "/pause"
    PLAY = "/play"
    PROCESS_FRAME = "/process_frame"
    GET_STATUS = "/get_status"
    STOP = "/stop"


# ----------------------------------------------------------------------------------------------- validators
def _one(args: tuple, what: str) -> Any:
    if len(args) != 1:
        raise OscError(f"expected one {what} argument; got {len(args)}")
    return args[0]


def _text(args: tuple) -> str:
    v = _one(args, "string")
    if not isinstance(v, str):
        raise OscError(f"expected a string; got {_type(v)}")
    if len(v) > MAX_TEXT:
        raise OscError(f"text is {len(v)} characters; at most {MAX_TEXT}")
    return v


def _number(v: Any, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise OscError(f"expected a number from {lo:g} to {hi:g}; got {_type(v)}")
    if not math.isfinite(v):
        raise OscError(f"expected a finite number from {lo:g} to {hi:g}; got {v!r}")
    if not lo <= v <= hi:
        raise OscError(f"expected a number from {lo:g} to {hi:g}; got {v!r}")
    return float(v)


def _integer(v: Any, lo: int, hi: int) -> int:
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        v = int(v)  # OSC Out CHOPs send every channel as a float
    if isinstance(v, bool) or not isinstance(v, int):
        raise OscError(f"expected an integer from {lo} to {hi}; got {_type(v)}")
    if not lo <= v <= hi:
        raise OscError(f"expected an integer from {lo} to {hi}; got {v}")
    return v


def _type(v: Any) -> str:
    if isinstance(v, float):
        return f"float {v!r}"
    if isinstance(v, str):
        return f"string {v[:40]!r}" + ("..." if len(v) > 40 else "")
    if isinstance(v, (bytes, bytearray)):
        return f"blob of {len(v)} bytes"
    return f"{type(v).__name__} {v!r}"[:80]


def _reject_constant(name: str) -> Any:
    raise OscError(f"JSON may not hold {name}; numbers must be finite")


def _json(args: tuple, shape: str) -> Any:
    text = _text(args)
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except OscError:
        raise
    except (ValueError, RecursionError) as exc:
        raise OscError(f"expected JSON {shape}; could not parse it: {str(exc)[:120]}") from None


def _pair_list(args: tuple, shape: str, parse):
    """A JSON list of [value, weight] pairs, parsed by the engine's own PromptSpec / SeedSpec rules."""
    v = _json(args, shape)
    if not isinstance(v, list) or not v or len(v) > MAX_LIST_ITEMS:
        raise OscError(f"expected a JSON list of 1 to {MAX_LIST_ITEMS} pairs {shape}; got {_type(v)}")
    try:
        return parse([tuple(p) if isinstance(p, list) else p for p in v])
    except ConfigError as exc:
        raise OscError(str(exc)) from None


def _prompt_list(args: tuple) -> PromptSpec:
    return _pair_list(args, '[["text", weight], ...]', PromptSpec.parse)


def _seed(args: tuple) -> SeedSpec:
    return SeedSpec.parse(_integer(_one(args, "integer"), 0, 2**63 - 1))


def _seed_list(args: tuple) -> SeedSpec:
    return _pair_list(args, "[[seed, weight], ...]", SeedSpec.parse)


def _interpolation(args: tuple) -> PromptBlend:
    try:
        return parse_enum(PromptBlend, _text(args), "prompt interpolation")
    except ConfigError as exc:
        raise OscError(str(exc)) from None


def _t_list(args: tuple) -> tuple[int, ...]:
    if not 1 <= len(args) <= 16:
        raise OscError(f"expected 1 to 16 integer step indices; got {len(args)} arguments")
    t = tuple(_integer(a, 0, 999) for a in args)
    if any(b <= a for a, b in zip(t, t[1:])):
        raise OscError(f"step indices must be strictly increasing (noisiest first); got {list(t)}")
    return t


def _similar_filter(args: tuple) -> tuple[bool, float | None]:
    v = _one(args, "number")
    if isinstance(v, bool):
        return v, None
    threshold = _number(v, 0.0, 1.0)
    return threshold > 0.0, (threshold if threshold > 0.0 else None)


_CACHE_KEYS = {"enabled": "cache_enabled", "maxframes": "cache_maxframes", "interval": "cache_interval"}


def _cached_attention(args: tuple) -> dict[str, Any]:
    shape = '{"enabled": true, "maxframes": 1..16, "interval": 1..1000}'
    v = _json(args, shape)
    if not isinstance(v, dict) or not v:
        raise OscError(f"expected a JSON object {shape}; got {_type(v)}")
    unknown = sorted(set(v) - set(_CACHE_KEYS))
    if unknown:
        raise OscError(f"unknown keys {unknown}; expected any of {sorted(_CACHE_KEYS)}")
    out: dict[str, Any] = {}
    if "enabled" in v:
        if not isinstance(v["enabled"], bool):
            raise OscError(f"'enabled' must be true or false; got {_type(v['enabled'])}")
        out["cache_enabled"] = v["enabled"]
    if "maxframes" in v:
        out["cache_maxframes"] = _integer(v["maxframes"], 1, 16)
    if "interval" in v:
        out["cache_interval"] = _integer(v["interval"], 1, 1000)
    return out


@dataclass(frozen=True)
class Control:
    key: Key
    parse: Callable[[tuple], Any]
    signature: str


CONTROLS: dict[str, Control] = {
    "/prompt": Control(Key.PROMPT, lambda a: PromptSpec.parse(_text(a)), "s"),
    "/negative_prompt": Control(Key.NEGATIVE_PROMPT, _text, "s"),
    "/prompt_list": Control(Key.PROMPT, _prompt_list, "s (JSON)"),
    "/prompt_interpolation": Control(Key.PROMPT_INTERPOLATION, _interpolation, "s"),
    "/seed": Control(Key.SEED, _seed, "i"),
    "/seed_list": Control(Key.SEED, _seed_list, "s (JSON)"),
    "/guidance_scale": Control(Key.GUIDANCE_SCALE, lambda a: _number(_one(a, "number"), 0.0, 30.0), "f"),
    "/delta": Control(Key.DELTA, lambda a: _number(_one(a, "number"), 0.0, 10.0), "f"),
    "/t_list": Control(Key.T_LIST, _t_list, "i..."),
    "/similar_filter": Control(Key.SIMILAR_FILTER, _similar_filter, "f"),
    "/cached_attention": Control(Key.CACHED_ATTENTION, _cached_attention, "s (JSON)"),
}
ACTIONS = {a.value: a for a in Action}
ADDRESSES = sorted([*CONTROLS, *ACTIONS])


def _action_fires(args: tuple) -> bool:
    if not args:
        return True
    if len(args) > 1:
        raise OscError(f"expected no argument or one number; got {len(args)} arguments")
    v = args[0]
    if isinstance(v, (bool, int, float)) and not (isinstance(v, float) and not math.isfinite(v)):
        return bool(v)
    raise OscError(f"expected no argument or one number; got {_type(v)}")


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
            control = CONTROLS.get(address)
            if control is not None:
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
