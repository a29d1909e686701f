"""The compiled backend's AOTInductor package for an SDXL UNet (tiny SDXL-style config, CPU, float32): the
package takes the added conditioning (text_embeds, time_ids) after the prompt embeddings, is built once
into the engine cache, and computes what the module does. Only the UNet is compiled here; the VAE packages
are the same for every family and are tested in test_aoti.py. The UNet is the tiny SDXL-style config cut to
one level with one transformer layer: what this test is about (the added-conditioning path: add_embedding,
time_ids, text_embeds) is all there, and the compile takes a third of the full tiny config's time."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from engines.aoti import AotiNetworks
from engines.base import TorchNetworks
from engines.cache import EngineCache
from rtdiffusion.config import VaeKind
from rtdiffusion.models.loading import load_components, read_config

pytestmark = pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++")),
                                reason="AOTInductor compiles C++ on the CPU: needs g++ (apt-get install g++)")


def test_sdxl_unet_package_takes_the_added_conditioning(tmp_path):
    from diffusers import UNet2DConditionModel

    comps = load_components("random:tiny-sdxl", torch.device("cpu"), torch.float32, VaeKind.TINY)
    config = {**read_config("tiny_unet_sdxl_style.json"), "block_out_channels": [64], "layers_per_block": 1,
              "down_block_types": ["CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D"],
              "attention_head_dim": [4], "transformer_layers_per_block": [1]}  # 64 channels: 2 per norm group,
    # so the time embedding (with the size ids) is not normalised away as it is with 1 channel per group
    with torch.random.fork_rng():
        torch.manual_seed(0)
        comps.unet = UNet2DConditionModel.from_config(config).eval()
    nets = AotiNetworks(comps.unet, comps.vae, cache=EngineCache(tmp_path), model="random:tiny-sdxl", preset={})
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 4, 32, 32, generator=g), torch.tensor([999.0, 499.0]),
            torch.randn(2, 77, 64, generator=g), torch.randn(2, 32, generator=g),
            torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2))
    got = nets.unet(*args)
    info = nets.describe()["unet"]
    assert info["built"] == 1 and not info["fallbacks"], info
    want = TorchNetworks(comps.unet, comps.vae).unet(*args)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    other = list(args)
    other[4] = other[4] + 64.0  # other size ids reach the package
    assert (nets.unet(*other) - got).abs().max() > 1e-5
