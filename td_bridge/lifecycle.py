"""What the single bridge (bridge.py) and the multi-stream bridge (multi_bridge.py) share about their life:
the states they announce, ``serve`` (start, load, run, close), the state change sent over OSC, and the
actions that act on the whole bridge (/stop, /pause, /play)."""

from __future__ import annotations

import enum
import logging
import threading
from typing import Any

from .osc_controls import Action

log = logging.getLogger(__name__)


class State(enum.Enum):
    LOADING = "loading"
    BUILDING = "building"
    READY = "ready"
    STREAMING = "streaming"
    PAUSED = "paused"
    ERROR = "error"
    STOPPED = "stopped"


class BridgeLifecycle:
    """Base of Bridge and MultiBridge. A subclass sets ``state`` (State.LOADING), ``_state_lock`` (a Lock),
    ``stop`` (an Event), ``paused`` and ``sender`` (an OscSender or None), and defines start, load, run and
    close."""

    state: State
    stop: threading.Event
    paused: bool
    sender: Any

    def serve(self) -> int:
        """start + load + run + close; returns a process exit code."""
        try:
            self.start()
            if self.stop.is_set():
                return 0
            self.load()
            if self.stop.is_set():  # stopped while loading: load() returned at the next stage boundary
                log.info("stopped while loading")
                return 0
            self.run()
            return 0
        finally:
            self.close()

    def _set_state(self, state: State) -> None:
        with self._state_lock:
            changed = state is not self.state
            self.state = state
        if self.sender is not None and (changed or state in (State.LOADING, State.STOPPED)):
            self.sender.send("/stream-info/state", state.value)

    def _run_action(self, action: Action) -> bool:
        """/stop, /pause or /play (True); any other action is the subclass's (False)."""
        if action is Action.STOP:
            self.stop.set()
        elif action in (Action.PAUSE, Action.PLAY):
            self.paused = action is Action.PAUSE
            self._set_state(State.PAUSED if self.paused else State.STREAMING)
        else:
            return False
        return True
