"""Model families: what differs between SD 1.5, SD 2.1 (sd-turbo) and SDXL (SDXL-Turbo), as data.

The loader, the prompt encoder, the buffers, the exporters and the frame step read a family's spec; none of
them tests a model's name. What a family fixes:

- its text side (one CLIP encoder, or SDXL's two: ``models/text.py``);
- the UNet's added conditioning (none, or SDXL's pooled embedding and size ids), read from the UNet config
  by ``engines.base.unet_added_inputs`` and owned at run time by ``rtdiffusion/conditioning.py``;
- which TAESD matches its latent space, and whether its KL VAE is safe in fp16 (SDXL's is not);
- the published configs of its ``random:`` architectures (:data:`RANDOM_ARCHS`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..config import SchedulerKind


class FamilyName(enum.Enum):
    SD15 = "sd15"
    SD21 = "sd21"
    SDXL = "sdxl"


@dataclass(frozen=True)
class ModelFamily:
    name: FamilyName
    text_encoders: int  # 1, or 2 for SDXL (text_encoder/ + text_encoder_2/ in a diffusers folder)
    taesd_repo: str  # the TAESD trained for this family's latent space
    kl_vae_fp16_safe: bool  # False: the stock KL VAE overflows in fp16, so the engine runs it in fp32
    fp16_fix_vae: str | None = None  # a KL VAE fine-tuned to stay finite in fp16, if one is published

    @property
    def folder_parts(self) -> tuple[str, ...]:
        """Subfolders of a diffusers pipeline folder this family loads (the KL VAE's 'vae' aside)."""
        text = ("text_encoder", "tokenizer") + (("text_encoder_2", "tokenizer_2") if self.text_encoders == 2 else ())
        return ("unet", "scheduler") + text


SD15 = ModelFamily(FamilyName.SD15, 1, "madebyollin/taesd", kl_vae_fp16_safe=True)
SD21 = ModelFamily(FamilyName.SD21, 1, "madebyollin/taesd", kl_vae_fp16_safe=True)
SDXL = ModelFamily(FamilyName.SDXL, 2, "madebyollin/taesdxl", kl_vae_fp16_safe=False,
                   fp16_fix_vae="madebyollin/sdxl-vae-fp16-fix")
FAMILIES = {f.name: f for f in (SD15, SD21, SDXL)}


def family_of(unet_config: Mapping[str, Any]) -> ModelFamily:
    """The family of a diffusers UNet config: SDXL by its text/time added embedding, else by text width."""
    if unet_config.get("addition_embed_type") == "text_time":
        return SDXL
    return SD15 if int(unet_config.get("cross_attention_dim", 0)) == 768 else SD21


@dataclass(frozen=True)
class RandomArch:
    """A ``random:<name>`` model: packaged configs, built with seeded random weights."""

    family: ModelFamily
    unet: str
    text_encoders: tuple[str, ...]  # one config per encoder (the second one with projection, for SDXL)
    taesd: str
    vae_kl: str
    scheduler: SchedulerKind
    scheduler_config: str
    default_size: int
    unet_overrides: Mapping[str, Any] = field(default_factory=dict)  # e.g. sample_size of SDXL base

    @property
    def text_encoder(self) -> str:
        """The first (for SD 1.5 / 2.1 the only) text encoder's config."""
        return self.text_encoders[0]


RANDOM_ARCHS = {
    "sd-turbo": RandomArch(SD21, "sd_turbo_unet.json", ("openclip_vit_h14_text_sd21.json",), "taesd.json",
                           "sd21base_vae_kl.json", SchedulerKind.TURBO, "sd_turbo_scheduler.json", 512),
    "sd15": RandomArch(SD15, "sd15_unet.json", ("clip_vit_l14_text_sd15.json",), "taesd.json", "sd_vae_kl.json",
                       SchedulerKind.LCM, "lcm_scheduler_sd15_lcmlora.json", 512),
    # SD 1.5-style tiny UNet (no linear projection, 8 heads), the CPU-test size for SD 1.5 features (IP-Adapter)
    "tiny-sd15": RandomArch(SD15, "tiny_unet_sd15style.json", ("tiny_clip_text.json",), "tiny_taesd_test.json",
                            "tiny_vae_kl.json", SchedulerKind.LCM, "lcm_scheduler_sd15_lcmlora.json", 64),
    "tiny": RandomArch(SD21, "tiny_unet_sd2style.json", ("tiny_clip_text.json",), "tiny_taesd_test.json",
                       "tiny_vae_kl.json", SchedulerKind.TURBO, "sd_turbo_scheduler.json", 64),
    # SDXL-Turbo: EulerAncestral with trailing spacing; one step (or a schedule's last) is plain Euler's x0
    "sdxl-turbo": RandomArch(SDXL, "sdxl_unet.json",
                             ("clip_vit_l14_text_sd15.json", "openclip_vit_bigg14_text_sdxl.json"),
                             "taesdxl.json", "sdxl_vae_kl.json", SchedulerKind.TURBO, "sdxl_turbo_scheduler.json",
                             512),
    # SDXL base as run with LCM-LoRA (the LCM scheduler on SDXL's betas, which equal SD 1.5's): 1024 px
    "sdxl": RandomArch(SDXL, "sdxl_unet.json",
                       ("clip_vit_l14_text_sd15.json", "openclip_vit_bigg14_text_sdxl.json"),
                       "taesdxl.json", "sdxl_vae_kl.json", SchedulerKind.LCM, "lcm_scheduler_sd15_lcmlora.json",
                       1024, {"sample_size": 128}),
    "tiny-sdxl": RandomArch(SDXL, "tiny_unet_sdxl_style.json", ("tiny_clip_text.json", "tiny_clip_text_proj.json"),
                            "tiny_taesd_test.json", "tiny_vae_kl.json", SchedulerKind.TURBO,
                            "sdxl_turbo_scheduler.json", 64),
}
