r"""The engine's ControlNets at run time: one small object per engine, one frame stage.

``make_control`` picks :class:`NoControl` (no ControlNets: the stage does nothing, its residuals are ()) or
builds a :class:`ControlStack` (loads the ControlNets, makes their preprocessors, hands the modules to the
backend's networks once with ``attach_controlnets``). Each layout's ``FrameBuffers`` holds the stack's
:class:`ControlFrame` (``b.control``): preallocated buffers and ``run``, the stage the frame step calls
before the UNet. Notation as in ``buffers.py`` (F frames, S slots, U uncond rows, B = U + S*F UNet rows)::

    per unit i (per engine):  image_i      [F, 3, H, W] in [0, 1]   the preprocessor writes it from b.image
    per layout:               rows         [B, 3, H, W]             image_i repeated over every row (one
                                                                    buffer, reused unit after unit)
                              row_scale_i  [B, 1, 1, 1]             scale * enabled * keep(slot of the row)
                              sums         (down_0 .. down_{n-1}, mid), each [B, C_k, h_k, w_k]

    run:  for each unit i:  preprocess_i(b.image -> image_i); rows <- image_i (all B rows)
                            res = nets.controlnet(i, unet_in, t_unet, embeds, rows, *added)   (scale 1)
                            sums  = row_scale_0 * res           (i = 0)
                            sums += row_scale_i * res           (i > 0)
          -> sums, passed to nets.unet after the added conditioning

Every stream-batch slot (and every uncond row with CFG) gets the residuals of the newest frame's control
image, as StreamDiffusion's ControlNet forks do. keep(s of S) = 0 when s/S < start or (s+1)/S > end, else 1
(diffusers' controlnet_keep with the S denoising steps of the stream batch). ``run`` obeys frame_step.py's
rules: no allocation outside network forwards (``out=``, ``copy_``, ``addcmul_``), no host sync, no branching
on settings: scale, enabled, start and end only change ``row_scale_i``, written between frames
(:meth:`ControlStack.write_settings`), so a captured frame graph stays valid and nothing is recaptured.
A disabled ControlNet still runs (at scale 0): enabling it again is one buffer write, not a new graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from engines.base import unet_control_inputs

from ..config import ControlNetSettings, EngineConfig, StreamSettings
from ..errors import ConfigError
from ..models.families import family_of
from .controlnet import ControlNetSpec, load_controlnet, parse_specs
from .preprocess import make_preprocessor

log = logging.getLogger(__name__)


class NoControl:
    """An engine without ControlNets: the frame stage does nothing and returns no residuals."""

    units: tuple = ()

    def frame(self, layout: Any) -> "NoControl":
        return self

    def run(self, b: Any, nets: Any) -> tuple:
        return ()

    def initial_settings(self, s: StreamSettings) -> StreamSettings:
        if s.controlnets:
            raise ConfigError(f"the settings name {len(s.controlnets)} ControlNet(s) but the engine has none")
        return s

    def write_settings(self, frame: Any, settings: tuple[ControlNetSettings, ...]) -> None:
        pass

    def describe(self, settings: tuple[ControlNetSettings, ...]) -> list[dict]:
        return []

    @property
    def modules(self) -> tuple:
        return ()

    def attach(self, nets: Any, text_tokens: int = 0) -> None:
        pass

    def set_image(self, frame: Any, index: int) -> None:
        raise ConfigError("this engine has no ControlNets; pass controlnets=[{'model': ..., 'preprocessor': "
                          "'external'}] to from_pretrained to give control images")


@dataclass
class ControlUnit:
    """One ControlNet of the engine: its spec, network, preprocessor and control image (per engine)."""

    spec: ControlNetSpec
    module: torch.nn.Module
    family: str
    preprocessor: Any  # control.preprocess.Preprocessor: __call__(image [F,3,H,W] [-1,1], out [F,3,H,W] [0,1])
    image: torch.Tensor  # [F, 3, H, W] in [0, 1], engine dtype: the preprocessor's output


class ControlFrame:
    """One layout's ControlNet buffers and the frame stage (see the module docstring). Built once per layout."""

    def __init__(self, stack: "ControlStack", layout: Any):
        dev, dt = layout.device, layout.dtype
        F, B = layout.frames, layout.unet_rows
        self.layout, self.units = layout, stack.units
        self.rows = torch.zeros(B, 3, layout.height, layout.width, dtype=dt, device=dev)  # [B, 3, H, W]
        self._rows_by_frame = self.rows.view(B // F, F, 3, layout.height, layout.width)  # [B/F, F, 3, H, W]
        self.scales = [torch.zeros(B, 1, 1, 1, dtype=dt, device=dev) for _ in self.units]  # row_scale_i
        self.sums = tuple(torch.zeros(B, *dims, dtype=dt, device=dev)  # down_0 .. down_{n-1}, mid
                          for _, dims in unet_control_inputs(stack.unet_config, layout.latent_h, layout.latent_w))
        self.text_tokens = stack.text_tokens or layout.text_tokens  # text only, no IP-Adapter tokens (attach)
        self.writes = 0  # settings writes (tests, status)

    def run(self, b: Any, nets: Any) -> tuple[torch.Tensor, ...]:
        """The frame stage: every ControlNet on this frame, residuals scaled per row and summed. Enqueues only."""
        embeds = b.embeds[:, :self.text_tokens]  # [B, T, D] (a view)
        for i, unit in enumerate(self.units):  # the units are fixed per engine: an unrolled loop in a graph
            unit.preprocessor(b.image, unit.image)  # [F, 3, H, W] in [-1, 1] -> [0, 1]
            self._rows_by_frame.copy_(unit.image.unsqueeze(0).expand_as(self._rows_by_frame))  # [B, 3, H, W]
            residuals = nets.controlnet(i, b.unet_in, b.t_unet, embeds, self.rows, *b.added)
            for acc, res in zip(self.sums, residuals):  # [B, C_k, h_k, w_k]
                if i == 0:
                    torch.mul(res, self.scales[i], out=acc)
                else:
                    acc.addcmul_(res, self.scales[i])
        return self.sums


class ControlStack:
    """An engine's ControlNets: units (per engine), a ControlFrame per layout, settings written between frames."""

    def __init__(self, units: Sequence[ControlUnit], unet_config: Any):
        self.units, self.unet_config = tuple(units), unet_config
        self.text_tokens: int | None = None  # set by attach

    def frame(self, layout: Any) -> ControlFrame:
        return ControlFrame(self, layout)

    @property
    def modules(self) -> tuple[torch.nn.Module, ...]:
        """The ControlNet modules in index order (what a TensorRT backend builds its controlnet_<i> engines of)."""
        return tuple(u.module for u in self.units)

    def attach(self, nets: Any, text_tokens: int | None = None) -> None:
        """Hand the ControlNet modules to the backend's networks (once, when the engine is built).

        text_tokens: T_text, the prompt's tokens at the head of ``embeds``; an IP-Adapter's image tokens
        follow them (``embeds [B, T_text + T_ip, D]``) and are for the UNet only, as in diffusers' pipelines,
        so the ControlNets get ``embeds[:, :T_text]``. None: all of embeds."""
        self.text_tokens = text_tokens
        if not hasattr(nets, "attach_controlnets"):
            raise ConfigError(f"the {nets.name!r} networks ({nets.describe().get('runs')}) do not run ControlNets "
                              "yet; use backend 'eager', 'graph' or 'compiled' with compile_artifacts 'jit'")
        nets.attach_controlnets(list(self.modules))

    def initial_settings(self, s: StreamSettings) -> StreamSettings:
        """The engine's first settings: the specs' live settings unless the given settings carry them."""
        if not s.controlnets:
            import dataclasses

            return dataclasses.replace(s, controlnets=tuple(u.spec.settings() for u in self.units))
        if len(s.controlnets) != len(self.units):
            raise ConfigError(f"the settings name {len(s.controlnets)} ControlNet(s) but the engine has "
                              f"{len(self.units)}")
        return s

    def write_settings(self, frame: ControlFrame, settings: tuple[ControlNetSettings, ...]) -> None:
        """Between frames: row_scale_i = scale * enabled * keep(slot of the row), written in place."""
        L = frame.layout
        slots = [s for s in range(L.slots) for _ in range(L.frames)]  # slot of each stream row
        uncond = slots[:L.uncond_rows]  # uncond rows copy the first U stream rows (guidance.fill_uncond_rows)
        for buf, st in zip(frame.scales, settings):
            values = [st.scale * st.enabled * st.keep(s, L.slots) for s in uncond + slots]  # [B]
            buf.copy_(torch.tensor(values, dtype=torch.float64).view(-1, 1, 1, 1))
        frame.writes += 1

    def describe(self, settings: tuple[ControlNetSettings, ...]) -> list[dict]:
        return [{"model": u.spec.model, "family": u.family, "preprocessor": u.spec.preprocessor_name,
                 "scale": st.scale, "start": st.start, "end": st.end, "enabled": st.enabled}
                for u, st in zip(self.units, settings)]

    def set_image(self, frame: Any, index: int) -> None:
        """An external control image for unit ``index`` (the engine calls this under its frame lock)."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.units):
            raise ConfigError(f"ControlNet index must be an integer from 0 to {len(self.units) - 1} (this engine "
                              f"has {len(self.units)} ControlNet(s)); got {index!r}")
        pre = self.units[index].preprocessor
        if not hasattr(pre, "write"):
            raise ConfigError(f"ControlNet {index} computes its control image with the "
                              f"{self.units[index].spec.preprocessor_name!r} preprocessor; only 'external' ones "
                              "take images from the caller")
        pre.write(frame)


def make_control(controlnets: Any, components: Any, config: EngineConfig, *, seed: int = 0,
                 local_files_only: bool | None = None) -> NoControl | ControlStack:
    """The engine's control object: NoControl, or the ControlNets loaded and checked against the model
    (the engine then hands them to its networks with :meth:`ControlStack.attach`)."""
    specs = parse_specs(controlnets)
    if not specs:
        return NoControl()
    if config.vae_overlap:
        raise ConfigError("ControlNets do not work with vae_overlap yet (the control image must be computed "
                          "from the frames the UNet denoises, which overlap encodes one call earlier); "
                          "use vae_overlap=False")
    unet_config = components.unet.config
    family = family_of(unet_config).name.value
    F, H, W, dev, dt = config.frame_buffer_size, config.height, config.width, config.device, config.dtype
    units = []
    for i, spec in enumerate(specs):
        module = load_controlnet(spec.model, dev, dt, unet_config, seed=seed + 1000 + i,
                                 local_files_only=local_files_only)
        down = 2 ** (len(module.config.conditioning_embedding_out_channels) - 1)  # its image -> latent scale
        if down != components.vae_scale_factor:
            raise ConfigError(f"ControlNet {spec.model!r} turns {down}x{down} pixels into a latent pixel, the "
                              f"model's VAE {components.vae_scale_factor}x{components.vae_scale_factor}; use a "
                              "ControlNet made for this model")
        if dev.type == "cuda":
            module.to(memory_format=torch.channels_last)  # as the UNet (backends.prepare_cuda_modules)
        pre = _preprocessor(spec, frames=F, height=H, width=W, dtype=dt, device=dev)
        units.append(ControlUnit(spec, module, family, pre, torch.zeros(F, 3, H, W, dtype=dt, device=dev)))
        log.info("ControlNet %d: %s (%s), preprocessor %s", i, spec.model, family, spec.preprocessor_name)
    return ControlStack(units, unet_config)


def _preprocessor(spec: ControlNetSpec, **shape: Any) -> Any:
    if not isinstance(spec.preprocessor, str):
        return spec.preprocessor  # a ready preprocessor object
    return make_preprocessor(spec.preprocessor, **shape, **dict(spec.preprocessor_options))
