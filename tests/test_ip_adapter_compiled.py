"""IP-Adapter with backend 'compiled' on the CPU, where ``compile_artifacts`` defaults to AOTInductor packages.

Packages do not take the IP attention processors (only diffusers' own: engines/aoti.py StockAttention), so the
UNet runs with the fallback, the plain module on the CPU: a warning at its first call names the processors,
``status()["networks"]["unet"]`` has ``exportable`` False and ``not_exportable`` naming them; the VAE is
packaged as usual. Compile presets 'fast' / 'max' fuse q/k/v projections with diffusers'
``fuse_qkv_projections``, which replaces every attention processor: the IP-Adapter puts its own back before the
first frame (else the image tokens would be attended with the text projections, silently).

No frame runs through the backend here: that would compile the VAE packages (about 20 s on 2 cores; a whole
frame was checked by hand). The UNet call is compared with the eager engine's on the same inputs; nothing is
compiled, so no C++ compiler is needed.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from rtdiffusion import StreamEngine
from rtdiffusion.control.ip_attention import IPAttnProcessor

ENGINE = dict(device="cpu", ip_adapter={"model": "random:ip-adapter-tiny", "scale": 0.8}, prompt="a red cat", seed=3)


def image(seed: int, h: int = 64, w: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def eager():
    """The eager engine after one frame with a style image: its UNet inputs (with the image tokens)."""
    engine = StreamEngine.from_pretrained("random:tiny-sd15", **ENGINE)
    engine.set_style_image(image(1, 40, 40))
    engine(image(2))
    b = engine._state.buffers
    return engine, (b.unet_in, b.t_unet, b.embeds, *b.added)


@pytest.mark.parametrize("preset", ["default", "fast"])
def test_compiled_aoti_backend_runs_the_ip_unet_with_the_fallback(eager, preset, tmp_path, caplog):
    reference, args = eager
    with caplog.at_level(logging.WARNING):
        engine = StreamEngine.from_pretrained("random:tiny-sd15", backend="compiled", compile_preset=preset,
                                              engine_dir=str(tmp_path / "engines"), **ENGINE)
    st = engine.status()
    assert st["backend"] == "compiled" and "compile artifacts: aoti" in st["backend_reason"]
    assert st["networks"]["unet"]["exportable"] is False  # the IP processors: not a package, the fallback
    assert st["networks"]["unet"]["not_exportable"] == "attention processors: IPAttnProcessor"
    procs = engine.components.unet.attn_processors
    cross = [name for name in procs if "attn2" in name]
    assert cross and all(isinstance(procs[name], IPAttnProcessor) for name in cross)
    if preset == "fast":  # q/k/v fused: diffusers' fused processor on self-attention, ours back on cross-attention
        assert "putting them back" in caplog.text
        assert {type(p).__name__ for n, p in procs.items() if "attn1" in n} == {"FusedAttnProcessor2_0"}
        assert all(engine.components.unet.get_submodule(n.removesuffix(".processor")).fused_projections
                   for n in cross)
    else:
        assert "putting them back" not in caplog.text
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        got = engine._base_nets.unet(*args)
        want = reference._base_nets.unet(*args)
        reference._ip.scale.write(0.0)
        plain = reference._base_nets.unet(*args)
        reference._ip.scale.write(0.8)
    assert (want - plain).abs().max() > 1e-3  # the image tokens matter
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()
    unet = engine.status()["networks"]["unet"]
    assert unet["packages"] == [] and unet["built"] == 0 and not list(tmp_path.rglob("*.pt2"))
    assert "unet has attention processors a package does not take (IPAttnProcessor)" in caplog.text
