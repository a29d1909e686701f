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
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engines.graph import CaptureError, GraphCache

from . import control, prepare
from .backends import build_executor, choose_backend
from .buffers import FrameBuffers, FrameIO, StreamLayout
from .conditioning import conditioning_for
from .config import (Backend, CacheSettings, EngineConfig, FilterSettings, PromptSpec, SchedulerKind, SeedSpec,
                     StreamSettings, VaeKind, apply_updates, parse_device, parse_dtype, parse_enum,
                     parse_threads, set_cpu_threads)
from .control import ip_adapter as ip_adapter_mod
from .errors import ConfigError, FrameError
from .executors import OVERLAP_LATENCY, CapturedFrame, EagerExecutor, LayoutState
from .guidance import make_guidance
from .models.loading import Components, check_size, check_size_early, load_components
from .prompts import PromptEncoder
from .schedule import SlotConstants, slot_constants
from .temporal import TemporalCache
from .vocabulary import strength_of

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
    @classmethod
    def from_pretrained(cls, model: str, *, width: int | None = None, height: int | None = None,
                        strength: float | None = None, steps: int | None = None, t_index_list=None,
                        cfg: Any = "none", guidance_scale: float = 1.2, delta: float = 1.0,
                        device: Any = "auto", dtype: Any = "auto", seed: Any = 2, backend: Any = "auto",
                        vae: Any = "tiny", frame_buffer_size: int = 1, num_inference_steps: int = 50,
                        scheduler: Any = None, prompt: Any = "", negative_prompt: str = "",
                        prompt_method: Any = "linear", similar_filter: bool = False,
                        similar_threshold: float = 0.98, similar_max_skip: int = 10,
                        max_vram_gb: float | None = None, engine_dir: str | None = None,
                        lora: tuple = (), vae_id: str | None = None, local_files_only: bool | None = None,
                        model_seed: int = 0, graph_cache_size: int = 4, kv_max_frames: int = 4,
                        cache_enabled: bool = False, cache_maxframes: int = 1,
                        cache_interval: int = 1, compile_preset: str = "default",
                        compile_artifacts: str = "auto", threads: int | None = None, ip_adapter: Any = None,
                        vae_overlap: bool = False, controlnets: Any = ()) -> "StreamEngine":
        """Load ``model`` (hub id, local diffusers folder, one ``.safetensors`` checkpoint, or
        ``random:sd-turbo|sd15|sdxl-turbo|sdxl|tiny|tiny-sdxl``) and prepare. Width and height default to the
        model's own size (512 for sd-turbo and SDXL-Turbo, 1024 for SDXL base).

        Every argument is checked before the model loads, so a typo fails in milliseconds.
        ip_adapter: {"model": "random:ip-adapter-sd15" | a .bin / .safetensors file, "image_encoder": folder or
        hub id, "scale": 0.6, "enabled": True} (rtdiffusion/control/ip_adapter.py); style images come with
        set_style_image(), scale and on/off with update(ip_adapter_scale=, ip_adapter_enabled=).
        strength (0 keeps the input, 1 restyles fully) and steps (denoising steps per frame) are the friendly
        form of t_index_list (rtdiffusion/vocabulary.py); give one form or the other. Default: strength 0.35,
        1 step, which is t_index_list [32]. threads: torch threads for CPU inference (None: half the cores,
        at most 8; process-wide, set here only when the device is the CPU). vae_overlap: run the TAESD encode
        of each call's frames and the decode of the previous call's results next to the UNet, on a parallel
        branch of the captured frame: faster frames (BENCHMARKS.md, issue 17), each coming out 2 calls later
        (status()["latency_frames"] counts them). controlnets: ControlNets, each a dict (model, preprocessor,
        scale, start, end, enabled, preprocessor_options), a ControlNetSpec or a model name (rtdiffusion/control).
        """
        dev = parse_device(device)
        set_cpu_threads(dev, parse_threads(threads))
        dt = parse_dtype(dtype, dev)
        be = parse_enum(Backend, backend, "backend")
        vk = parse_enum(VaeKind, vae, "vae")
        sk = None if scheduler is None else parse_enum(SchedulerKind, scheduler, "scheduler")
        # validate sizes early with a provisional config (the model may supply the default size)
        choose_backend(EngineConfig(model, _given(width, 512), _given(height, 512), dev, dt, be, vk, frame_buffer_size,
                                    num_inference_steps, sk, max_vram_gb, engine_dir, kv_max_frames,
                                    compile_preset, compile_artifacts, vae_overlap=vae_overlap))
        settings = apply_updates(StreamSettings(
            prompt=PromptSpec.parse(prompt, prompt_method, negative_prompt), seed=SeedSpec.parse(seed),
            filter=FilterSettings(similar_filter, similar_threshold, similar_max_skip),
            cache=CacheSettings(cache_enabled, cache_maxframes, cache_interval)),
            num_inference_steps, strength=strength, steps=steps, t_index_list=t_index_list, cfg=cfg,
            guidance_scale=guidance_scale, delta=delta)
        _check_cache_frames(settings, kv_max_frames)
        ip_spec = None if ip_adapter is None else ip_adapter_mod.IPAdapterSpec.parse(ip_adapter)
        if ip_spec is not None:
            ip_adapter_mod.check_family_early(ip_spec, model)  # random: models: before building
            settings = dataclasses.replace(settings, ip_adapter=ip_spec.settings())
        specs = control.parse_specs(controlnets)
        low_vram = max_vram_gb is not None and dev.type == "cuda"
        check_size_early(model, width, height, vk)  # random: models: a wrong size fails before building
        comps = load_components(model, dev, dt, vk, seed=model_seed, vae_id=vae_id, lora=tuple(lora),
                                local_files_only=local_files_only,
                                unet_device=torch.device("cpu") if low_vram else None)
        ip = None if ip_spec is None else ip_adapter_mod.load(ip_spec, comps, dev, dt, seed=model_seed,
                                                            local_files_only=local_files_only)
        size = comps.default_size
        config = EngineConfig(model, _given(width, size), _given(height, size), dev, dt, be, vk, frame_buffer_size,
                              num_inference_steps, sk, max_vram_gb, engine_dir, kv_max_frames, compile_preset,
                              compile_artifacts, vae_overlap=vae_overlap)
        stack = control.make_control(specs, comps, config, seed=model_seed, local_files_only=local_files_only)
        return cls(config, comps, settings, ip_adapter=ip, graph_cache_size=graph_cache_size, controlnets=stack)

    def __init__(self, config: EngineConfig, components: Components, settings: StreamSettings | None = None,
                 *, ip_adapter: Any = None, graph_cache_size: int = 4, controlnets: Any = ()):
        self.config, self.components = config, components
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
        self._prompts = PromptEncoder(components.text, self.device, config.dtype)
        self._tokens = self._prompts.tokens + (ip_adapter.tokens if ip_adapter is not None else 0)  # T (+ T_ip)
        self._conditioning = conditioning_for(components.unet.config)  # the UNet's added inputs (SDXL)
        self._io = FrameIO.allocate(F, H, W, self.device)
        # pinned host staging for uploads / readback, and for the filter's three dot products
        self._in_host = torch.zeros(F, H, W, 3, dtype=torch.uint8, pin_memory=cuda)
        self._out_host = torch.zeros(F, H, W, 3, dtype=torch.uint8, pin_memory=cuda)
        self._probe_host = torch.zeros(3, dtype=torch.float32, pin_memory=cuda)
        self._probe_event = torch.cuda.Event() if cuda else None
        self._out_event = torch.cuda.Event() if cuda else None
        # a small ring of "output ready" events: a consumer may hold the last few results' events
        self._ready_events = [torch.cuda.Event() for _ in range(4)] if cuda else []
        self._graphs = GraphCache(_graph_cache_capacity(graph_cache_size))
        self._layouts: dict[StreamLayout, LayoutState] = {}
        self._frame: CapturedFrame | None = None  # the active layout's captured graphs (graph backends)
        # ControlNets (rtdiffusion/control): specs are loaded here, a stack from from_pretrained is used as is;
        # made before the backend, which builds TensorRT engines of their modules
        self._control = (controlnets if isinstance(controlnets, (control.NoControl, control.ControlStack))
                         else control.make_control(controlnets, components, config))
        self._executor, self.backend_reason = build_executor(config, components, self._control.modules)
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
        self._skipped = 0
        self._skip_run = 0
        self._rng = random.Random(0)
        self._host_probe_ref: np.ndarray | None = None
        self._frame_times: deque[float] = deque(maxlen=240)
        self._last_frame_at: float | None = None
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
            base = self._accepted
            if "prompt" in kw or "negative_prompt" in kw or "prompt_method" in kw:
                neg = kw.pop("negative_prompt", base.prompt.negative)
                method = kw.pop("prompt_method", base.prompt.method)
                prompt = kw.pop("prompt", [list(p) for p in base.prompt.parts])
                base = dataclasses.replace(base, prompt=PromptSpec.parse(prompt, method, neg))
            if "seed" in kw:
                base = dataclasses.replace(base, seed=SeedSpec.parse(kw.pop("seed")))
            if kw.pop("cache_reset", False):
                base = dataclasses.replace(base, cache=dataclasses.replace(
                    base.cache, reset_token=base.cache.reset_token + 1))
            if self._ip is None and ("ip_adapter_scale" in kw or "ip_adapter_enabled" in kw):
                raise ConfigError("ip_adapter_scale / ip_adapter_enabled need an IP-Adapter: pass ip_adapter=... "
                                  "to from_pretrained")
            new = apply_updates(base, self.config.num_inference_steps, **kw)
            _check_cache_frames(new, self.config.kv_max_frames)
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
        return torch.cuda.stream(self.stream) if self.stream is not None else _NullCtx()

    # ------------------------------------------------------------------ frames
    def __call__(self, frame: Any, *, use_graph: bool = True) -> Any:
        """One frame in, one frame out: uint8 [H, W, 3] numpy or torch (CPU or CUDA); the same kind out.

        With a stream batch of S steps the frame that comes out entered S-1 calls earlier.
        use_graph=False runs this frame eagerly on the same state (debugging and comparison).
        """
        arr, kind = self._check_frame(frame)
        with self._frame_lock:
            self._boundary()
            skip = self._host_probe_skip(arr) if kind != "cuda" and self._settings.filter.enabled else None
            if skip:
                self._count_frame()
                return self._download(self._result(skip=True), kind)
            self._upload(arr, kind)
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
        F, H, W = self.config.frame_buffer_size, self.height, self.width
        want = (H, W, 3) if F == 1 else (F, H, W, 3)
        if (not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8 or tuple(tensor.shape) != want
                or tensor.device != self._io.frame_u8.device or not tensor.is_contiguous()):
            got = (f"{type(tensor).__name__} {getattr(tensor, 'dtype', '')} {list(getattr(tensor, 'shape', []))} "
                   f"on {getattr(tensor, 'device', '?')}")
            raise FrameError(f"an input buffer must be a contiguous uint8 tensor of shape {list(want)} on "
                             f"{self._io.frame_u8.device}; got {got}")
        with self._frame_lock, self._stream_ctx():
            self._io = FrameIO(tensor.view(F, H, W, 3), self._io.out_u8)
            for st in self._layouts.values():
                st.buffers.io = self._io
            self._frame = self._captured(self._state)

    def _run(self, consumer_done: torch.cuda.Event | None, use_graph: bool = True,
             decided: bool = False) -> FrameResult:
        """One frame on the device. ``decided``: the host already chose to process it (host probe)."""
        st, executor = self._state, (self._executor if use_graph else self._eager)
        if executor.captures and (self._frame is None or self._frame.released):
            self._frame = self._captured(st)  # evicted or removed through graph_cache: capture again
            executor = self._executor  # (capture may have fallen back to eager)
        skip = False if decided else self._decide_skip()
        with self._stream_ctx():
            if self._settings.filter.enabled and not decided:
                executor.probe(st, self._frame)
                self._probe_host.copy_(st.buffers.probe_dots, non_blocking=True)
                if self._probe_event is not None:
                    self._probe_event.record()
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
        if self._out_event is not None:
            with self._stream_ctx():
                ready = self._ready_events[self._frames % len(self._ready_events)]
                ready.record()
        out = self._io.out_u8[0] if self.config.frame_buffer_size == 1 else self._io.out_u8
        return FrameResult(out, ready, self._frames, skip)

    def _count_frame(self) -> None:
        self._frames += 1
        now = time.perf_counter()
        if self._last_frame_at is not None:
            self._frame_times.append(now - self._last_frame_at)
        self._last_frame_at = now

    def _host_probe_skip(self, frame: Any) -> bool:
        """Similar-frame filter for frames that come from the host: the same 8x-subsampled probe as the
        GPU's, computed here on this very frame (tens of microseconds), so a scene cut is never skipped."""
        f = frame if frame.ndim == 4 else frame[None]
        p = np.asarray(f[:, ::8, ::8, :], dtype=np.float32).ravel() * (2.0 / 255.0) - 1.0
        ref = self._host_probe_ref
        skip = ref is not None and ref.shape == p.shape and self._skip_rule(float(p @ ref), float(p @ p),
                                                                             float(ref @ ref))
        if not skip:
            self._host_probe_ref = p
        return skip

    def _decide_skip(self) -> bool:
        """Similar-frame filter for frames already on the device (step(), CUDA frames): decided from the
        last probe the GPU has finished, so one frame late, but it never waits on the GPU."""
        f = self._settings.filter
        if not f.enabled or (self._probe_event is not None and not self._probe_event.query()):
            return False
        return self._skip_rule(*self._probe_host.tolist())

    def _skip_rule(self, ab: float, aa: float, bb: float) -> bool:
        """StreamDiffusion's rule: skip with probability max(0, 1 - (1 - cos) / (1 - threshold)),
        at most max_skip frames in a row."""
        f = self._settings.filter
        cos = ab / math.sqrt(aa * bb) if aa > 0 and bb > 0 else 0.0
        skip_prob = 0.0 if f.threshold >= 1 else max(0.0, 1.0 - (1.0 - cos) / (1.0 - f.threshold))
        if self._skip_run < f.max_skip and self._rng.random() < skip_prob:
            self._skip_run += 1
            self._skipped += 1
            return True
        self._skip_run = 0
        return False

    def _check_frame(self, frame: Any) -> tuple[Any, str]:
        F, H, W = self.config.frame_buffer_size, self.height, self.width
        want = (H, W, 3) if F == 1 else (F, H, W, 3)
        if isinstance(frame, np.ndarray):
            kind, dtype_ok, shape = "numpy", frame.dtype == np.uint8, tuple(frame.shape)
        elif isinstance(frame, torch.Tensor):
            kind = "cuda" if frame.is_cuda else "torch"
            dtype_ok, shape = frame.dtype == torch.uint8, tuple(frame.shape)
            if frame.is_cuda and self.device.type != "cuda":
                raise FrameError(f"got a CUDA frame but the engine runs on {self.device}; pass a CPU frame")
        else:
            raise FrameError(f"a frame must be a numpy array or a torch tensor of uint8 {list(want)}; "
                             f"got {type(frame).__name__}")
        if not dtype_ok:
            raise FrameError(f"a frame must be uint8 (0-255) of shape {list(want)}; got dtype {frame.dtype}")
        if shape != want:
            raise FrameError(f"a frame must have shape {list(want)} (height, width, RGB) for this engine; "
                             f"got {list(shape)}")
        return frame, kind

    def _upload(self, frame: Any, kind: str) -> None:
        dst = self._io.frame_u8  # [F, H, W, 3]
        src = frame if frame.ndim == 4 else frame[None]
        if kind == "cuda":
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # GPU-side, not a host sync
            if src.data_ptr() == dst.data_ptr():
                return  # the caller wrote into input_buffer: zero copy
            with self._stream_ctx():
                dst.copy_(src, non_blocking=True)
            return
        host = torch.from_numpy(np.ascontiguousarray(src)) if kind == "numpy" else src
        if self.stream is None:
            dst.copy_(host)
            return
        self._in_host.copy_(host)  # pageable -> pinned (host memcpy)
        with self._stream_ctx():
            dst.copy_(self._in_host, non_blocking=True)

    def _download(self, result: FrameResult, kind: str) -> Any:
        if kind == "cuda":
            torch.cuda.current_stream(self.device).wait_event(result.ready)
            return result.output.clone()
        if self.stream is None:
            out = result.output.clone()
        else:
            with self._stream_ctx():
                self._out_host.copy_(self._io.out_u8, non_blocking=True)
                self._out_event.record()
            self._out_event.synchronize()  # the one host sync of a frame: handing the result back
            out = (self._out_host[0] if self.config.frame_buffer_size == 1 else self._out_host).clone()
        return out.numpy() if kind == "numpy" else out

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        s = self._settings
        times = sorted(self._frame_times)
        med = times[len(times) // 2] if times else None
        return {
            "model": self.config.model, "device": str(self.device), "dtype": str(self.config.dtype).replace("torch.", ""),
            "width": self.width, "height": self.height, "frame_buffer_size": self.config.frame_buffer_size,
            "backend": self.backend, "backend_reason": self.backend_reason, "backend_fallback": self.backend_fallback,
            "scheduler": self.scheduler_kind.value, "vae": self.config.vae.value,
            "frames": self._frames, "skipped_frames": self._skipped, "prompt_encodes": self._prompts.encodes,
            "fps": (1.0 / med) if med else 0.0, "frame_ms_median": med * 1e3 if med else None,
            "latency_frames": ((len(s.t_index_list) - 1) * self.config.frame_buffer_size
                               + OVERLAP_LATENCY * self.config.vae_overlap),
            "vae_overlap": self.config.vae_overlap,
            "strength": strength_of(s.t_index_list, self.config.num_inference_steps), "steps": len(s.t_index_list),
            "t_index_list": list(s.t_index_list), "cfg": s.cfg.value, "effective_cfg": s.effective_cfg.value,
            "guidance_scale": s.guidance_scale, "delta": s.delta,
            "prompt": [list(p) for p in s.prompt.parts], "prompt_method": s.prompt.method.value,
            "negative_prompt": s.prompt.negative, "seed": [list(p) for p in s.seed.parts],
            "similar_filter": dataclasses.asdict(s.filter), "cache": dataclasses.asdict(s.cache),
            "graph_cache": {"size": len(self._graphs), "capacity": self._graphs.capacity,
                            "keys": [_key_str(k) for k in self._graphs.keys()],
                            "captures": getattr(self._executor, "captures_done", 0)},
            "temporal_cache": self._temporal.describe(), "text_encoder_graphed": self._prompts.graphed,
            "low_vram": self.low_vram, "networks": self._base_nets.describe(),
            "threads": torch.get_num_threads() if self.device.type == "cpu" else None,
            "ip_adapter": self._ip.describe(s.ip_adapter) if self._ip is not None else None,
            "controlnets": self._control.describe(s.controlnets),
        }


def _key_str(key: Any) -> str:
    layout = key[0]
    return (f"{layout.width}x{layout.height} S={layout.slots} F={layout.frames} cfg={layout.cfg.value} "
            f"{str(layout.dtype).replace('torch.', '')} kv={key[3][1]}")


def _given(value: Any, default: int) -> Any:
    """``default`` only when ``value`` is None: a 0 width is an error (EngineConfig says so), not "the default"."""
    return default if value is None else value


def _check_cache_frames(s: StreamSettings, kv_max_frames: int) -> None:
    if s.cache.maxframes > kv_max_frames:
        raise ConfigError(f"cache_maxframes must be at most kv_max_frames={kv_max_frames} (the banks' allocated "
                          f"size, set when the engine is built); got {s.cache.maxframes}")


GRAPH_CACHE_ENV = "RTDIFFUSION_GRAPH_CACHE"


def _graph_cache_capacity(default: int) -> int:
    """RTDIFFUSION_GRAPH_CACHE: 'off' / '0' keeps only the active shape's graph (every switch recaptures),
    'on' the default capacity, a number that capacity. Unset: the engine's graph_cache_size."""
    raw = os.environ.get(GRAPH_CACHE_ENV, "").strip().lower()
    if not raw or raw == "on":
        return default
    if raw in ("off", "0"):
        return 1
    if raw.isdigit() and int(raw) >= 1:
        return int(raw)
    raise ConfigError(f"{GRAPH_CACHE_ENV} must be 'on', 'off' or a capacity (a whole number); got {raw!r}")


class GraphCacheControl:
    """The engine's graph cache, as the Python API sees it.

    Reads go straight to the cache (it has its own lock). Changes take the engine's frame lock, so they land
    between frames; if they drop the graph of the shape now in use, the next frame captures it again.
    Keys are (StreamLayout, input address, output address, KV-cache key) tuples, as keys() lists them.
    """

    def __init__(self, engine: "StreamEngine"):
        self._engine, self._cache = engine, engine._graphs

    def keys(self) -> list:
        return self._cache.keys()

    def describe(self) -> list[str]:
        return [_key_str(k) for k in self._cache.keys()]

    def __len__(self) -> int:
        return len(self._cache)

    def __contains__(self, key: Any) -> bool:
        return key in self._cache

    @property
    def active_key(self) -> tuple | None:
        e = self._engine
        return e._graph_key(e._state.buffers.layout) if e._executor.captures else None

    @property
    def capacity(self) -> int:
        return self._cache.capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        try:
            with self._engine._frame_lock:
                self._cache.capacity = value
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    def remove(self, key: Any) -> bool:
        with self._engine._frame_lock:
            return self._cache.remove(key)

    def purge(self, n: int | None = None) -> int:
        """Drop the n least recently used graphs (all when None); returns how many were dropped."""
        with self._engine._frame_lock:
            return self._cache.purge(n)


class _NullCtx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
