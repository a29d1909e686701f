"""Record the output to a video file (H.264 in MP4 through PyAV) on the server, for download from the page.

Cross-thread protocol::

    request thread              worker thread (worker.py)            encoder thread (_encode)
    --------------              -------------------------            ------------------------
    start() --lock--> open the  add(out) --lock--> recording?        queue.get() -> frame with pts = ms since
      container, start the         queue.put_nowait(image, t)          the first frame (real timing, VFR)
      encoder thread               full? dropped += 1                  encode, mux
    stop() --lock--> put STOP,                                        STOP -> flush, close the container
      join the encoder, return
      the file's name and counts

The worker never waits on the encoder: a full queue drops the frame and counts it. Files are named
``rtdiffusion-YYYYmmdd-HHMMSS[-N].mp4`` in one folder; ``path_of`` only resolves names of that form.
"""

from __future__ import annotations

import logging
import queue
import re
import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

NAME = re.compile(r"^rtdiffusion-\d{8}-\d{6}(-\d+)?\.mp4$")
QUEUE_FRAMES = 32
_STOP = object()


class RecordingError(RuntimeError):
    """Start while recording, stop while not, or a container that could not be opened."""


class Recorder:
    """folder: where files go (created at the first recording; None = a new temporary folder then).
    width, height: the engine's size."""

    def __init__(self, folder: str | None, width: int, height: int) -> None:
        self._given = Path(folder) if folder else None
        self.folder: Path | None = None  # made at the first start(), so a server that never records leaves nothing
        self.width, self.height = width, height
        self._lock = threading.Lock()
        self._queue: queue.Queue[Any] = queue.Queue(QUEUE_FRAMES)
        self._thread: threading.Thread | None = None
        self._name: str | None = None
        self._frames = 0
        self._dropped = 0
        self._started = 0.0
        self._error = ""
        self._last: dict[str, Any] | None = None

    # ---- request threads ------------------------------------------------------------------------------------
    def start(self) -> dict[str, Any]:
        import av  # PyAV: a core dependency (video files in `rtdiffusion run`)

        with self._lock:
            if self._thread is not None:
                raise RecordingError(f"already recording to {self._name}; stop it first")
            if self.folder is None:
                try:
                    if self._given is not None:
                        self._given.mkdir(parents=True, exist_ok=True)
                    self.folder = self._given or Path(tempfile.mkdtemp(prefix="rtdiffusion-recordings-"))
                except OSError as exc:
                    raise RecordingError(f"cannot make the recordings folder {self._given or 'in the temp folder'}: "
                                         f"{exc.strerror or exc}") from None
            name = self._new_name()
            path = self.folder / name
            try:
                container = av.open(str(path), mode="w")
                codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
                stream = container.add_stream(codec, rate=30)
                stream.width, stream.height, stream.pix_fmt = self.width, self.height, "yuv420p"
                stream.codec_context.time_base = Fraction(1, 1000)  # pts in ms: the frames' real timing
            except Exception as exc:
                raise RecordingError(f"could not open {path} for writing: {exc}") from None
            self._queue = queue.Queue(QUEUE_FRAMES)
            self._name, self._frames, self._dropped, self._error = name, 0, 0, ""
            self._started = time.monotonic()
            self._thread = threading.Thread(target=self._encode, args=(container, stream, self._queue),
                                            name="rtdiffusion-demo-recorder", daemon=True)
            self._thread.start()
            log.info("recording the output to %s", path)
            return self._status_locked()

    def stop(self) -> dict[str, Any]:
        with self._lock:
            thread = self._thread
            if thread is None:
                raise RecordingError("not recording; start a recording first")
            self._queue.put(_STOP)  # blocks only while the encoder drains a full queue
            thread.join()
            self._thread = None
            path = self.folder / self._name
            if self._frames == 0:  # nothing to offer: no empty, unplayable file is left behind
                path.unlink(missing_ok=True)
                self._error = self._error or "no output frames arrived while recording (is a source running?)"
            info = {"file": self._name if self._frames else None,
                    "url": f"/api/recordings/{self._name}" if self._frames else None, "frames": self._frames,
                    "dropped": self._dropped, "seconds": round(time.monotonic() - self._started, 2),
                    "bytes": path.stat().st_size if self._frames else 0, "error": self._error}
            self._last = info
            log.info("recorded %d frames to %s (%d dropped)%s", self._frames, path, self._dropped,
                     f"; {self._error}" if self._error else "")
            return {**self._status_locked(), "last": info}

    def close(self) -> None:
        """Finish a recording in progress (server shutdown): the file is complete and playable."""
        if self._thread is not None:
            try:
                self.stop()
            except RecordingError:
                pass

    def status(self) -> dict[str, Any]:
        with self._lock:
            return self._status_locked()

    def path_of(self, name: str) -> Path | None:
        """The file for a name this recorder made, or None (never a path outside its folder)."""
        if not NAME.match(name) or self.folder is None:
            return None
        path = self.folder / name
        return path if path.is_file() else None

    # ---- worker thread --------------------------------------------------------------------------------------
    def add(self, image: np.ndarray) -> None:
        """Queue one output frame ([H, W, 3] uint8, not modified afterwards) if recording; never blocks."""
        if self._thread is None:
            return
        try:
            self._queue.put_nowait((image, time.monotonic()))
        except queue.Full:
            self._dropped += 1

    # ---- encoder thread -------------------------------------------------------------------------------------
    def _encode(self, container: Any, stream: Any, frames: queue.Queue) -> None:
        import av

        first, last_pts, stopped = None, -1, False
        try:
            while True:
                item = frames.get()
                if item is _STOP:
                    stopped = True
                    break
                image, t = item
                if first is None:
                    first = t
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
                frame.pts = last_pts = max(last_pts + 1, round((t - first) * 1000.0))
                frame.time_base = Fraction(1, 1000)
                for packet in stream.encode(frame):
                    container.mux(packet)
                self._frames += 1
            for packet in stream.encode():  # flush
                container.mux(packet)
        except Exception as exc:
            log.exception("recording failed")
            self._error = f"{type(exc).__name__}: {exc}"[:300]
            while not stopped and frames.get() is not _STOP:  # let stop() finish
                pass
        finally:
            container.close()

    def _new_name(self) -> str:
        base = time.strftime("rtdiffusion-%Y%m%d-%H%M%S")
        name, n = f"{base}.mp4", 1
        while (self.folder / name).exists():
            n += 1
            name = f"{base}-{n}.mp4"
        return name

    def _status_locked(self) -> dict[str, Any]:
        return {"recording": self._thread is not None, "file": self._name if self._thread else None,
                "frames": self._frames, "dropped": self._dropped, "error": self._error, "last": self._last}
