"""Frame sources and sinks for `rtdiffusion run`: video files (PyAV / FFmpeg), image folders, a test pattern.

Every source yields uint8 [H, W, 3] RGB frames already at the engine's size.
"""

from __future__ import annotations

import os
from fractions import Fraction
from typing import Iterator

import numpy as np

from .errors import ConfigError

VIDEO_EXTS = (".mp4", ".mkv", ".mov", ".webm", ".avi", ".m4v")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def check_source(spec: str) -> None:
    """Check ``spec`` the way open_source will read it, without decoding a frame (before the model loads)."""
    if spec == "synthetic":
        return
    if os.path.isdir(spec):
        if not any(f.lower().endswith(IMAGE_EXTS) for f in os.listdir(spec)):
            raise ConfigError(f"input folder {spec!r} holds no images ({', '.join(IMAGE_EXTS)})")
        return
    if not os.path.exists(spec):
        raise ConfigError(f"input {spec!r} does not exist; expected 'synthetic', a video file or an image folder")
    import av

    try:
        with av.open(spec) as container:
            if not container.streams.video:
                raise ConfigError(f"input {spec!r} has no video stream")
    except av.error.FFmpegError as exc:
        raise ConfigError(f"input {spec!r} is not a readable video file: {exc}") from exc


def check_sink(spec: str) -> None:
    """Check that FrameSink can write ``spec`` (a video file in an existing, writable folder, or a folder)."""
    ext = os.path.splitext(spec)[1].lower()
    if ext in VIDEO_EXTS:
        parent = os.path.dirname(os.path.abspath(spec))
        if not os.path.isdir(parent):
            raise ConfigError(f"output folder {parent!r} does not exist")
        if not os.access(parent, os.W_OK):
            raise ConfigError(f"output folder {parent!r} is not writable")
        if os.path.isdir(spec):
            raise ConfigError(f"output {spec!r} is a folder; expected a video file name")
    elif ext == "":
        if os.path.exists(spec) and not os.path.isdir(spec):
            raise ConfigError(f"output {spec!r} exists and is not a folder")
    else:
        raise ConfigError(f"output {spec!r}: expected a video file ({', '.join(VIDEO_EXTS)}) or a folder")


def open_source(spec: str, width: int, height: int, frames: int | None) -> tuple[Iterator[np.ndarray], int | None, float]:
    """(frames, count if known, fps) for ``synthetic``, a video file or an image folder."""
    if spec == "synthetic":
        from .bench import synthetic_frames

        n = frames or 120
        pattern = synthetic_frames(min(n, 120), height, width)  # a longer run repeats it: memory stays small
        return (pattern[i % len(pattern)] for i in range(n)), n, 30.0
    if os.path.isdir(spec):
        files = sorted(f for f in os.listdir(spec) if f.lower().endswith(IMAGE_EXTS))
        if not files:
            raise ConfigError(f"input folder {spec!r} holds no images ({', '.join(IMAGE_EXTS)})")
        files = files[:frames] if frames else files
        return (_load_image(os.path.join(spec, f), width, height) for f in files), len(files), 30.0
    if not os.path.exists(spec):
        raise ConfigError(f"input {spec!r} does not exist; expected 'synthetic', a video file or an image folder")
    return _video_frames(spec, width, height, frames)


def _load_image(path: str, width: int, height: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((width, height), Image.BILINEAR), dtype=np.uint8)


def _video_frames(path: str, width: int, height: int, limit: int | None):
    import av

    try:
        container = av.open(path)
        stream = container.streams.video[0]
    except (av.error.FFmpegError, IndexError) as exc:
        raise ConfigError(f"input {path!r} is not a readable video file: {exc}") from exc
    fps = float(stream.average_rate or 30)
    count = stream.frames or None
    if limit:
        count = min(count, limit) if count else limit

    def gen():
        n = 0
        try:
            for frame in container.decode(stream):
                yield frame.reformat(width=width, height=height, format="rgb24").to_ndarray()
                n += 1
                if limit and n >= limit:
                    break
        finally:
            container.close()

    return gen(), count, fps


class FrameSink:
    """Writes frames to a video file (H.264 when FFmpeg has it, else MPEG-4) or to numbered PNGs."""

    def __init__(self, spec: str, width: int, height: int, fps: float):
        self.spec, self.count = spec, 0
        ext = os.path.splitext(spec)[1].lower()
        if ext in VIDEO_EXTS:
            import av

            parent = os.path.dirname(os.path.abspath(spec))
            if not os.path.isdir(parent):
                raise ConfigError(f"output folder {parent!r} does not exist")
            self._container = av.open(spec, mode="w")
            codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
            self._stream = self._container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
            self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
            self._folder = None
        elif ext == "":
            os.makedirs(spec, exist_ok=True)
            self._folder, self._container = spec, None
        else:
            raise ConfigError(f"output {spec!r}: expected a video file ({', '.join(VIDEO_EXTS)}) or a folder")

    def write(self, frame: np.ndarray) -> None:
        if self._container is not None:
            import av

            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            for packet in self._stream.encode(vf):
                self._container.mux(packet)
        else:
            from PIL import Image

            Image.fromarray(frame).save(os.path.join(self._folder, f"frame_{self.count:05d}.png"))
        self.count += 1

    def close(self) -> None:
        if self._container is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
            self._container = None
