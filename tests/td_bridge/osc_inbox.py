"""A real OSC listener on loopback for the bridge tests: everything the bridge sends, collected on a thread."""

from __future__ import annotations

import socket
import threading
import time

from pythonosc.osc_packet import OscPacket


class Inbox:
    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.messages, self.lock, self.running = [], threading.Lock(), True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.running:
            try:
                dgram = self.sock.recv(65536)
            except (socket.timeout, OSError):
                continue
            with self.lock:
                self.messages += [(m.message.address, tuple(m.message.params)) for m in OscPacket(dgram).messages]

    def all(self, address, after=0):
        """Arguments of every ``address`` message received (after message number ``after``)."""
        with self.lock:
            return [p for a, p in self.messages[after:] if a == address]

    def mark(self):
        """The number of messages so far: pass it as ``after`` to look only at what comes next."""
        with self.lock:
            return len(self.messages)

    def wait(self, address, pred=lambda p: True, timeout=60.0, after=0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for p in self.all(address, after):
                if pred(p):
                    return p
            time.sleep(0.01)
        with self.lock:
            seen = sorted({a for a, _ in self.messages})
        raise AssertionError(f"no {address} within {timeout}s; got {seen}")

    def close(self):
        self.running = False
        self.thread.join()
        self.sock.close()
