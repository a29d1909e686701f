"""The ControlNet residuals a UNet takes: names and shapes, from the UNet (or ControlNet) config alone.

``engines.base.unet_control_inputs`` is the contract's home for this (CORE); until it lands there this
module computes the same from diffusers' down path, and uses the one in ``engines.base`` when it exists:

    conv_in                          -> [C_0, h, w]                         down_res_0
    per down block i (C_i channels): layers_per_block resnets -> [C_i, h_i, w_i] each
                                     + its downsampler (all but the last) -> [C_i, h_i / 2, w_i / 2]
    mid block                        -> [C_last, h_last, w_last]            mid_res

(stride-2 3x3 convs with padding 1 round up: 7 -> 4). SD 1.5 / 2.1: 12 down residuals; SDXL: 9.
tests/engines/test_onnx_control.py holds this against a diffusers ControlNet's own outputs.
"""

from __future__ import annotations

from typing import Any, Mapping

from . import base


def _from_config(config: Mapping[str, Any], height: int, width: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """((name, (C, h, w)), ...) for a UNet / ControlNet config at the latent size ``height`` x ``width``."""
    blocks = [int(c) for c in config["block_out_channels"]]
    per = config.get("layers_per_block", 2)
    per = [int(per)] * len(blocks) if isinstance(per, int) else [int(n) for n in per]
    if len(per) != len(blocks):
        raise ValueError(f"layers_per_block {config.get('layers_per_block')!r} must be one integer or one per block "
                         f"({len(blocks)} blocks)")
    h, w = int(height), int(width)
    shapes = [(blocks[0], h, w)]  # conv_in
    for i, (c, n) in enumerate(zip(blocks, per)):
        shapes += [(c, h, w)] * n
        if i < len(blocks) - 1:  # every down block but the last halves the resolution
            h, w = (h + 1) // 2, (w + 1) // 2
            shapes.append((c, h, w))
    return tuple((f"down_res_{i}", s) for i, s in enumerate(shapes)) + (("mid_res", (blocks[-1], h, w)),)


def unet_control_inputs(config: Mapping[str, Any], height: int, width: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The UNet's ControlNet residual inputs, (name, dims after the batch dim), at latent size height x width."""
    core = getattr(base, "unet_control_inputs", None)
    return tuple((str(n), tuple(d)) for n, d in core(config, height, width)) if core else _from_config(config, height, width)
