"""Frames between the rings and the engine: the bridge's hot path.

Nothing in this file may allocate per frame (every buffer and event is made in ``__init__``), print, log at
INFO or above, or wait for the whole device. The only host waits are on single events of frames several
steps old, and only when the readback ring is full.

Two implementations of one small interface (``read`` / ``submit`` / ``poll``):

HostTransfer (CPU engines)::

    input ring --seqlock copy--> raw [H, W, C] --to_rgb--> rgb [H, W, 3] --engine(rgb)--> out [H, W, 3]
    --RingWriter.write--> output ring                                   (all on the frame thread, in order)

CudaTransfer (CUDA engines; two side streams and events, one frame in flight per stage)::

    host (frame thread)       upload stream            engine.stream              readback stream
    -------------------       -------------            -------------              ---------------
    up_done[k].synchronize()  wait conv_done[k]
    ring -> pin_in[k]         pin_in[k] -> dev_raw[k]
      (seqlock copy)          record up_done[k]  --->  wait up_done[k]
                                                       gather dev_raw[k] -> input_buffer
                                                         (format, row order)
                                                       record conv_done[k]
                                                       step(consumer_done=used[j-1])
                                                       record res.ready  ------>  wait res.ready
                                                                                  gather output -> dev_out[j]
                                                                                  record used[j]
                                                                                  dev_out[j] -> pin_out[j]
                                                                                  record rb_done[j]
    poll(): rb_done[j].query() -> pin_out[j] -> output ring (seqlock write), one frame or more late

k alternates over 2 input stages; j cycles over ``depth`` readback stages. When all ``depth`` readbacks are
pending, ``submit`` waits on the oldest one's event (it is ``depth`` frames old) before reusing it.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

import numpy as np

from .ring import FrameInfo, PixelFormat, RingLayout, RingReader, RingWriter, RowOrder, to_rgb

Published = Callable[[int, int], None]  # (output frame index, source input index)


class HostTransfer:
    """The plain path: the engine's own ``engine(frame)`` call, numpy on both sides."""

    name = "host"

    def __init__(self, engine, reader: RingReader, writer: RingWriter, on_published: Published) -> None:
        lay = reader.layout
        self.engine, self.reader, self.writer = engine, reader, writer
        self._raw = np.zeros(lay.shape, np.uint8)  # [H, W, C_in] ring layout
        self._rgb = np.zeros((lay.height, lay.width, 3), np.uint8)  # [H, W, 3] top-down RGB, what the engine takes
        self._on_published = on_published
        self._have_input = False
        self._source = -1
        self._unpolled = 0

    def read(self) -> FrameInfo | None:
        info = self.reader.read(self._raw)
        if info is not None:
            to_rgb(self._raw, self.reader.layout, self._rgb)
            self._have_input = True
            self._source = info.index
        return info

    @property
    def has_input(self) -> bool:
        return self._have_input

    def submit(self) -> None:
        out = self.engine(self._rgb)  # [H, W, 3] uint8 numpy, top-down RGB
        n = self.writer.write(out, rows=RowOrder.TOP_DOWN, source_index=self._source)
        self._on_published(n, self._source)
        self._unpolled += 1

    def poll(self, block: bool = False) -> int:
        """Frames published since the last poll (HostTransfer publishes inside submit())."""
        done, self._unpolled = self._unpolled, 0
        return done

    def close(self) -> None:
        pass


def _gather_index(h: int, w: int, src_c: int, src_rows: RowOrder, dst_rows: RowOrder,
                  chans: tuple[int, int, int]):
    """Flat indices into a [H, W, src_c] source for each element of a [H, W, 3] destination, so that one
    ``gather`` does the row flip and the channel reorder: dst[y, x, c] = src[y', x, chans[c]]."""
    import torch

    ys = torch.arange(h, dtype=torch.int64)
    if src_rows is not dst_rows:
        ys = h - 1 - ys
    xs = torch.arange(w, dtype=torch.int64)
    cs = torch.tensor(chans, dtype=torch.int64)
    return ((ys[:, None, None] * w + xs[None, :, None]) * src_c + cs[None, None, :]).reshape(-1)  # [H*W*3]


def input_index(layout: RingLayout):
    """[H*W*3] gather index: ring-layout pixels -> the engine's top-down RGB."""
    return _gather_index(layout.height, layout.width, layout.channels, layout.row_order, RowOrder.TOP_DOWN,
                         layout.pixel_format.rgb_channels)


def output_index(layout: RingLayout):
    """[H*W*3] gather index: the engine's top-down RGB -> the ring's first three channels, in its row order."""
    inv = [0, 0, 0]  # which engine channel lands in each of the ring's first three channels
    for c, pos in enumerate(layout.pixel_format.rgb_channels):
        inv[pos] = c
    return _gather_index(layout.height, layout.width, 3, RowOrder.TOP_DOWN, layout.row_order, tuple(inv))


class CudaTransfer:
    """Pinned staging, side streams and events around ``engine.step()``; see the module docstring."""

    name = "cuda"

    def __init__(self, engine, reader: RingReader, writer: RingWriter, on_published: Published,
                 depth: int = 3, profile: bool = False) -> None:
        import torch

        self._torch = torch
        self.engine, self.reader, self.writer = engine, reader, writer
        self._on_published = on_published
        dev = engine.device
        lin, lout = reader.layout, writer.layout
        h, w = lin.height, lin.width
        buf = engine.input_buffer  # [H, W, 3] uint8, what step() reads
        if tuple(buf.shape) != (h, w, 3) or not buf.is_contiguous():
            raise ValueError(f"the bridge needs an engine input_buffer of shape [{h}, {w}, 3], contiguous, "
                             f"(frame_buffer_size 1); got {list(buf.shape)}")
        self._in_flat = buf.view(-1)  # [H*W*3]
        self._up_stream = torch.cuda.Stream(dev)
        self._rb_stream = torch.cuda.Stream(dev)
        E = torch.cuda.Event
        # input stages, k in {0, 1}
        self._pin_in = [torch.zeros(lin.shape, dtype=torch.uint8, pin_memory=True) for _ in range(2)]  # [H, W, Cin]
        self._pin_in_np = [t.numpy() for t in self._pin_in]
        self._dev_raw = [torch.zeros(lin.shape, dtype=torch.uint8, device=dev) for _ in range(2)]  # [H, W, Cin]
        self._up_done = [E() for _ in range(2)]
        self._conv_done = [E() for _ in range(2)]
        self._in_identity = lin.pixel_format is PixelFormat.RGB8 and lin.row_order is RowOrder.TOP_DOWN
        self._in_idx = input_index(lin).to(dev)  # [H*W*3] int64
        # readback stages, j in 0..depth-1
        self._depth = depth
        self._out_identity = lout.pixel_format is PixelFormat.RGB8 and lout.row_order is RowOrder.TOP_DOWN
        self._out_idx = output_index(lout).to(dev)  # [H*W*3] int64
        self._tmp3 = [torch.zeros(h * w * 3, dtype=torch.uint8, device=dev) for _ in range(depth)]  # [H*W*3]
        self._dev_out = [torch.full(lout.shape, 255, dtype=torch.uint8, device=dev) for _ in range(depth)]  # alpha 255
        self._pin_out = [torch.zeros(lout.shape, dtype=torch.uint8, pin_memory=True) for _ in range(depth)]
        self._pin_out_np = [t.numpy() for t in self._pin_out]
        self._used = [E() for _ in range(depth)]  # the engine's output has been read (next step may overwrite)
        self._rb_done = [E() for _ in range(depth)]
        self._pending: deque[tuple[int, int]] = deque()  # (j, source index), oldest first
        self._k = 0
        self._j = 0
        self._last_used = None
        self._have_input = False
        self._source = -1
        # optional per-stage timing for bench/bridge_overhead.py: CUDA events, made once
        self.profile = profile
        if profile:
            self._t = {n: [E(enable_timing=True) for _ in range(depth)]
                       for n in ("up0", "up1", "rb0", "rb1")}
            self.samples: dict[str, list[float]] = {"ring_in": [], "upload": [], "readback": [], "ring_out": []}
            self._prof_pending: deque[int] = deque()  # j of each pending frame

    # -------------------------------------------------------------------------------------------- frames
    def read(self) -> FrameInfo | None:
        k = self._k
        self._up_done[k].synchronize()  # the upload from pin_in[k] two frames ago (long finished, normally)
        t0 = time.perf_counter()
        info = self.reader.read(self._pin_in_np[k])  # seqlock copy shm -> pinned
        if info is not None:
            if self.profile:
                self.samples["ring_in"].append(time.perf_counter() - t0)
            self._have_input = True
            self._source = info.index
            self._upload(k)
            self._k = 1 - k
        return info

    @property
    def has_input(self) -> bool:
        return self._have_input

    def _upload(self, k: int) -> None:
        torch = self._torch
        up, eng = self._up_stream, self.engine.stream
        with torch.cuda.stream(up):
            up.wait_event(self._conv_done[k])  # dev_raw[k] no longer read by the gather of two frames ago
            if self.profile:
                self._t["up0"][self._j].record(up)
            self._dev_raw[k].copy_(self._pin_in[k], non_blocking=True)
            self._up_done[k].record(up)
        with torch.cuda.stream(eng):
            eng.wait_event(self._up_done[k])
            if self._in_identity:
                self._in_flat.copy_(self._dev_raw[k].view(-1))
            else:
                torch.gather(self._dev_raw[k].view(-1), 0, self._in_idx, out=self._in_flat)
            self._conv_done[k].record(eng)
            if self.profile:
                self._t["up1"][self._j].record(eng)

    def submit(self) -> None:
        """Step on what was last uploaded (the same frame again after /process_frame) and start its readback."""
        torch = self._torch
        if len(self._pending) >= self._depth:
            self.poll(block=True)
        res = self.engine.step(consumer_done=self._last_used)
        j = self._j
        rb = self._rb_stream
        with torch.cuda.stream(rb):
            rb.wait_event(res.ready)
            if self.profile:
                self._t["rb0"][j].record(rb)
            if self._out_identity:
                src = res.output  # [H, W, 3]
            else:
                torch.gather(res.output.view(-1), 0, self._out_idx, out=self._tmp3[j])
                if self.writer.layout.channels == 3:
                    src = self._tmp3[j].view(self.writer.layout.shape)
                else:
                    self._dev_out[j][..., :3].copy_(self._tmp3[j].view(self.writer.layout.height,
                                                                       self.writer.layout.width, 3))
                    src = self._dev_out[j]
                self._used[j].record(rb)
            self._pin_out[j].copy_(src, non_blocking=True)
            if self.profile:  # before rb_done, so it has completed whenever rb_done has
                self._t["rb1"][j].record(rb)
            self._rb_done[j].record(rb)
            if self._out_identity:
                self._used[j].record(rb)
        self._last_used = self._used[j]
        self._pending.append((j, self._source))
        self._j = (j + 1) % self._depth
        if self.profile:
            self._prof_pending.append(j)

    def poll(self, block: bool = False) -> int:
        """Publish every finished readback, oldest first; with ``block`` wait for the oldest one."""
        done = 0
        while self._pending:
            j, source = self._pending[0]
            if not self._rb_done[j].query():
                if not block:
                    break
                self._rb_done[j].synchronize()  # one event, ``depth`` frames old; not the device
                block = False
            t0 = time.perf_counter()
            n = self.writer.publish(self._pin_out_np[j], source)  # one copy (Linux: one pwrite) pinned -> ring
            if self.profile:
                self.samples["ring_out"].append(time.perf_counter() - t0)
                jj = self._prof_pending.popleft()
                self.samples["readback"].append(self._t["rb0"][jj].elapsed_time(self._t["rb1"][jj]) * 1e-3)
                up0, up1 = self._t["up0"][jj], self._t["up1"][jj]
                if up0.query() and up1.query():  # a newer upload may have re-recorded this slot's events
                    self.samples["upload"].append(up0.elapsed_time(up1) * 1e-3)
            self._pending.popleft()
            self._on_published(n, source)
            done += 1
        return done

    def close(self) -> None:
        while self._pending:
            self.poll(block=True)


def make_transfer(engine, reader: RingReader, writer: RingWriter, on_published: Published, **kw):
    """CudaTransfer when the engine runs on a CUDA stream, else HostTransfer."""
    if getattr(engine, "stream", None) is not None:
        return CudaTransfer(engine, reader, writer, on_published, **kw)
    return HostTransfer(engine, reader, writer, on_published)


__all__ = ["HostTransfer", "CudaTransfer", "make_transfer", "RingLayout"]
