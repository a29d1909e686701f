"""``base.Networks`` on TensorRT engines (``trt_runtime.TrtEngine``): which engine input each call argument is.

Every engine input is bound by name from the engine's spec; nothing here counts positions by hand:

    unet(sample, timestep, embeds, *extra)      extra = added conditioning (SDXL: text_embeds, time_ids)
                                                        + ControlNet residual sums (down_res_*, mid_res)
                                                = ``unet_call_inputs(spec)``, passed on every call
         + persistent inputs (the rest of the spec, in spec order: ``ip_scale`` [1] fp32 of an IP-Adapter
           UNet, the KV cache's banks), bound once with ``bind_inputs(name=tensor)``; the engine reads
           whatever is in those tensors at each enqueue, so a live IP scale is a write into its tensor
    controlnet(index, sample, timestep, embeds, controlnet_cond, *added)
                                                -> (down_res_0, ..., mid_res): the ``controlnet_<index>``
                                                   engine's preallocated outputs (unscaled)
    encode(image) -> latent, decode(latent) -> image

All engines share one activation workspace (they run one after another on one stream).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from .specs import NetworkSpec, torch_dtype

if TYPE_CHECKING:
    from .trt_runtime import SharedWorkspace, TrtEngine

ADDED = ("text_embeds", "time_ids")  # engines.base.unet_added_inputs names


def unet_call_inputs(spec: NetworkSpec) -> list[str]:
    """The UNet inputs ``unet()`` takes on every call, in spec order: sample, timestep, embeds, the added
    conditioning and the ControlNet residuals. They come first in the spec; the rest are persistent."""
    names = spec.input_names
    n = 3
    while n < len(names) and (names[n] in ADDED or names[n].startswith("down_res_") or names[n] == "mid_res"):
        n += 1
    return names[:n]


class TrtNetworks:
    """``base.Networks`` on TensorRT engines sharing one activation workspace (see the module docstring).

    ``unet`` returns eps only; extra outputs (the KV cache's fresh K/V) are read from ``unet_outputs`` (the
    preallocated tensors at max size).
    """

    name = "trt"

    def __init__(self, engines: Mapping[str, "TrtEngine"], workspace: "SharedWorkspace | None",
                 controlnet_weights: Sequence[str] | None = None) -> None:
        """controlnet_weights: fingerprints of the ControlNets the engines were built from (checked by
        ``attach_controlnets``; None: not checked)."""
        self._enc = engines["vae_encoder"]
        self._unet = engines["unet"]
        self._dec = engines["vae_decoder"]
        names = [f"controlnet_{i}" for i in range(sum(k.startswith("controlnet_") for k in engines))]
        if not all(n in engines for n in names):
            raise ValueError(f"ControlNet engines must be controlnet_0..controlnet_<n-1>; got {sorted(engines)}")
        self._controlnets = [engines[n] for n in names]
        # ControlNets get the text tokens only: with an IP-Adapter that is a strided view of the UNet's
        # embeds, which an engine cannot read; it is copied into this buffer (allocated once, max batch)
        self._cn_embeds = None  # [B_max, T_text, D] engine dtype
        self._cn_weights = None if controlnet_weights is None else list(controlnet_weights)
        if self._controlnets:
            e = self._controlnets[0]
            b = e.spec.binding("embeds")
            self._cn_embeds = torch.empty(b.shape(e.spec.max_sizes()), dtype=torch_dtype(b.dtype), device=e.device)
        self.workspace = workspace
        call = unet_call_inputs(self._unet.spec)
        self.added = [n for n in call if n in ADDED]  # SDXL: passed to unet() after embeds
        self.residuals = call[3 + len(self.added):]  # ControlNet sums, after the added conditioning
        self.persistent = self._unet.spec.input_names[len(call):]  # bound once: ip_scale, KV-cache banks
        self._n_extra = len(call) - 3
        self._bound: dict[str, torch.Tensor] = {}
        self._tail: tuple[torch.Tensor, ...] | None = () if not self.persistent else None
        self.paths = {k: e.path for k, e in engines.items()}

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self._enc.run(image)[0]

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
             *extra: torch.Tensor) -> torch.Tensor:
        if len(extra) != self._n_extra or self._tail is None:
            raise ValueError(self._unet_call_problem(len(extra)))
        return self._unet.run(sample, timestep, embeds, *extra, *self._tail)[0]

    def controlnet(self, index: int, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
                   cond: torch.Tensor, *added: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(down_res_0, ..., mid_res) of the ``index``-th ControlNet engine: its preallocated outputs,
        valid until its next call. A strided ``embeds`` (text tokens sliced off an IP-Adapter's embeds) is
        copied into a contiguous buffer first (a device copy, no allocation, no sync)."""
        if not embeds.is_contiguous():
            embeds = self._cn_embeds[:embeds.shape[0]].copy_(embeds)  # [B, T_text, D]
        return self._controlnets[index].run(sample, timestep, embeds, cond, *added)

    def attach_controlnets(self, modules: Sequence[torch.nn.Module]) -> None:
        """The engine's ControlNet modules (once, at construction): the engines must have been built from
        them (same count; same weights where the build's fingerprints are known). ValueError otherwise."""
        from .versions import weights_fingerprint

        if len(modules) != len(self._controlnets):
            raise ValueError(f"the TensorRT engines were built for {len(self._controlnets)} ControlNets; this "
                             f"engine has {len(modules)}: build them with the ControlNets (SpecParams.from_modules("
                             "..., controlnets=...) and load_or_build_trt(..., controlnets=...)), or use backend "
                             "'eager', 'graph' or 'compiled'")
        if self._cn_weights is not None:
            for i, (m, want) in enumerate(zip(modules, self._cn_weights)):
                if weights_fingerprint(m) != want:
                    raise ValueError(f"ControlNet {i} has other weights than the TensorRT engine "
                                     f"{self.paths[f'controlnet_{i}']} was built from; rebuild the engines")

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self._dec.run(latent)[0]

    def describe(self) -> dict:
        return {"runs": "TensorRT engines", "engines": {k: str(p) for k, p in self.paths.items()}}

    def bind_inputs(self, **tensors: torch.Tensor) -> None:
        """Persistent UNet inputs by name (``ip_scale=...``, KV banks), once, not per frame. The engine
        reads these tensors at each call; every persistent input must be bound before the first ``unet``."""
        unknown = sorted(set(tensors) - set(self.persistent))
        if unknown:
            raise ValueError(f"the UNet engine has no persistent inputs {unknown}; it has {self.persistent} "
                             f"(per-call inputs {unet_call_inputs(self._unet.spec)} go to unet())")
        self._bound.update(tensors)
        if all(n in self._bound for n in self.persistent):
            self._tail = tuple(self._bound[n] for n in self.persistent)

    def bind_extra(self, *tensors: torch.Tensor) -> None:
        """The persistent inputs in spec order (the KV cache's banks); ``bind_inputs`` by name is the same."""
        if len(tensors) != len(self.persistent):
            raise ValueError(f"the UNet engine has {len(self.persistent)} persistent inputs {self.persistent}; "
                             f"got {len(tensors)} tensors")
        self.bind_inputs(**dict(zip(self.persistent, tensors)))

    def _unet_call_problem(self, got: int) -> str:
        if got != self._n_extra:
            return (f"the UNet engine takes sample, timestep, embeds and {self._n_extra} more inputs "
                    f"{unet_call_inputs(self._unet.spec)[3:]} per call; got {got} more")
        missing = [n for n in self.persistent if n not in self._bound]
        return f"bind the UNet engine's persistent inputs {missing} first (TrtNetworks.bind_inputs)"

    @property
    def unet_outputs(self) -> dict[str, torch.Tensor]:
        return self._unet.outputs

    @property
    def controlnet_count(self) -> int:
        return len(self._controlnets)
