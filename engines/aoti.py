"""AOTInductor packages: the compiled backend's networks, compiled once and kept in the engine cache.

The first call of a network (UNet, VAE encoder, VAE decoder) with a new input signature (shapes, strides,
dtypes) exports it with ``torch.export`` and compiles it ahead of time with AOTInductor into a package
(``model.pt2``) stored through :meth:`EngineCache.get_or_build`; later calls, and later processes, load that
package instead of compiling (about a second instead of a minute or more).

The package holds the generated code, not the weights: they stay in the loaded modules and are bound to the
package at load time as user-managed constants (no copy), so packages for several UNet batch sizes share
one copy of the weights. Inductor still folds a few derived constants into the code (a TAESD conv bias, for
one), so a package is only valid for the weights it was built from: the key (:func:`package_key`) holds the
weights' fingerprint, the module's config and attention processor classes, every constant's name, shape,
stride and dtype, the input signature, the Inductor options, the torch / diffusers / triton versions and the
GPU (or the CPU's vector ISA). The constants table is also kept in the manifest and checked at load.

What a package cannot hold falls back, loudly (log and :meth:`AotiNetworks.describe`), to ``fallback``:
torch.compile on CUDA, the plain module on the CPU. That covers a UNet with the temporal KV cache's
attention processors installed (they carry state between frames), and any export, compile or load error.

Calls enqueue on the current CUDA stream; packages are loaded with ``run_single_threaded`` so a call does
no event query or host sync and can be captured in the whole-frame CUDA graph. Parameters must keep their
storage while the networks live (the engine prepares the modules' memory format before building them).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import hashlib
import json
import logging
import platform
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from .base import unet_added_inputs
from .cache import CacheEntry, CacheKey, EngineCache, _canon
from .fingerprints import cached_fingerprint
from .versions import gpu_capability, package_version, weights_fingerprint

log = logging.getLogger(__name__)

PACKAGE = "model.pt2"
# The package never embeds the weights: they are bound at load (see the module docstring).
BASE_OPTIONS = {"aot_inductor.package_constants_in_so": False}
# Inductor options that need the weights' values inside the artifact; dropped from presets here.
NEEDS_WEIGHTS = ("freezing",)


@functools.cache
def versions(cuda: bool) -> dict[str, str | None]:
    """What a package depends on (key and manifest); not versions.library_versions(), which imports onnx,
    onnxruntime and tensorrt: seconds of a restart for libraries no package uses."""
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": package_version("diffusers"),
            "triton": package_version("triton") if cuda else None}


class NetworkKind(enum.Enum):
    UNET = "unet"
    VAE_ENCODER = "vae_encoder"
    VAE_DECODER = "vae_decoder"


# ---- what gets exported: each network call as a module of tensors in, one tensor out ----------------------
class UNetCall(torch.nn.Module):
    """``added``: the UNet's added conditioning in ``engines.base.unet_added_inputs`` order (SDXL)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.net = unet
        self.added_names = [n for n, _ in unet_added_inputs(unet.config)]

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
                *added: torch.Tensor) -> torch.Tensor:
        kw = {"added_cond_kwargs": dict(zip(self.added_names, added))} if self.added_names else {}
        return self.net(sample, timestep, encoder_hidden_states=embeds, return_dict=False, **kw)[0]


class EncodeCall(torch.nn.Module):
    """AutoencoderTiny gives latents; AutoencoderKL a distribution, of which we take the mode."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.net = vae
        self.tiny = not hasattr(vae, "quant_conv")

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out = self.net.encode(image, return_dict=False)[0]
        return out if self.tiny else out.mode()


class DecodeCall(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.net = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.net.decode(latent, return_dict=False)[0]


class StockAttention:
    """Asks whether every attention processor of a module is one of diffusers' own (no state carried
    between calls); the attention layers are listed once, the processors read at each call."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.layers = [m for m in module.modules() if hasattr(m, "processor")]

    def __call__(self) -> bool:
        return all(type(m.processor).__module__.startswith("diffusers.") for m in self.layers)

    def others(self) -> list[str]:
        """The processor classes that are not diffusers' own (IP-Adapter, temporal KV cache), by name."""
        return sorted({type(m.processor).__qualname__ for m in self.layers
                       if not type(m.processor).__module__.startswith("diffusers.")})


# ---- keys -----------------------------------------------------------------------------------------------
Signature = tuple[tuple[tuple[int, ...], tuple[int, ...], str], ...]  # per input: shape, stride, dtype


def signature(args: tuple[torch.Tensor, ...]) -> Signature:
    return tuple((tuple(a.shape), tuple(a.stride()), str(a.dtype).replace("torch.", "")) for a in args)


def constants(wrapper: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by its name in the exported program (shared tensors under each name)."""
    out = dict(wrapper.named_parameters(remove_duplicate=False))
    out.update(wrapper.named_buffers(remove_duplicate=False))
    return out


def constants_table(wrapper: torch.nn.Module) -> dict[str, list]:
    return {name: [list(t.shape), list(t.stride()), str(t.dtype).replace("torch.", "")]
            for name, t in sorted(constants(wrapper).items())}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(_canon(value), sort_keys=True).encode()).hexdigest()[:32]


def target(device: torch.device) -> str:
    """What generated code is specific to: the GPU's compute capability, or the CPU's vector ISA."""
    if device.type == "cuda":
        return gpu_capability(device)
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        isa = str(pick_vec_isa()) or "scalar"
    except Exception:  # noqa: BLE001 - private API: an unknown ISA only makes the key more specific
        isa = "unknown"
    return f"cpu-{platform.machine()}-{isa}"


def package_key(kind: NetworkKind, wrapper: torch.nn.Module, sig: Signature, *, model: str,
                device: torch.device, options: dict[str, Any], weights: str | None = None) -> CacheKey:
    """``weights``: ``versions.weights_fingerprint(wrapper)``, when the caller has it already."""
    net = wrapper.net
    # diffusers' bookkeeping entries ("_use_default_values" is a list in set order, "_name_or_path" a path)
    config = {k: v for k, v in dict(getattr(net, "config", {}) or {}).items() if not k.startswith("_")}
    processors = sorted({type(m.processor).__qualname__ for m in net.modules() if hasattr(m, "processor")})
    v = versions(device.type == "cuda")
    return CacheKey(
        model=model,
        weights=weights or weights_fingerprint(wrapper),
        lora=(),
        network=kind.value,
        shapes={"inputs": sig, "module": type(net).__qualname__, "config": _digest(config),
                "processors": processors, "constants": _digest(constants_table(wrapper))},
        dtype=sig[0][2],
        backend="aoti",
        backend_version=f"torch {v['torch']}; diffusers {v['diffusers']}; triton {v['triton'] or 'n/a'}",
        gpu=target(device),
        options={"inductor": options},
    )


def inductor_options(preset: dict[str, Any]) -> dict[str, Any]:
    return {**BASE_OPTIONS, **{k: v for k, v in preset.items() if k not in NEEDS_WEIGHTS}}


# ---- build and load -------------------------------------------------------------------------------------
class ConstantsMismatch(RuntimeError):
    """A package's constants do not match the module's tensors (names, shapes, strides or dtypes)."""


def build_package(folder, wrapper: torch.nn.Module, args: tuple[torch.Tensor, ...],
                  options: dict[str, Any]) -> dict[str, Any]:
    """Export ``wrapper`` at ``args`` and compile it into ``folder/model.pt2``; returns the manifest extra."""
    from torch._inductor import aoti_compile_and_package

    with torch.no_grad():
        program = torch.export.export(wrapper, tuple(args), strict=False)
        aoti_compile_and_package(program, package_path=str(folder / PACKAGE), inductor_configs=dict(options))
    return {"constants": constants_table(wrapper), "inputs": signature(args)}


def load_package(entry: CacheEntry, wrapper: torch.nn.Module, device: torch.device) -> "PackageRunner":
    from torch._inductor import aoti_load_package

    table = entry.extra.get("constants")
    have = constants(wrapper)
    mine = constants_table(wrapper)
    if not isinstance(table, dict):
        raise ConstantsMismatch(f"{entry.path}: the manifest has no constants table")
    index = (device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else -1
    model = aoti_load_package(str(entry.artifact(PACKAGE)), run_single_threaded=True, device_index=index)
    bound = {}
    for fqn in model.get_constant_fqns():
        if fqn not in have:
            raise ConstantsMismatch(f"{entry.path}: the package needs constant {fqn!r}, which the module lacks")
        if mine[fqn] != table.get(fqn):
            raise ConstantsMismatch(f"{entry.path}: constant {fqn!r} is {mine[fqn]} in the module but "
                                    f"{table.get(fqn)} in the package (shape, stride, dtype)")
        bound[fqn] = have[fqn]
    model.load_constants(bound, check_full_update=True, user_managed=True)
    return PackageRunner(model, bound)


@dataclass
class PackageRunner:
    """A loaded package and the tensors bound to it (kept referenced: the package reads their storage)."""

    model: Any
    bound: dict[str, torch.Tensor]

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        return self.model(*args)


# ---- one network, one package per signature ---------------------------------------------------------------
@dataclass(frozen=True)
class PackageContext:
    """What every package of one engine shares. ``identity``: where the weights came from
    (``Components.identity``), so their fingerprint can be remembered across restarts (fingerprints.py)."""

    cache: EngineCache
    model: str
    device: torch.device
    options: dict[str, Any]
    identity: Mapping[str, Any] | None = None
    stage: Callable[[str], Any] | None = None  # build-progress hook: stage(kind) around a first build / load


class AotiNetwork:
    """One network: a package per input signature, from the engine cache or built now; else ``fallback``."""

    def __init__(self, kind: NetworkKind, wrapper: torch.nn.Module, ctx: PackageContext,
                 fallback: Callable[..., torch.Tensor], exportable: Callable[[], bool] = lambda: True) -> None:
        self.kind, self.wrapper, self.ctx = kind, wrapper, ctx
        self.fallback, self.exportable = fallback, exportable
        self._runners: dict[Signature, Callable[..., torch.Tensor]] = {}
        self.built = self.loaded = 0
        self.fallbacks: dict[str, str] = {}  # signature (as text) -> why the fallback runs it
        self.folders: list[str] = []  # cache entries in use
        self._weights: str | None = None  # fingerprint, taken at the first package (weights are fixed then)
        self.seconds: dict[str, float] = {}  # start-up cost: fingerprint, cache lookup (or build), load
        self._told = False  # the fallback for processors was logged

    def _why(self) -> str:
        others = getattr(self.exportable, "others", None)
        return ", ".join(others()) if others is not None else "not exportable"

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if not self.exportable():  # e.g. the temporal KV cache's or the IP-Adapter's processors: the fallback
            if not self._told:
                self._told = True
                log.warning("AOTInductor: %s has attention processors a package does not take (%s); it runs with "
                            "the fallback (torch.compile on CUDA, the plain module on the CPU) while they are "
                            "installed", self.kind.value, self._why())
            return self.fallback(*args)
        sig = signature(args)
        run = self._runners.get(sig)
        if run is None:
            stage = self.ctx.stage(self.kind.value) if self.ctx.stage is not None else contextlib.nullcontext()
            with stage:
                run = self._runners[sig] = self._prepare(sig, args)
        return run(*args)

    def _prepare(self, sig: Signature, args: tuple[torch.Tensor, ...]) -> Callable[..., torch.Tensor]:
        ctx = self.ctx
        t0 = time.perf_counter()
        if self._weights is None:
            self._weights = cached_fingerprint(self.wrapper, ctx.identity, self.kind.value, ctx.cache.root)
            self.seconds["fingerprint"] = round(time.perf_counter() - t0, 3)
        key = package_key(self.kind, self.wrapper, sig, model=ctx.model, device=ctx.device, options=ctx.options,
                          weights=self._weights)
        shapes = " ".join("x".join(map(str, s[0])) for s in sig)
        built: list[bool] = []

        def build(folder) -> dict[str, Any]:
            log.info("AOTInductor: compiling %s for %s (once; kept in %s)", self.kind.value, shapes, ctx.cache.root)
            built.append(True)
            return build_package(folder, self.wrapper, args, ctx.options)

        try:
            for attempt in (1, 2):
                t1 = time.perf_counter()
                entry = ctx.cache.get_or_build(key, build, versions=versions(ctx.device.type == "cuda"))
                t2 = time.perf_counter()
                try:
                    runner = load_package(entry, self.wrapper, ctx.device)
                except Exception as exc:  # verified on disk but unusable: rebuild once
                    if attempt == 2:
                        raise
                    ctx.cache.invalidate(key, f"AOTInductor could not load it: {type(exc).__name__}: {exc}")
                    continue
                self.seconds.update(lookup_or_build=round(t2 - t1, 3), load=round(time.perf_counter() - t2, 3))
                self.folders.append(entry.path.name)
                self.built += bool(built)
                self.loaded += not built
                log.info("AOTInductor: %s %s for %s (%s)", "built" if built else "loaded", self.kind.value,
                         shapes, entry.path.name)
                return runner
        except Exception as exc:  # noqa: BLE001 - export/compile/load errors are many; the fallback runs instead
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.warning("AOTInductor could not package %s for %s (%s); running it with the fallback instead",
                        self.kind.value, shapes, why)
            self.fallbacks[shapes] = why
            return self.fallback
        raise AssertionError("unreachable")

    def describe(self) -> dict[str, Any]:
        exportable = self.exportable()
        return {"packages": list(self.folders), "built": self.built, "loaded": self.loaded,
                "fallbacks": dict(self.fallbacks), "exportable": exportable, "seconds": dict(self.seconds),
                **({} if exportable else {"not_exportable": f"attention processors: {self._why()}"})}


class AotiNetworks:
    """The three network calls of :mod:`engines.base` through AOTInductor packages (backend 'compiled')."""

    name = "compiled"

    def __init__(self, unet: torch.nn.Module, vae: torch.nn.Module, *, cache: EngineCache, model: str,
                 preset: dict[str, Any], jit: Callable[[torch.nn.Module], Callable] | None = None,
                 identity: Mapping[str, Any] | None = None, stage: Callable[[str], Any] | None = None) -> None:
        device = next(unet.parameters()).device
        ctx = PackageContext(cache=cache, model=model, device=device, options=inductor_options(preset),
                             identity=identity, stage=stage)
        jit = jit or (lambda m: m)

        def network(kind: NetworkKind, wrapper: torch.nn.Module, **kw: Any) -> AotiNetwork:
            return AotiNetwork(kind, wrapper.eval(), ctx, fallback=jit(wrapper), **kw)

        self._unet = network(NetworkKind.UNET, UNetCall(unet), exportable=StockAttention(unet))
        self._vae_dtype = next(vae.parameters()).dtype  # SDXL's KL VAE runs in fp32: cast around it
        self._encode = network(NetworkKind.VAE_ENCODER, EncodeCall(vae))
        self._decode = network(NetworkKind.VAE_DECODER, DecodeCall(vae))

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self._encode(image.to(self._vae_dtype)).to(image.dtype)

    @torch.no_grad()
    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
             *added: torch.Tensor) -> torch.Tensor:
        return self._unet(sample, timestep, embeds, *added)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self._decode(latent.to(self._vae_dtype)).to(latent.dtype)

    def describe(self) -> dict[str, Any]:
        return {"runs": "AOTInductor packages (aoti)", "cache": str(self._unet.ctx.cache.root), **{n.kind.value: n.describe() for n in (self._unet, self._encode, self._decode)}}
