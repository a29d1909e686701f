"""The compiled backend's AOTInductor package for an SDXL UNet (tiny SDXL-style config, CPU, float32): the
package takes the added conditioning (text_embeds, time_ids) after the prompt embeddings, is built once
into the engine cache, and computes what the module does. Only the UNet is compiled here (about 30 s on
2 cores); the VAE packages are the same for every family and are tested in test_aoti.py."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from engines.aoti import AotiNetworks
from engines.base import TorchNetworks
from engines.cache import EngineCache
from rtdiffusion.config import VaeKind
from rtdiffusion.models.loading import load_components

pytestmark = pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++")),
                                reason="AOTInductor compiles C++ on the CPU: needs g++ (apt-get install g++)")


def test_sdxl_unet_package_takes_the_added_conditioning(tmp_path):
    comps = load_components("random:tiny-sdxl", torch.device("cpu"), torch.float32, VaeKind.TINY)
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
