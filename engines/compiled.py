"""torch.compile'd networks (Inductor, default mode), replayed inside the whole-frame CUDA graph.

Compilation happens on the first calls (the graph executor's warm-up), so the first frame of a new layout
takes as long as Inductor needs (about a minute for an SD UNet); shapes are static per layout.
"""

from __future__ import annotations

import torch

from .base import TorchNetworks


class CompiledNetworks(TorchNetworks):
    def __init__(self, unet_module: torch.nn.Module, vae_module: torch.nn.Module, mode: str = "default"):
        super().__init__(unet_module, vae_module, name="compiled")
        kw = dict(mode=mode, fullgraph=False, dynamic=False)
        self._unet_c = torch.compile(unet_module.forward, **kw)
        self._enc_c = torch.compile(vae_module.encode, **kw)
        self._dec_c = torch.compile(vae_module.decode, **kw)

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        out = self._enc_c(image, return_dict=False)[0]
        return out if self._tiny else out.mode()

    @torch.no_grad()
    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        return self._unet_c(sample, timestep, encoder_hidden_states=embeds, return_dict=False)[0]

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self._dec_c(latent, return_dict=False)[0]
