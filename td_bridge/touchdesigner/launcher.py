"""Starts and stops the engine process (``rtdiffusion td ...``) from TouchDesigner.

The engine runs in its own Python environment (torch, CUDA). Inside TouchDesigner ``sys.executable`` is
TouchDesigner itself, so the launcher never uses it: the component's *Python* parameter names the engine
environment's interpreter (``C:\\rtd\\.venv\\Scripts\\python.exe``, ``~/rtd/.venv/bin/python``), and the
command is::

    <python> -c "import sys; from rtdiffusion.cli import main; sys.exit(main(sys.argv[1:]))" td --model ...

(the same entry point as the ``rtdiffusion`` script, found through the interpreter rather than PATH).
TouchDesigner's own PYTHONHOME / PYTHONPATH are removed from the child's environment so they cannot leak
TouchDesigner's site-packages into the engine; the repository root, if given, becomes the child's
PYTHONPATH. Output goes to a log file (a pipe nobody reads would fill up and stall the engine).

Stopping: OSC ``/stop`` first (the bridge then unlinks its rings and says ``/server_active 0``), then
terminate after ``grace_s``, then kill. ``stop(wait=False)`` does the waiting on a thread, so a Stop button
never stalls TouchDesigner's frame; at exit the Execute DAT calls ``stop(wait=True)``.

Processes live in a registry keyed by component path, in this imported module: recompiling a DAT does not
lose track of a running engine.
"""

from __future__ import annotations

import atexit
import logging
import os
import shlex
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

ENTRY = "import sys; from rtdiffusion.cli import main; sys.exit(main(sys.argv[1:]))"
# Variables TouchDesigner (or a macOS app bundle) sets for its own Python that must not reach the engine's.
_TD_PYTHON_VARS = ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONEXECUTABLE", "__PYVENV_LAUNCHER__",
                   "PYTHONNOUSERSITE")


class LaunchError(ValueError):
    """The engine cannot be started as configured; the text says what to set."""


@dataclass(frozen=True)
class LaunchSettings:
    python: str
    model: str
    width: int = 512
    height: int = 512
    control_port: int = 8247  # the bridge listens here (--osc-in-port)
    status_port: int = 8248  # the bridge sends status here (--osc-out-port)
    host: str = "127.0.0.1"
    input_name: str = ""
    output_name: str = ""
    prompt: str = ""
    seed: int = 2
    extra_args: str = ""  # e.g. "--device cuda --backend trt"
    repo: str = ""  # repository root: the child's PYTHONPATH (for a checkout that is not pip-installed)
    log_file: str = ""
    flip_rows: bool = True
    conditioning: tuple[str, ...] = ()  # --controlnet / --ip-adapter flags (controls.launch_args)

    def check(self) -> None:
        py = self.python.strip()
        if not py:
            raise LaunchError("set Python to the engine environment's interpreter, e.g. "
                              r"C:\rtd\.venv\Scripts\python.exe or ~/rtd/.venv/bin/python")
        name = Path(py).name.lower()
        if not name.startswith("python"):
            raise LaunchError(f"Python must be the engine environment's python executable; got {py!r} "
                              "(inside TouchDesigner sys.executable is TouchDesigner itself, never use it)")
        if not Path(py).expanduser().is_file():
            raise LaunchError(f"Python {py!r} does not exist; point it at the engine environment's interpreter")
        if not self.model.strip():
            raise LaunchError("set Model (a hub id such as stabilityai/sd-turbo, a local folder, or random:tiny)")
        for label, v in (("Width", self.width), ("Height", self.height)):
            if not 8 <= int(v) <= 8192:
                raise LaunchError(f"{label} must be from 8 to 8192; got {v}")
        for label, v in (("Control port", self.control_port), ("Status port", self.status_port)):
            if not 1 <= int(v) <= 65535:
                raise LaunchError(f"{label} must be from 1 to 65535; got {v}")
        try:
            shlex.split(self.extra_args)
        except ValueError as exc:
            raise LaunchError(f"Extra arguments cannot be parsed ({exc}): {self.extra_args!r}") from None
        if self.repo and not Path(self.repo).expanduser().is_dir():
            raise LaunchError(f"Repository folder {self.repo!r} does not exist")

    def command(self) -> list[str]:
        cmd = [str(Path(self.python.strip()).expanduser()), "-c", ENTRY, "td", "--model", self.model.strip(),
               "--width", str(int(self.width)), "--height", str(int(self.height)),
               "--osc-in-port", str(int(self.control_port)), "--osc-out-port", str(int(self.status_port)),
               "--osc-host", self.host, "--seed", str(int(self.seed))]
        if self.flip_rows:
            cmd.append("--flip-rows")  # rings in TouchDesigner's bottom-up row order: no flip in its Python
        if self.input_name.strip():
            cmd += ["--input-name", self.input_name.strip()]
        if self.output_name.strip():
            cmd += ["--output-name", self.output_name.strip()]
        if self.prompt:
            cmd += ["--prompt", self.prompt]
        return cmd + list(self.conditioning) + shlex.split(self.extra_args)

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _TD_PYTHON_VARS}
        if self.repo:
            env["PYTHONPATH"] = str(Path(self.repo).expanduser())
        env.setdefault("PYTHONUNBUFFERED", "1")  # the log file shows progress as it happens
        return env


@dataclass
class EngineProcess:
    """One running engine. ``stop`` is idempotent."""

    proc: subprocess.Popen
    command: list[str]
    log_file: str
    exit_reported: bool = False  # the component has shown that it exited
    stop_requested: bool = False  # stop() was called: an exit is expected, not an error
    _stopping: threading.Thread | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, send_stop: Callable[[], None] | None = None, grace_s: float = 5.0, wait: bool = True,
             kill_after_s: float = 5.0) -> None:
        if not self.running():
            return
        self.stop_requested = True
        if send_stop is not None:
            try:
                send_stop()
            except Exception as exc:  # an OSC Out DAT that is gone must not keep the process alive
                log.warning("could not send /stop: %s", exc)
        if wait:
            self._finish(grace_s, kill_after_s)
        elif self._stopping is None:
            self._stopping = threading.Thread(target=self._finish, args=(grace_s, kill_after_s),
                                              name="rtdiffusion-stop", daemon=True)
            self._stopping.start()

    def _finish(self, grace_s: float, kill_after_s: float) -> None:
        if grace_s > 0:
            try:
                self.proc.wait(timeout=grace_s)
                return
            except subprocess.TimeoutExpired:
                log.warning("engine %d did not stop within %.0f s of /stop; terminating", self.pid, grace_s)
        self.proc.terminate()  # SIGTERM: the bridge unlinks its rings; on Windows TerminateProcess
        try:
            self.proc.wait(timeout=kill_after_s)
        except subprocess.TimeoutExpired:
            log.warning("engine %d ignored terminate; killing it", self.pid)
            self.proc.kill()
            self.proc.wait()

    def last_log_line(self) -> str:
        """The engine's last non-empty output line (usually the reason it exited), at most 300 characters."""
        try:
            with open(self.log_file, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
                lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return lines[-1][:300] if lines else ""

    def wait_stopped(self, timeout: float) -> bool:
        """Block until a ``stop(wait=False)`` has finished (for tests and exit)."""
        if self._stopping is not None:
            self._stopping.join(timeout)
        return not self.running()


_engines: dict[str, EngineProcess] = {}
_lock = threading.Lock()


def start(key: str, settings: LaunchSettings) -> EngineProcess:
    """Start the engine for component ``key`` (its path). Raises LaunchError if it is misconfigured or one is
    already running for this component."""
    settings.check()
    with _lock:
        current = _engines.get(key)
        if current is not None and current.running():
            raise LaunchError(f"the engine for {key} is already running (pid {current.pid}); press Stop first")
        log_file = settings.log_file or str(Path(tempfile.gettempdir()) /
                                            f"rtdiffusion_td_{key.strip('/').replace('/', '_') or 'root'}.log")
        cmd = settings.command()
        flags = getattr(subprocess, "CREATE_NO_WINDOW", 0) if os.name == "nt" else 0
        with open(log_file, "w", encoding="utf-8") as out:  # the child keeps its own handle
            out.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
            out.flush()
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=settings.environment(), cwd=settings.repo or None, creationflags=flags)
        engine = EngineProcess(proc, cmd, log_file)
        if not _engines:
            atexit.register(stop_all)  # the process ends without onExit (a script quit): no engine left behind
        _engines[key] = engine
    log.info("started engine pid %d: %s (log %s)", proc.pid, " ".join(cmd), log_file)
    return engine


def get(key: str) -> EngineProcess | None:
    return _engines.get(key)


def stop(key: str, send_stop: Callable[[], None] | None = None, wait: bool = False,
         grace_s: float = 5.0) -> EngineProcess | None:
    """Stop component ``key``'s engine (no-op if none runs). Returns it (to wait on) or None."""
    with _lock:
        engine = _engines.get(key)
    if engine is not None:
        engine.stop(send_stop, grace_s=grace_s, wait=wait)
    return engine


def forget_stopped() -> None:
    """Drop engines that have exited from the registry (after their exit was shown)."""
    with _lock:
        for key in [k for k, e in _engines.items() if not e.running()]:
            del _engines[key]


def running_keys() -> list[str]:
    return [key for key, engine in list(_engines.items()) if engine.running()]


def stop_all(wait: bool = True, grace_s: float = 3.0) -> None:
    for key in list(_engines):
        stop(key, wait=wait, grace_s=grace_s)
