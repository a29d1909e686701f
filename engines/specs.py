"""One spec per exported network: the single description that export, build and runtime all read.

A :class:`NetworkSpec` names every binding (input or output) of one network with its dims, where a dim is
either a fixed size or the name of a dynamic axis. Each dynamic axis has one (min, opt, max) range per
optimisation profile. From that one object:

- ``onnx_export`` takes the binding names, ``dynamic_axes`` and ``sample_inputs``;
- ``trt_build`` takes ``profile_shapes`` for each optimisation profile;
- ``trt_runtime`` takes the names, dtypes and ``max_shape`` to preallocate and bind its buffers;
- the engine cache takes ``cache_fields`` (everything above, as plain data) as part of the key.

The three networks (see ``engines/base.py`` for the call shapes), with B the UNet batch, F frames per call,
T text tokens, D the text embedding width, h = H / vae_scale and w = W / vae_scale:

    unet         sample [B, 4, h, w] dtype, timestep [B] float32, embeds [B, T, D] dtype
                 (+ added conditioning: SDXL's text_embeds [B, P] dtype, time_ids [B, 6] dtype)
                 (+ extra inputs)                               -> eps [B, 4, h, w] dtype (+ extra outputs)
    vae_encoder  image  [F, 3, H, W] dtype                      -> latent [F, 4, h, w] dtype
    vae_decoder  latent [F, 4, h, w] dtype                      -> image  [F, 3, H, W] dtype
    controlnet   sample, timestep, embeds [B, T, D], controlnet_cond [B, 3, H, W] dtype (+ added)
                                                                -> down_res_0..down_res_{n-1}, mid_res dtype

With ControlNets (``SpecParams.residuals``, one ``controlnet_<i>`` spec each, all of one layout) the UNet
takes the summed residuals as inputs ``down_res_*``, ``mid_res`` right after the added conditioning; with an
IP-Adapter (``SpecParams.ip_tokens``) its embeds are [B, T + T_ip, D] and it takes ``ip_scale [1] float32``
after the residuals. Both change the UNet's bindings, hence its cache key (``cache_fields``).

Only B and F are dynamic: resolution is fixed per engine (it is part of the cache key), which lets
TensorRT pick the best kernels for the one size that runs. B covers every stream batch a user may switch
between without a rebuild (``unet_batch_range``).

Added conditioning is part of the network, not an extra: ``SpecParams.added`` (from the UNet config, by
``engines.base.unet_added_inputs``) puts those inputs right after ``embeds``, in the order every backend's
``unet(sample, timestep, embeds, *added)`` takes them.

Extra bindings: the temporal KV cache adds bank inputs and fresh K/V outputs to the UNet. Pass them as
``extra_inputs`` / ``extra_outputs`` (``Binding`` objects, dims may use the same axis names "B", or their
own axes with their own ranges in ``extra_axes``). Export, build and runtime then carry them without
change; the module exported must then take the inputs in spec order and return the outputs in spec order
(see ``onnx_adapters.export_adapter``).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch

Dim = int | str  # a fixed size, or the name of a dynamic axis


class Role(enum.Enum):
    INPUT = "input"
    OUTPUT = "output"


_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                torch.int32: "int32", torch.int64: "int64", torch.uint8: "uint8", torch.bool: "bool"}
_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """'float16' for torch.float16: the spelling used in specs, keys and manifests."""
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPE_NAMES.values())}; got {dtype!r}")
    return _DTYPE_NAMES[dtype]


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"dtype name must be one of {', '.join(_DTYPES)}; got {name!r}")
    return _DTYPES[name]


@dataclass(frozen=True)
class Binding:
    """One named tensor of a network. ``dims``: ints are fixed, strings name dynamic axes."""

    name: str
    dims: tuple[Dim, ...]
    dtype: str  # see dtype_name()

    def __post_init__(self) -> None:
        object.__setattr__(self, "dims", tuple(self.dims))
        torch_dtype(self.dtype)  # validates the name
        for d in self.dims:
            if not (isinstance(d, str) and d) and not (isinstance(d, int) and not isinstance(d, bool) and d > 0):
                raise ValueError(f"binding {self.name!r}: each dim must be a positive int or an axis name; got {d!r}")

    @property
    def axes(self) -> tuple[str, ...]:
        return tuple(d for d in self.dims if isinstance(d, str))

    def shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        """Concrete shape with each dynamic axis replaced by ``sizes[axis]``."""
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.dims)


@dataclass(frozen=True)
class AxisRange:
    """min <= opt <= max sizes of one dynamic axis in one optimisation profile."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not (isinstance(self.min, int) and isinstance(self.opt, int) and isinstance(self.max, int)
                and 1 <= self.min <= self.opt <= self.max):
            raise ValueError(f"an axis range needs integers 1 <= min <= opt <= max; got {self.min}, {self.opt}, {self.max}")

    def __contains__(self, n: int) -> bool:
        return self.min <= n <= self.max


Profile = Mapping[str, AxisRange]  # axis name -> range; one per TensorRT optimisation profile


@dataclass(frozen=True)
class NetworkSpec:
    """Everything about one exported network that export, build and runtime share. Frozen: a value."""

    name: str  # "unet", "vae_encoder", "vae_decoder"
    inputs: tuple[Binding, ...]
    outputs: tuple[Binding, ...]
    profiles: tuple[tuple[tuple[str, AxisRange], ...], ...]  # per profile: sorted (axis, range) pairs
    opset: int = 17

    def __post_init__(self) -> None:
        names = [b.name for b in self.bindings]
        if len(set(names)) != len(names):
            raise ValueError(f"spec {self.name!r}: binding names must be unique; got {names}")
        if not self.profiles:
            raise ValueError(f"spec {self.name!r}: at least one optimisation profile is needed")
        axes = {a for b in self.bindings for a in b.axes}
        for i, prof in enumerate(self.profiles):
            missing = axes - {a for a, _ in prof}
            if missing:
                raise ValueError(f"spec {self.name!r}: profile {i} has no range for axes {sorted(missing)}")
        if self.opset < 17:
            raise ValueError(f"spec {self.name!r}: opset must be 17 or later; got {self.opset}")

    # ---- views -------------------------------------------------------------------------------------
    @property
    def bindings(self) -> tuple[Binding, ...]:
        return self.inputs + self.outputs

    @property
    def input_names(self) -> list[str]:
        return [b.name for b in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [b.name for b in self.outputs]

    def binding(self, name: str) -> Binding:
        for b in self.bindings:
            if b.name == name:
                return b
        raise KeyError(f"spec {self.name!r} has no binding {name!r}; it has {[b.name for b in self.bindings]}")

    def profile(self, i: int) -> dict[str, AxisRange]:
        return dict(self.profiles[i])

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``torch.onnx.export(dynamic_axes=...)``: binding -> {dim index: axis name}."""
        return {b.name: {i: d for i, d in enumerate(b.dims) if isinstance(d, str)}
                for b in self.bindings if b.axes}

    def sizes(self, which: str, profile: int = 0) -> dict[str, int]:
        """Axis sizes at ``which`` in ("min", "opt", "max") of one profile."""
        return {a: getattr(r, which) for a, r in self.profiles[profile]}

    def max_sizes(self) -> dict[str, int]:
        """Largest size of each axis over all profiles: what the runtime preallocates."""
        out: dict[str, int] = {}
        for prof in self.profiles:
            for a, r in prof:
                out[a] = max(out.get(a, 0), r.max)
        return out

    def profile_shapes(self, profile: int) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """Input name -> (min, opt, max) shapes, for ``IOptimizationProfile.set_shape``."""
        lo, mid, hi = (self.sizes(w, profile) for w in ("min", "opt", "max"))
        return {b.name: (b.shape(lo), b.shape(mid), b.shape(hi)) for b in self.inputs}

    def profile_for(self, sizes: Mapping[str, int]) -> int:
        """Index of the first profile covering ``sizes``; ValueError naming the ranges otherwise."""
        for i, prof in enumerate(self.profiles):
            if all(sizes[a] in r for a, r in prof if a in sizes):
                return i
        ranges = [{a: (r.min, r.max) for a, r in p} for p in self.profiles]
        raise ValueError(f"{self.name}: sizes {dict(sizes)} are outside every built profile {ranges}; "
                         "rebuild with a wider range (rtdiffusion build --min-steps/--max-steps)")

    def sample_inputs(self, device: torch.device | str = "cpu", sizes: Mapping[str, int] | None = None,
                      seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Random inputs in spec order at ``sizes`` (default: profile 0's opt). Timesteps are in [0, 999]."""
        sizes = dict(sizes or self.sizes("opt"))
        gen = torch.Generator().manual_seed(seed)
        out = []
        for b in self.inputs:
            dt = torch_dtype(b.dtype)
            shape = b.shape(sizes)
            if dt.is_floating_point:
                if b.name == "timestep":
                    t = torch.rand(shape, generator=gen) * 999.0
                elif b.name == "time_ids":  # SDXL size / crop ids: whole pixels
                    t = (torch.rand(shape, generator=gen) * 1024.0).round()
                else:
                    t = torch.randn(shape, generator=gen)
                out.append(t.to(dt).to(device))
            else:
                out.append(torch.zeros(shape, dtype=dt, device=device))
        return tuple(out)

    def cache_fields(self) -> dict[str, Any]:
        """The spec as plain JSON-able data, for cache keys and manifests."""
        return {
            "name": self.name,
            "opset": self.opset,
            "inputs": [[b.name, list(b.dims), b.dtype] for b in self.inputs],
            "outputs": [[b.name, list(b.dims), b.dtype] for b in self.outputs],
            "profiles": [{a: [r.min, r.opt, r.max] for a, r in p} for p in self.profiles],
        }

    def with_extra_bindings(self, inputs: Sequence[Binding] = (), outputs: Sequence[Binding] = (),
                            axes: Mapping[str, AxisRange] | None = None) -> "NetworkSpec":
        """The same spec with more bindings appended (after the standard ones), e.g. KV-cache banks."""
        profiles = tuple(_profile({**dict(p), **dict(axes or {})}) for p in self.profiles)
        return dataclasses.replace(self, inputs=self.inputs + tuple(inputs),
                                   outputs=self.outputs + tuple(outputs), profiles=profiles)


def _profile(ranges: Mapping[str, AxisRange]) -> tuple[tuple[str, AxisRange], ...]:
    return tuple(sorted(ranges.items()))


# ---- the three networks -----------------------------------------------------------------------------

@dataclass(frozen=True)
class SpecParams:
    """What the three specs are built for. Derived from the engine config and the modules' configs.

    width, height: image size in pixels (fixed per engine; changing it means a new engine).
    vae_scale: image pixels per latent pixel (8 for SD VAEs and TAESD; 2 for the tiny test VAE).
    batch: UNet batch ranges, one per optimisation profile (see ``unet_batch_range``).
    frames: VAE batch range (frames per call, F).
    text_len, embed_dim: T and D of the text embeddings (77 and cross_attention_dim for SD).
    dtype: dtype name of every float binding except the timestep (float32).
    added: the UNet's added conditioning inputs, (name, dims after B) in call order; () for SD 1.5 / 2.1.
    controlnets: how many ControlNet engines (0: a plain UNet).
    residuals: the UNet's ControlNet residual inputs, (name, dims after B) in diffusers' order; () without
        ControlNets (``engines.base.unet_control_inputs`` at the latent size).
    ip_tokens: IP-Adapter image tokens after the text tokens in embeds (0: no IP-Adapter, no ip_scale).
    """

    width: int
    height: int
    vae_scale: int = 8
    latent_channels: int = 4
    batch: tuple[AxisRange, ...] = (AxisRange(1, 1, 4),)
    frames: AxisRange = AxisRange(1, 1, 1)
    text_len: int = 77
    embed_dim: int = 1024
    dtype: str = "float16"
    opset: int = 17
    added: tuple[tuple[str, tuple[int, ...]], ...] = ()
    controlnets: int = 0
    residuals: tuple[tuple[str, tuple[int, ...]], ...] = ()
    ip_tokens: int = 0

    def __post_init__(self) -> None:
        for n in ("added", "residuals"):
            object.__setattr__(self, n, tuple((str(k), tuple(d)) for k, d in getattr(self, n)))
        if not (isinstance(self.controlnets, int) and self.controlnets >= 0 and isinstance(self.ip_tokens, int)
                and self.ip_tokens >= 0) or (self.controlnets > 0) != bool(self.residuals):
            raise ValueError("controlnets and ip_tokens must be integers >= 0, and residuals given exactly when "
                             f"controlnets > 0; got {self.controlnets}, {self.ip_tokens}, {len(self.residuals)} residuals")
        if isinstance(self.batch, AxisRange):
            object.__setattr__(self, "batch", (self.batch,))
        object.__setattr__(self, "batch", tuple(self.batch))
        for n in ("width", "height"):
            v = getattr(self, n)
            if not isinstance(v, int) or v <= 0 or v % self.vae_scale:
                raise ValueError(f"{n} must be a positive multiple of the VAE scale {self.vae_scale}; got {v!r}")
        torch_dtype(self.dtype)

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // self.vae_scale, self.width // self.vae_scale

    @staticmethod
    def from_modules(unet: torch.nn.Module, vae: torch.nn.Module, width: int, height: int, *,
                     batch: AxisRange | Sequence[AxisRange], frames: AxisRange = AxisRange(1, 1, 1),
                     dtype: torch.dtype | str | None = None, text_len: int = 77, opset: int = 17,
                     controlnets: Sequence[torch.nn.Module] = (), ip_tokens: int = 0) -> "SpecParams":
        """Read latent channels, embedding width, added conditioning and VAE scale from the modules' configs;
        with ``controlnets`` (diffusers ControlNetModels), the residual layout, which each must share with
        the UNet (ValueError naming both otherwise)."""
        from .base import unet_added_inputs, unet_control_inputs

        ucfg, vcfg = unet.config, vae.config
        blocks = vcfg.get("encoder_block_out_channels") or vcfg.get("block_out_channels")
        if dtype is None:
            dtype = next(unet.parameters()).dtype
        vae_scale = 2 ** (len(blocks) - 1)
        lat = (height // vae_scale, width // vae_scale)
        residuals = unet_control_inputs(ucfg, *lat) if controlnets else ()
        want = (residuals, unet_added_inputs(ucfg), ucfg["cross_attention_dim"], vae_scale)
        for i, cn in enumerate(controlnets):  # residuals, added inputs, text width, control image downscale
            c = cn.config
            got = (unet_control_inputs(c, *lat), unet_added_inputs(c), c["cross_attention_dim"],
                   2 ** (len(c.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)) - 1))
            if got != want:
                raise ValueError(f"ControlNet {i} has (residuals, added inputs, embedding width, image scale) "
                                 f"{got}; the UNet and VAE need {want} (a ControlNet of another model family?)")
        return SpecParams(width=width, height=height, vae_scale=vae_scale,
                          latent_channels=int(ucfg["in_channels"]), batch=batch, frames=frames,
                          text_len=text_len, embed_dim=int(ucfg["cross_attention_dim"]),
                          dtype=dtype if isinstance(dtype, str) else dtype_name(dtype), opset=opset,
                          added=unet_added_inputs(ucfg), controlnets=len(controlnets), residuals=residuals,
                          ip_tokens=ip_tokens)


def unet_batch_range(min_steps: int, max_steps: int, frames: int = 1, guidance: str = "self",
                     opt_steps: int | None = None) -> AxisRange:
    """UNet batch sizes a user can switch between without a rebuild.

    The stream batch is steps x frames rows; ``guidance`` adds uncond rows: "none"/"self" add none,
    "initialize" adds one per frame, "full" doubles the batch (use the most expensive mode you will run).
    """
    if not (isinstance(min_steps, int) and isinstance(max_steps, int) and 1 <= min_steps <= max_steps):
        raise ValueError(f"steps need integers 1 <= min_steps <= max_steps; got {min_steps}, {max_steps}")
    extra = {"none": lambda s: 0, "self": lambda s: 0, "initialize": lambda s: frames, "full": lambda s: s * frames}
    if guidance not in extra:
        raise ValueError(f"guidance must be one of {', '.join(map(repr, extra))}; got {guidance!r}")
    opt = opt_steps if opt_steps is not None else max_steps
    lo = min_steps * frames  # cheapest mode at min steps: "none" has no extra rows
    return AxisRange(lo, max(lo, opt * frames + extra[guidance](opt)), max_steps * frames + extra[guidance](max_steps))


def unet_spec(p: SpecParams, extra_inputs: Sequence[Binding] = (), extra_outputs: Sequence[Binding] = (),
              extra_axes: Mapping[str, AxisRange] | None = None) -> NetworkSpec:
    h, w = p.latent_hw
    c = p.latent_channels
    spec = NetworkSpec(
        name="unet",
        inputs=(Binding("sample", ("B", c, h, w), p.dtype),
                Binding("timestep", ("B",), "float32"),
                Binding("embeds", ("B", p.text_len + p.ip_tokens, p.embed_dim), p.dtype))
        + tuple(Binding(name, ("B", *dims), p.dtype) for name, dims in p.added + p.residuals)
        + ((Binding("ip_scale", (1,), "float32"),) if p.ip_tokens else ()),
        outputs=(Binding("eps", ("B", c, h, w), p.dtype),),
        profiles=tuple(_profile({"B": r}) for r in p.batch),
        opset=p.opset,
    )
    if extra_inputs or extra_outputs or extra_axes:
        spec = spec.with_extra_bindings(extra_inputs, extra_outputs, extra_axes)
    return spec


def vae_encoder_spec(p: SpecParams) -> NetworkSpec:
    h, w = p.latent_hw
    return NetworkSpec(name="vae_encoder",
                       inputs=(Binding("image", ("F", 3, p.height, p.width), p.dtype),),
                       outputs=(Binding("latent", ("F", p.latent_channels, h, w), p.dtype),),
                       profiles=(_profile({"F": p.frames}),), opset=p.opset)


def vae_decoder_spec(p: SpecParams) -> NetworkSpec:
    h, w = p.latent_hw
    return NetworkSpec(name="vae_decoder",
                       inputs=(Binding("latent", ("F", p.latent_channels, h, w), p.dtype),),
                       outputs=(Binding("image", ("F", 3, p.height, p.width), p.dtype),),
                       profiles=(_profile({"F": p.frames}),), opset=p.opset)


def controlnet_spec(p: SpecParams) -> NetworkSpec:
    """One ControlNet: text-only embeds (IP tokens are the UNet's), the control image at the pixel size,
    unscaled residuals out in diffusers' order (the UNet's ``residuals`` inputs)."""
    h, w = p.latent_hw
    if not p.residuals:
        raise ValueError("a ControlNet spec needs SpecParams.residuals (from_modules(..., controlnets=...))")
    return NetworkSpec(
        name="controlnet",
        inputs=(Binding("sample", ("B", p.latent_channels, h, w), p.dtype),
                Binding("timestep", ("B",), "float32"),
                Binding("embeds", ("B", p.text_len, p.embed_dim), p.dtype),
                Binding("controlnet_cond", ("B", 3, p.height, p.width), p.dtype))
        + tuple(Binding(name, ("B", *dims), p.dtype) for name, dims in p.added),
        outputs=tuple(Binding(name, ("B", *dims), p.dtype) for name, dims in p.residuals),
        profiles=tuple(_profile({"B": r}) for r in p.batch), opset=p.opset)


NETWORKS = ("unet", "vae_encoder", "vae_decoder")  # + "controlnet_<i>" per ControlNet (SpecParams.controlnets)


def make_specs(p: SpecParams, unet_extra_inputs: Iterable[Binding] = (), unet_extra_outputs: Iterable[Binding] = (),
               unet_extra_axes: Mapping[str, AxisRange] | None = None) -> dict[str, NetworkSpec]:
    """The specs, keyed by network name (order: unet, vae_encoder, vae_decoder, controlnet_0, ...)."""
    return {"unet": unet_spec(p, tuple(unet_extra_inputs), tuple(unet_extra_outputs), unet_extra_axes),
            "vae_encoder": vae_encoder_spec(p),
            "vae_decoder": vae_decoder_spec(p),
            **{f"controlnet_{i}": controlnet_spec(p) for i in range(p.controlnets)}}
