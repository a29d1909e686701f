"""StreamEngine: the public API around the frame step.

Threads and frame boundaries:

    control threads                      frame thread (whoever calls engine(frame) / engine.step())
    ---------------                      ------------------------------------------------------------
    update_prompt / update_seed /        _boundary(): take the pending settings (if any) and apply them
    update(...)                            (encode prompts, write constants / noise / embeddings in place,
      validate now (raise, change            pick or capture the layout's graph)
      nothing on error)                  upload frame -> probe -> [skip?] -> main step -> readback
      store as pending (lock; latest
      value per key wins)

Settings therefore change only between frames, never in the middle of one. The frame thread holds
``_frame_lock`` for a whole frame, so two threads calling the engine at once are serialised.

Around it, one job per module: pretrained, host_frames, similar_filter, engine_status, graph_cache (.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch

from engines.graph import CaptureError, GraphCache

from . import control, prepare, pretrained
from .backends import build_executor
from .buffers import FrameBuffers, FrameIO, StreamLayout
from .conditioning import conditioning_for
from .config import EngineConfig
from .control import ip_adapter as ip_adapter_mod
from .engine_status import FrameClock, engine_status
from .errors import ConfigError
from .executors import CapturedFrame, EagerExecutor, LayoutState
from .graph_cache import GRAPH_CACHE_ENV, GraphCacheControl, graph_cache_capacity
from .guidance import make_guidance
from .host_frames import HostFrames
from .models.loading import Components, check_size
from .progress import CAPTURE, FIRST_FRAME, TEXT, BuildProgress, engine_progress
from .prompts import PromptEncoder
from .schedule import SlotConstants, slot_constants
from .settings import PromptSpec, SeedSpec, StreamSettings, update_settings
from .similar_filter import SimilarFrameFilter
from .temporal import TemporalCache

__all__ = ["StreamEngine", "FrameResult", "GraphCacheControl", "GRAPH_CACHE_ENV"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrameResult:
    """One step's result. ``output`` is a device tensor the next step overwrites (copy it, or pass
    ``consumer_done`` to the next step); ``ready`` is recorded on ``engine.stream`` once it is written."""

    output: torch.Tensor  # [H, W, 3] uint8 ([F, H, W, 3] with a frame buffer), on the engine's device
    ready: torch.cuda.Event | None
    index: int
    skipped: bool


class StreamEngine:
    """Restyles a stream of frames with a diffusion model (StreamDiffusion's stream batch)."""

    # ------------------------------------------------------------------ construction
    from_pretrained = classmethod(pretrained.from_pretrained)  # arguments checked, model loaded: pretrained.py

    def __init__(self, config: EngineConfig, components: Components, settings: StreamSettings | None = None,
                 *, ip_adapter: Any = None, graph_cache_size: int = 4, controlnets: Any = (),
                 progress: BuildProgress | None = None):
        self.config, self.components = config, components
        progress, self._building = engine_progress(progress, config)  # progress.py: stages, estimates
        self.build_progress = progress
        self.device = config.device
        self._check_resolution()
        # IP-Adapter (control/ip_adapter.py): its processors go on the UNet before any backend sees it
        self._ip: ip_adapter_mod.IPAdapter | None = ip_adapter
        if ip_adapter is not None:
            ip_adapter.install(components.unet, components.text.tokens)
        self.scheduler_kind = config.scheduler or components.scheduler
        self._streamer, self.low_vram = None, None
        if config.max_vram_gb is not None and config.device.type == "cuda":
            from . import lowvram

            self._streamer, self.low_vram = lowvram.setup(components, config)
        F, H, W = config.frame_buffer_size, config.height, config.width
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        with progress.stage(TEXT):  # the encoders (captured on CUDA) and the first prompt (cached)
            self._prompts = PromptEncoder(components.text, self.device, config.dtype)
            with self._stream_ctx():
                self._prompts.embed((settings or StreamSettings()).prompt)
        self._tokens = self._prompts.tokens + (ip_adapter.tokens if ip_adapter is not None else 0)  # T (+ T_ip)
        self._conditioning = conditioning_for(components.unet.config)  # the UNet's added inputs (SDXL)
        self._io = FrameIO.allocate(F, H, W, self.device)
        self._host = HostFrames(F, H, W, self.device, self.stream)  # the caller's frames: checks, pinned staging
        self._filter = SimilarFrameFilter(self.device)  # its state, and the pinned copy of the GPU's probe
        # a small ring of "output ready" events: a consumer may hold the last few results' events
        self._ready_events = [torch.cuda.Event() for _ in range(4)] if cuda else []
        self._graphs = GraphCache(graph_cache_capacity(graph_cache_size))
        self._layouts: dict[StreamLayout, LayoutState] = {}
        self._frame: CapturedFrame | None = None  # the active layout's captured graphs (graph backends)
        # ControlNets (rtdiffusion/control): specs are loaded here, a stack from from_pretrained is used as is;
        # made before the backend, which builds TensorRT engines of their modules
        self._control = (controlnets if isinstance(controlnets, (control.NoControl, control.ControlStack))
                         else control.make_control(controlnets, components, config))
        self._executor, self.backend_reason = build_executor(config, components, self._control.modules,
                                                             stage=progress.stage)
        self._base_nets = self._executor.nets  # the backend's networks, before any wrapping
        if self._ip is not None and hasattr(self._base_nets, "bind_inputs"):  # TensorRT: an engine input
            self._base_nets.bind_inputs(ip_scale=self._ip.scale.tensor)
        self._eager = EagerExecutor(self._executor.nets, overlap=config.vae_overlap)  # use_graph=False
        if self._streamer is not None and self._executor.captures:
            self._executor.before_capture = self._streamer.join
        self.backend_fallback: str | None = (self.backend_reason.split("FALLBACK ", 1)[1]
                                             if "FALLBACK " in self.backend_reason else None)
        self._temporal = TemporalCache(components.unet, config.kv_max_frames)
        self._control.attach(self._base_nets, text_tokens=self._prompts.tokens)  # ControlNets see no IP tokens
        self._constants: dict[tuple[int, ...], SlotConstants] = {}
        self._lock = threading.Lock()  # guards _pending
        self._frame_lock = threading.RLock()  # one frame (or settings application) at a time
        self._pending: StreamSettings | None = None  # accepted, not yet applied (guarded by _lock)
        self._accepted: StreamSettings | None = None  # the newest accepted settings: updates build on it
        self._settings: StreamSettings | None = None  # applied: what the frames run with
        self._state: LayoutState | None = None
        self._frames = 0
        self._clock = FrameClock()  # intervals between frames, for status()
        self._accepted = self._control.initial_settings(settings or StreamSettings()).validate(config.num_inference_steps)
        self._check_cache_backend(self._accepted)
        self._apply(self._accepted)
        log.info("engine ready: %s, backend %s (%s)", config.model, self.backend, self.backend_reason)

    def _check_cache_backend(self, s: StreamSettings) -> None:
        if s.cache.enabled and self._executor.name == "trt":
            raise ConfigError("the temporal KV cache is not available with backend 'trt' yet (its banks are not "
                              "bound into the TensorRT UNet); use backend 'compiled' or 'graph' for it")

    def _check_resolution(self) -> None:
        c, unet = self.config, self.components.unet
        multiple = self.components.vae_scale_factor * 2 ** (len(unet.config.down_block_types) - 1)
        check_size(c.model, c.width, c.height, multiple)

    # ------------------------------------------------------------------ properties
    @property
    def width(self) -> int:
        return self.config.width

    @property
    def height(self) -> int:
        return self.config.height

    @property
    def backend(self) -> str:
        return self._executor.name

    @property
    def settings(self) -> StreamSettings:
        return self._settings

    @property
    def input_buffer(self) -> torch.Tensor:
        """The device tensor step() reads: [H, W, 3] uint8 ([F, H, W, 3] with a frame buffer)."""
        return self._io.frame_u8[0] if self.config.frame_buffer_size == 1 else self._io.frame_u8

    @property
    def graph_cache(self) -> "GraphCacheControl":
        """Captured frame graphs (LRU): inspect with keys(), len(), `in`, capacity; control with remove(),
        purge(n), capacity = N. Safe to use from another thread while frames run."""
        return GraphCacheControl(self)

    # ------------------------------------------------------------------ control (any thread)
    def update_prompt(self, prompt: Any, method: Any = "linear", negative_prompt: str | None = None) -> None:
        """Set the prompt (a string or [(text, weight), ...]); unchanged text is never re-encoded."""
        with self._lock:
            base = self._accepted
            neg = base.prompt.negative if negative_prompt is None else negative_prompt
            spec = PromptSpec.parse(prompt, method, neg)
            self._pending = self._accepted = dataclasses.replace(base, prompt=spec)

    def update_seed(self, seed: Any) -> None:
        """Set the seed (an int or [(seed, weight), ...]); the noise is regenerated in place."""
        with self._lock:
            base = self._accepted
            self._pending = self._accepted = dataclasses.replace(base, seed=SeedSpec.parse(seed))

    def update(self, **kw: Any) -> None:
        """Change settings: strength and/or steps (or, for experts, t_index_list), guidance_scale, delta,
        cfg, similar_filter, similar_threshold,
        similar_max_skip, cache_enabled, cache_maxframes, cache_interval, cache_reset, prompt, seed,
        negative_prompt, controlnets (by index: [{"scale": 0.5}, ...] or {1: {"enabled": False}}),
        ip_adapter_scale (0..5) and ip_adapter_enabled (with an IP-Adapter; a buffer write, no recapture).
        Validated now; applied at the next frame boundary."""
        with self._lock:
            new = update_settings(self._accepted, self.config.num_inference_steps, self.config.kv_max_frames,
                                  self._ip is not None, **kw)
            self._check_cache_backend(new)
            self._pending = self._accepted = new

    # ------------------------------------------------------------------ settings application
    def _boundary(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None or pending == self._settings:
            return
        try:
            self._apply(pending)
        except Exception:
            # out of memory for new banks, say: keep running on the settings we had, written afresh (the
            # failed attempt may have written part of its constants), and build later updates on them
            log.exception("could not apply new settings; keeping the previous ones")
            with self._lock:
                if self._pending is None:
                    self._accepted = self._settings
            self._apply(self._settings, force=True)
            raise

    def _layout(self, s: StreamSettings) -> StreamLayout:
        c = self.config
        scale = self.components.vae_scale_factor
        return StreamLayout(frames=c.frame_buffer_size, slots=len(s.t_index_list), cfg=s.effective_cfg,
                            height=c.height, width=c.width, latent_h=c.height // scale, latent_w=c.width // scale,
                            text_tokens=self._tokens, text_dim=self._prompts.dim, dtype=c.dtype,
                            device=self.device)

    def _apply(self, s: StreamSettings, force: bool = False) -> None:
        """Write ``s`` into its layout's buffers (only what changed, or everything with ``force``)."""
        with self._frame_lock, self._stream_ctx():
            prev, prev_state = self._settings, self._state
            layout = self._layout(s)
            st = self._layouts.get(layout)
            fresh = st is None
            if fresh:
                st = LayoutState(FrameBuffers(layout, self._io, self._conditioning, self._control),
                                 make_guidance(layout.cfg, layout.slots),
                                 layout.slots > 1)
                self._layouts[layout] = st
            switched = st is not prev_state
            fresh = fresh or force
            b = st.buffers
            if fresh or switched or (s.t_index_list, s.guidance_scale, s.delta) != (
                    prev.t_index_list, prev.guidance_scale, prev.delta):
                prepare.write_schedule(b, self._slot_constants(s.t_index_list), s, self.components.latent_scaling)
            if fresh or switched or s.seed != prev.seed:
                prepare.write_noise(b, s.seed)
            if fresh or switched or s.prompt != prev.prompt or s.effective_cfg != prev.effective_cfg:
                uncond = self._prompts.negative(s.prompt) if layout.uncond_rows else None
                prepare.write_embeds(b, self._prompts.embed(s.prompt), uncond)
            if fresh or switched or s.controlnets != prev.controlnets:
                self._control.write_settings(b.control, s.controlnets)  # row scales: buffer writes, no recapture
            if self._ip is not None and (fresh or switched or s.ip_adapter != prev.ip_adapter):
                self._ip.apply(b, s.ip_adapter)  # scale: a buffer write; a new style image: encoded once
            if switched:
                b.reset_stream()  # the frames in flight belong to the old layout
            if self._temporal.apply(s.cache, layout, switched):
                self._graphs.purge()  # new banks: graphs captured against the old ones are stale
            self._executor.nets = self._eager.nets = self._temporal.nets_for(self._base_nets)
            self._frame = self._captured(st)
            self._state, self._settings = st, s

    def _graph_key(self, layout: StreamLayout) -> tuple:
        """What changes the captured work: layout, the I/O buffer addresses, the KV cache's shapes."""
        return (layout, self._io.frame_u8.data_ptr(), self._io.out_u8.data_ptr(), self._temporal.key())

    def _captured(self, st: LayoutState) -> CapturedFrame | None:
        if not self._executor.captures:
            return None
        key = self._graph_key(st.buffers.layout)
        frame = self._graphs.get(key)
        if frame is None:  # first visit of this shape: capture (later visits replay at once)
            try:
                with self.build_progress.stage(CAPTURE):
                    frame = self._executor.capture(st)
            except CaptureError as exc:
                self._fall_back(str(exc))
                return None
            self._graphs.put(key, frame)
        return frame

    def _fall_back(self, reason: str) -> None:
        """A backend that cannot capture falls back to eager, loudly (log and status())."""
        log.warning("%s backend failed (%s); falling back to eager", self._executor.name, reason)
        self.backend_fallback = f"{self._executor.name} -> eager: {reason}"
        self._executor = self._eager
        self._graphs.purge()

    def _slot_constants(self, t_index: tuple[int, ...]) -> SlotConstants:
        if t_index not in self._constants:
            self._constants[t_index] = slot_constants(self.scheduler_kind, self.components.scheduler_config,
                                                      self.config.num_inference_steps, t_index)
        return self._constants[t_index]

    def _stream_ctx(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------ frames
    def __call__(self, frame: Any, *, use_graph: bool = True) -> Any:
        """One frame in, one frame out: uint8 [H, W, 3] numpy or torch (CPU or CUDA); the same kind out.

        With a stream batch of S steps the frame that comes out entered S-1 calls earlier.
        use_graph=False runs this frame eagerly on the same state (debugging and comparison).
        """
        arr, kind = self._host.check(frame)
        with self._frame_lock:
            self._boundary()
            f = self._settings.filter
            skip = self._filter.host_skip(arr, f) if kind != "cuda" and f.enabled else None
            if skip:
                self._count_frame()
                return self._download(self._result(skip=True), kind)
            self._host.upload(arr, kind, self._io.frame_u8)
            result = self._run(None, use_graph, decided=skip is not None)
            return self._download(result, kind)

    def step(self, consumer_done: torch.cuda.Event | None = None, *, use_graph: bool = True) -> FrameResult:
        """Run one frame on what is in ``input_buffer``; returns the device output and its ready event.

        The caller's current stream is made to wait for ``ready`` on the GPU, so code that just reads
        ``output`` (``.cpu()``, ``.item()``) works unchanged. Consumers on other streams wait on ``ready``
        themselves and may pass ``consumer_done``: the next step's writes wait for it on the GPU.
        """
        with self._frame_lock:
            self._boundary()
            if self.stream is not None:  # the caller's writes into input_buffer / its reads of the last
                self.stream.wait_stream(torch.cuda.current_stream(self.device))  # output come first (GPU-side)
            result = self._run(consumer_done, use_graph)
            if result.ready is not None:
                torch.cuda.current_stream(self.device).wait_event(result.ready)
            return result

    def set_control_image(self, frame: Any, index: int = 0) -> None:
        """The control image of an 'external' ControlNet: uint8 [H, W, 3] or [F, H, W, 3], numpy or torch.
        Checked now (FrameError / ConfigError naming what was expected); used from the next frame on."""
        with self._frame_lock, self._stream_ctx():
            self._control.set_image(frame, index)

    def set_style_image(self, image: Any) -> None:
        """The IP-Adapter's style image: a path, a PIL image, uint8 [H, W, 3] numpy / torch, or [(image, weight),
        ...] (a weighted blend). Checked now (ConfigError naming what was expected; the previous style stays);
        encoded at the next frame boundary, once per distinct image (status()["ip_adapter"]["encodes"])."""
        if self._ip is None:
            raise ConfigError("set_style_image needs an IP-Adapter: pass ip_adapter=... to from_pretrained")
        style = self._ip.accept_style(image)
        with self._lock:
            base = self._accepted
            ip = dataclasses.replace(base.ip_adapter, style=style)
            self._pending = self._accepted = dataclasses.replace(base, ip_adapter=ip)

    def register_input(self, tensor: torch.Tensor) -> None:
        """Make the caller's own device tensor the input buffer: step() then reads it in place, no copy.

        tensor: uint8 [H, W, 3] ([F, H, W, 3] with a frame buffer), contiguous, on the engine's device.
        The active shape's graph is captured against it now (graphs of the old buffer stay cached).
        """
        self._host.check_input_buffer(tensor, self._io.frame_u8.device)
        F, H, W = self.config.frame_buffer_size, self.height, self.width
        with self._frame_lock, self._stream_ctx():
            self._io = FrameIO(tensor.view(F, H, W, 3), self._io.out_u8)
            for st in self._layouts.values():
                st.buffers.io = self._io
            self._frame = self._captured(self._state)

    def _run(self, consumer_done: torch.cuda.Event | None, use_graph: bool = True,
             decided: bool = False) -> FrameResult:
        """One frame on the device. ``decided``: the host already chose to process it (host probe)."""
        if self._building is not None:  # the build's last stage: the first frame (compiles on the CPU)
            building, self._building = self._building, None
            return building.last_stage(FIRST_FRAME, lambda: self._run(consumer_done, use_graph, decided))
        st, executor = self._state, (self._executor if use_graph else self._eager)
        if executor.captures and (self._frame is None or self._frame.released):
            self._frame = self._captured(st)  # evicted or removed through graph_cache: capture again
            executor = self._executor  # (capture may have fallen back to eager)
        skip = False if decided else self._filter.device_skip(self._settings.filter)
        with self._stream_ctx():
            if self._settings.filter.enabled and not decided:
                executor.probe(st, self._frame)
                self._filter.record_probe(st.buffers.probe_dots)
            if not skip:
                if consumer_done is not None:
                    self.stream.wait_event(consumer_done)
                executor.main(st, self._frame)
                self._temporal.after_frame()
            result = self._result(skip)
        self._count_frame()
        return result

    def _result(self, skip: bool) -> FrameResult:
        ready = None
        if self.stream is not None:
            with self._stream_ctx():
                ready = self._ready_events[self._frames % len(self._ready_events)]
                ready.record()
        out = self._io.out_u8[0] if self.config.frame_buffer_size == 1 else self._io.out_u8
        return FrameResult(out, ready, self._frames, skip)

    def _count_frame(self) -> None:
        self._frames += 1
        self._clock.tick()

    def _download(self, result: FrameResult, kind: str) -> Any:
        return self._host.download(result.output, result.ready, kind, self._io.out_u8)

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        """Settings, backend, frame counts and fps, caches, networks (engine_status.py); from any thread."""
        return engine_status(self)
