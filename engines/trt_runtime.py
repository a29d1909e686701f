"""TensorRT runtime: deserialise, bind preallocated buffers once, enqueue on the caller's stream.

One :class:`TrtEngine` per network; ``trt_networks.TrtNetworks`` holds them (UNet, VAE encoder and decoder, one
per ControlNet) and implements ``base.Networks``, binding call arguments to engine inputs by name.

Per engine, at load (never again):
    deserialise engine.plan -> ICudaEngine (None -> TrtEngineError naming the file and TensorRT's error)
    check its I/O names, modes and dtypes against the spec
    execution context with USER_MANAGED memory; activations live in one SharedWorkspace that all engines of
        a TrtNetworks share (they run one after another on one stream, so one block serves all)
    outputs preallocated at the spec's max sizes          # e.g. eps [B_max, 4, h, w] fp16
    output addresses bound once

Per call (``run``), all host-side, no allocation, no host sync:
    if the inputs' axis sizes changed since the last call: select the profile, set input shapes (rare:
        a change of steps or guidance mode)
    if an input's address changed: set_tensor_address (rare: the frame step's buffers do not move)
    execute_async_v3(torch.cuda.current_stream())   False -> TrtEngineError naming the engine file
    return the output views for these sizes          (the same tensor objects every call at these sizes)

With ``capture_graphs=True`` an engine captures its own enqueue into a CUDA graph per (sizes, addresses)
after one warm call and replays it; inside a whole-frame capture (the ``graph`` executor) it enqueues
plainly and becomes part of that graph. Asynchronous CUDA faults inside an engine surface at the next
synchronisation (the readback event), not here: that is the price of no host sync.

Not run in this repository (no TensorRT, no GPU); written against the TensorRT 10.1+ / 11.x Python API (the
name-based tensor API, V2 device-memory API), every name checked against the published 10.16 and 11.4
bindings by tests/engines/test_trt_api_names.py. What the installed TensorRT supports: ``trt_caps``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from .cache import CacheCorrupt, CacheEntry, CacheKey, EngineCache
from .onnx_export import ONNX_FILE, export_all_to_cache
from .specs import Binding, NetworkSpec, SpecParams, make_specs, torch_dtype
from .trt_build import ENGINE_FILE, TrtBuildOptions, build_engine, check_dtype, timing_cache_path, trt_logger
from .trt_caps import import_tensorrt
from .trt_networks import TrtNetworks
from .versions import gpu_capability, weights_fingerprint

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger(__name__)


class TrtEngineError(RuntimeError):
    """A TensorRT engine failed to load or enqueue. The message names the engine file."""


class SharedWorkspace:
    """One device buffer for the activation memory of several execution contexts run in sequence."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffer: torch.Tensor | None = None  # [bytes] uint8
        self._users: list["TrtEngine"] = []

    def attach(self, engines: Sequence["TrtEngine"]) -> None:
        """Size the buffer for the largest engine and hand it to all of them (called once at load)."""
        self._users = list(engines)
        need = max(e.workspace_bytes for e in self._users)
        self.buffer = torch.empty(max(need, 1), dtype=torch.uint8, device=self.device)
        log.info("TensorRT shared activation workspace: %.1f MB for %d engines", need / 1e6, len(self._users))
        for e in self._users:
            e.set_workspace(self.buffer)


class TrtEngine:
    """One deserialised engine bound to preallocated outputs. See the module docstring."""

    def __init__(self, path: str | os.PathLike, spec: NetworkSpec, device: torch.device, *,
                 shared_workspace: bool = True, capture_graphs: bool = False) -> None:
        trt = import_tensorrt()
        self.trt = trt
        self.path = Path(path)
        self.spec = spec
        self.device = device
        self.capture_graphs = capture_graphs
        self._logger = trt_logger(trt)
        with torch.cuda.device(device):
            self._runtime = trt.Runtime(self._logger)
            blob = self.path.read_bytes()
            self._logger.clear()
            self.engine = self._runtime.deserialize_cuda_engine(blob)
            if self.engine is None:
                raise TrtEngineError(f"TensorRT could not deserialise {self.path}: "
                                     f"{self._logger.last_error or 'unknown error'} (built by another TensorRT "
                                     "version or for another GPU? delete it or run `rtdiffusion build` again)")
            self._check_io()
            self._logger.clear()
            if shared_workspace:
                strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
                self.context = self.engine.create_execution_context(strategy)
            else:
                self.context = self.engine.create_execution_context()
            if self.context is None:
                raise TrtEngineError(f"{self.path}: could not create an execution context: "
                                     f"{self._logger.last_error or 'unknown error'}")
        # V2 size: includes the weight-streaming scratch memory (the V1 size is gone in TensorRT 11)
        self.workspace_bytes = int(self.engine.device_memory_size_v2) if shared_workspace else 0
        # Outputs at the largest sizes of every profile, bound once.
        self._max = spec.max_sizes()
        self.outputs = {b.name: torch.empty(b.shape(self._max), dtype=torch_dtype(b.dtype), device=device)
                        for b in spec.outputs}
        for name, t in self.outputs.items():
            self.context.set_tensor_address(name, t.data_ptr())
        self._views: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self._bound: dict[str, int] = {}
        self._sizes: tuple | None = None
        self._profile = 0
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._warm: set[tuple] = set()
        self._axis_pos = self._axis_positions()

    # ---- load-time helpers -------------------------------------------------------------------------
    def _check_io(self) -> None:
        trt, e = self.trt, self.engine
        names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
        want = [b.name for b in self.spec.bindings]
        if sorted(names) != sorted(want):
            raise TrtEngineError(f"{self.path} has tensors {names}; spec {self.spec.name!r} expects {want}")
        for b in self.spec.bindings:
            is_input = e.get_tensor_mode(b.name) == trt.TensorIOMode.INPUT
            if is_input != (b in self.spec.inputs):
                raise TrtEngineError(f"{self.path}: tensor {b.name} is an {'input' if is_input else 'output'} "
                                     "in the engine but not in the spec")
            got = torch_dtype_of(trt, e.get_tensor_dtype(b.name))
            if got != torch_dtype(b.dtype):
                raise TrtEngineError(f"{self.path}: tensor {b.name} is {got} in the engine, {b.dtype} in the spec")
        if e.num_optimization_profiles != len(self.spec.profiles):
            raise TrtEngineError(f"{self.path} has {e.num_optimization_profiles} profiles; the spec has "
                                 f"{len(self.spec.profiles)}")

    def _axis_positions(self) -> list[tuple[str, int, int]]:
        """(axis, input index, dim index) for the first input carrying each dynamic axis."""
        seen, out = set(), []
        for i, b in enumerate(self.spec.inputs):
            for d, a in enumerate(b.dims):
                if isinstance(a, str) and a not in seen:
                    seen.add(a)
                    out.append((a, i, d))
        return out

    def set_workspace(self, buffer: torch.Tensor) -> None:
        self.context.set_device_memory(buffer.data_ptr(), buffer.numel())  # V2 API (10.1+, 11)

    # ---- per call ------------------------------------------------------------------------------------
    def run(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Enqueue on the current stream; returns the bound outputs for these sizes. No alloc, no sync."""
        sizes = tuple(inputs[i].shape[d] for _, i, d in self._axis_pos)
        if sizes != self._sizes:
            self._set_shapes(inputs, sizes)
        for b, x in zip(self.spec.inputs, inputs):
            if self._bound.get(b.name) != x.data_ptr():
                self._bind_input(b, x)
        stream = torch.cuda.current_stream(self.device)
        if self.capture_graphs and not torch.cuda.is_current_stream_capturing():
            key = (sizes, tuple(self._bound[b.name] for b in self.spec.inputs))
            graph = self._graphs.get(key)
            if graph is not None:
                graph.replay()
                return self._views[sizes]
            if key in self._warm:
                self._capture(key, stream)
                return self._views[sizes]
            self._warm.add(key)  # first call at this key runs plainly (TensorRT settles shape state)
        self._enqueue(stream)
        return self._views[sizes]

    def _enqueue(self, stream: torch.cuda.Stream) -> None:
        self._logger.clear()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise TrtEngineError(f"TensorRT enqueue of {self.path} failed: {self._logger.last_error or 'unknown error'}")

    def _capture(self, key: tuple, stream: torch.cuda.Stream) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=stream if stream != torch.cuda.default_stream(self.device) else None):
                self._enqueue(torch.cuda.current_stream(self.device))
        except Exception as exc:  # noqa: BLE001 - fall back loudly, keep running
            log.warning("CUDA graph capture of %s failed (%s); enqueuing without a graph from now on", self.path, exc)
            self.capture_graphs = False
            self._enqueue(stream)
            return
        self._graphs[key] = graph
        graph.replay()

    def _set_shapes(self, inputs: Sequence[torch.Tensor], sizes: tuple) -> None:
        named = {a: s for (a, _, _), s in zip(self._axis_pos, sizes)}
        profile = self.spec.profile_for(named)  # ValueError naming the built ranges
        if profile != self._profile:
            stream = torch.cuda.current_stream(self.device)
            if not self.context.set_optimization_profile_async(profile, stream.cuda_stream):
                raise TrtEngineError(f"{self.path}: could not select optimisation profile {profile}")
            self._profile = profile
        for b, x in zip(self.spec.inputs, inputs):
            want = b.shape(named)
            if tuple(x.shape) != want:
                raise ValueError(f"{self.spec.name} input {b.name} must have shape {list(want)}; got {list(x.shape)}")
            if b.axes and not self.context.set_input_shape(b.name, want):  # static inputs: the engine's dims
                raise TrtEngineError(f"{self.path}: shape {want} for {b.name} is outside the engine's profile")
        if sizes not in self._views:  # built once per size; the same tensors are returned afterwards
            self._views[sizes] = tuple(t[tuple(slice(0, n) for n in b.shape(named))] if b.axes else t
                                       for b, t in ((b, self.outputs[b.name]) for b in self.spec.outputs))
        self._sizes = sizes

    def _bind_input(self, b: Binding, x: torch.Tensor) -> None:
        if x.dtype != torch_dtype(b.dtype) or x.device != self.outputs[self.spec.output_names[0]].device \
                or not x.is_contiguous():
            raise ValueError(f"{self.spec.name} input {b.name} must be a contiguous {b.dtype} tensor on "
                             f"{self.device}; got {x.dtype} on {x.device}{'' if x.is_contiguous() else ', strided'}")
        self.context.set_tensor_address(b.name, x.data_ptr())
        self._bound[b.name] = x.data_ptr()
        if len(self._bound) > len(self.spec.inputs):
            raise AssertionError("bound more inputs than the spec has")
        log.debug("%s: bound input %s at 0x%x", self.path.name, b.name, x.data_ptr())


def torch_dtype_of(trt, dt: trt.DataType) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.INT8: torch.int8, trt.DataType.BOOL: torch.bool, trt.DataType.BF16: torch.bfloat16,
             trt.DataType.INT64: torch.int64, trt.DataType.UINT8: torch.uint8}
    return table[dt]


# ---- cache and orchestration -------------------------------------------------------------------------

def trt_cache_key(spec: NetworkSpec, onnx_entry: CacheEntry, options: TrtBuildOptions, capability: str) -> CacheKey:
    """Key of an engine: the ONNX key's identity fields + TensorRT version, GPU and build options."""
    trt = import_tensorrt()
    k = onnx_entry.manifest["key"]
    return CacheKey(model=k["model"], weights=k["weights"], lora=tuple(tuple(t) for t in k["lora"]),
                    network=spec.name, shapes=spec.cache_fields(), dtype=k["dtype"], backend="trt",
                    backend_version=f"tensorrt {trt.__version__}; {k['backend_version']}", gpu=capability,
                    options={**options.key_fields(), "onnx_digest": onnx_entry.manifest["digest"]})


def check_module_dtypes(params: SpecParams, **modules: torch.nn.Module) -> None:
    """ValueError unless every module's weights are in the engine dtype: strongly typed engines run in the
    exported graph's types, so an fp16 engine is exported from fp16 modules (and an fp32 module cannot
    feed an fp16 spec; the export would fail later, less clearly)."""
    want = torch_dtype(params.dtype)
    for name, module in modules.items():
        got = next((p.dtype for p in module.parameters() if p.is_floating_point()), want)
        if got != want:
            raise ValueError(f"TensorRT engines are strongly typed: the {name} must be in the engine dtype "
                             f"{params.dtype} to be exported; it is {str(got).removeprefix('torch.')} (load the "
                             f"model with dtype={params.dtype}, or use another backend for mixed dtypes)")


@dataclass(frozen=True)
class UNetExtras:
    """Extra UNet bindings (the temporal KV cache) and the spec-ordered module to export them with."""

    inputs: tuple[Binding, ...] = ()
    outputs: tuple[Binding, ...] = ()
    axes: Mapping[str, Any] | None = None
    module: torch.nn.Module | None = None


def ensure_trt_engines(unet: torch.nn.Module, vae: torch.nn.Module, params: SpecParams, cache: EngineCache, *,
                       model: str, lora: Sequence[tuple[str, str, float]] = (),
                       options: TrtBuildOptions = TrtBuildOptions(), extras: UNetExtras | None = None,
                       weights: Mapping[str, str] | None = None, device: torch.device | None = None,
                       progress: bool = True, rebuild: Sequence[str] = (),
                       controlnets: Sequence[torch.nn.Module] = ()) -> dict[str, CacheEntry]:
    """Cache entries of the engines (UNet, VAE encoder, decoder, ``controlnet_<i>`` for each of
    ``controlnets``, which ``params`` must have been made for), exporting ONNX and building where missing.

    ``rebuild``: network names whose engine entries are discarded first (e.g. after a failed deserialise).
    """
    if len(controlnets) != params.controlnets:
        raise ValueError(f"the specs were made for {params.controlnets} ControlNets; got {len(controlnets)} "
                         "(SpecParams.from_modules(..., controlnets=...))")
    check_module_dtypes(params, unet=unet, vae=vae,  # before anything slow; needs no TensorRT
                        **{f"controlnet {i}": cn for i, cn in enumerate(controlnets)})
    trt = import_tensorrt()
    device = device or next(unet.parameters()).device
    capability = gpu_capability(device)
    if capability == "cpu":
        raise TrtEngineError("building TensorRT engines needs a CUDA device; torch sees none")
    check_dtype(params.dtype, capability)
    extras = extras or UNetExtras()
    specs = make_specs(params, extras.inputs, extras.outputs, extras.axes)
    weights = dict(weights or {})
    weights.setdefault("unet", weights_fingerprint(unet))
    weights.setdefault("vae", weights_fingerprint(vae))
    for i, cn in enumerate(controlnets):
        weights.setdefault(f"controlnet_{i}", weights_fingerprint(cn))
    onnx = export_all_to_cache(unet, vae, specs, cache, model=model, lora=lora, weights=weights,
                               unet_export=extras.module, controlnets=controlnets, verify=False)
    tc = timing_cache_path(cache.root, trt.__version__, capability)
    out = {}
    for name, spec in specs.items():
        key = trt_cache_key(spec, onnx[name], options, capability)
        if name in rebuild:
            cache.invalidate(key, "asked to rebuild")

        def build(folder: Path, spec=spec, src=onnx[name]) -> dict[str, Any]:
            return build_engine(src.artifact(ONNX_FILE), spec, folder / ENGINE_FILE, options,
                                timing_cache=tc, capability=capability, progress=progress)

        out[name] = cache.get_or_build(key, build, versions={"tensorrt": trt.__version__, "torch": torch.__version__})
    return out


def load_or_build_trt(unet: torch.nn.Module, vae: torch.nn.Module, params: SpecParams, cache: EngineCache, *,
                      model: str, lora: Sequence[tuple[str, str, float]] = (),
                      options: TrtBuildOptions = TrtBuildOptions(), extras: UNetExtras | None = None,
                      weights: Mapping[str, str] | None = None, device: torch.device | None = None,
                      capture_graphs: bool = False, share_workspace: bool = True,
                      progress: bool = True, controlnets: Sequence[torch.nn.Module] = ()) -> TrtNetworks:
    """Load the engines for ``params`` from ``cache`` (building them first if needed) as ``TrtNetworks``.

    unet, vae: the diffusers modules on ``device`` in the engine dtype (exported when an ONNX is missing);
        with an IP-Adapter (``params.ip_tokens``) the UNet has its IP attention processors installed, and the
        caller binds the ``ip_scale`` tensor with ``TrtNetworks.bind_inputs(ip_scale=...)``.
    controlnets: the diffusers ControlNetModels, one ``controlnet_<i>`` engine each (``params`` made with
        ``SpecParams.from_modules(..., controlnets=...)``, which gives the UNet its residual inputs).
    params: sizes and profiles (``SpecParams.from_modules(..., batch=unet_batch_range(...))``).
    model: the model id, for readable cache folders; identity comes from ``weights`` (fingerprints
        {"unet": ..., "vae": ...}; computed when not given) and ``lora`` (``versions.lora_identity``).
    An engine that verifies on disk but fails to deserialise is discarded and rebuilt once, with a warning.
    """
    device = device or next(unet.parameters()).device
    args = dict(model=model, lora=lora, options=options, extras=extras, weights=weights, device=device,
                progress=progress, controlnets=tuple(controlnets))
    if weights is None:  # hash once, not on the retry
        args["weights"] = {"unet": weights_fingerprint(unet), "vae": weights_fingerprint(vae),
                           **{f"controlnet_{i}": weights_fingerprint(cn) for i, cn in enumerate(controlnets)}}
    entries = ensure_trt_engines(unet, vae, params, cache, **args)
    specs = make_specs(params, *(((extras.inputs, extras.outputs, extras.axes)) if extras else ()))
    engines: dict[str, TrtEngine] = {}
    for name, entry in entries.items():
        try:
            engines[name] = TrtEngine(entry.artifact(ENGINE_FILE), specs[name], device,
                                      shared_workspace=share_workspace, capture_graphs=capture_graphs)
        except (TrtEngineError, CacheCorrupt) as exc:
            log.warning("%s; rebuilding %s", exc, name)
            entry = ensure_trt_engines(unet, vae, params, cache, rebuild=[name], **args)[name]
            engines[name] = TrtEngine(entry.artifact(ENGINE_FILE), specs[name], device,
                                      shared_workspace=share_workspace, capture_graphs=capture_graphs)
    workspace = None
    if share_workspace:
        workspace = SharedWorkspace(device)
        workspace.attach(list(engines.values()))
    cn_weights = [(args["weights"] or {}).get(f"controlnet_{i}") for i in range(len(controlnets))]
    return TrtNetworks(engines, workspace, controlnet_weights=cn_weights if all(cn_weights) else None)
