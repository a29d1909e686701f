"""SDXL-class models on the CPU with the tiny SDXL-style config (``random:tiny-sdxl``).

A real diffusers SDXL folder is written here (unet/, text_encoder/, text_encoder_2/, tokenizer/,
tokenizer_2/ with locally made CLIP vocabularies, scheduler/, vae/) with seeded random weights, and the
engine is held against diffusers' own StableDiffusionXLImg2ImgPipeline built from the same modules.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rtdiffusion import ConfigError, StreamEngine, VaeKind
from rtdiffusion.models.families import RANDOM_ARCHS, SDXL, FamilyName
from rtdiffusion.models.loading import load_components, read_config
from rtdiffusion.models.text import DualClipText
from rtdiffusion.models.tokenizer import ClipTokenizer
from test_loading import same_weights, write_tokenizer

H = W = 64
CPU = torch.device("cpu")


def frame(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def xl_folder(tmp_path_factory):
    """(pipeline folder, TAESD folder, saved modules): a tiny SDXL in diffusers layout."""
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = tmp_path_factory.mktemp("tiny-sdxl")
    strip = lambda c: {k: v for k, v in c.items() if k != "architectures"}  # noqa: E731
    torch.manual_seed(321)
    saved = {
        "unet": UNet2DConditionModel.from_config(read_config("tiny_unet_sdxl_style.json")),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**strip(read_config("tiny_clip_text.json")))),
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**strip(read_config("tiny_clip_text_proj.json")))),
        "vae": AutoencoderKL.from_config(read_config("tiny_vae_kl.json")),
        "taesd": AutoencoderTiny.from_config(read_config("tiny_taesd_test.json")),
    }
    pipe, taesd = root / "pipe", root / "taesd"
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        saved[name].save_pretrained(pipe / name)
    saved["taesd"].save_pretrained(taesd)
    write_tokenizer(pipe / "tokenizer")
    write_tokenizer(pipe / "tokenizer_2")
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps(read_config("sdxl_turbo_scheduler.json")))
    return pipe, taesd, saved


# --------------------------------------------------------------------------------------------- loading
def test_random_sdxl_turbo_is_the_published_architecture():
    """random:sdxl-turbo: the SDXL-Turbo UNet and both text encoders (meta device: no weights made)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    arch = RANDOM_ARCHS["sdxl-turbo"]
    assert arch.family is SDXL and arch.default_size == 512 and RANDOM_ARCHS["sdxl"].default_size == 1024
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(read_config(arch.unet))
        te1 = CLIPTextModel(CLIPTextConfig(**read_config(arch.text_encoders[0])))
        cfg2 = {k: v for k, v in read_config(arch.text_encoders[1]).items() if k != "architectures"}
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg2))
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    assert sum(p.numel() for p in te2.parameters()) == 694_659_840
    # SDXL's conditioning: 768 + 1280 token width, 1280 pooled + 6 size ids x 256 -> 2816
    assert unet.config.cross_attention_dim == te1.config.hidden_size + te2.config.hidden_size == 2048
    assert unet.config.projection_class_embeddings_input_dim == te2.config.projection_dim + 6 * 256


def test_random_tiny_sdxl_engine_runs_with_both_encoders():
    comps = load_components("random:tiny-sdxl", CPU, torch.float32, VaeKind.TINY)
    assert comps.family is SDXL and isinstance(comps.text, DualClipText)
    assert (comps.text.dim, comps.text.pooled_dim) == (64, 32)
    engine = StreamEngine(_config("random:tiny-sdxl"), comps)
    engine.update_prompt("a red cat")
    out = engine(frame())
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    b = engine._state.buffers
    assert [tuple(t.shape) for t in b.added] == [(1, 32), (1, 6)]
    assert b.added[1][0].tolist() == [H, W, 0, 0, H, W]


def test_local_sdxl_folder_loads_its_own_weights(xl_folder):
    pipe, taesd, saved = xl_folder
    comps = load_components(str(pipe), CPU, torch.float32, VaeKind.KL)
    assert comps.family is SDXL and comps.family.name is FamilyName.SDXL
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        assert same_weights(getattr(comps, name), saved[name]), name
    assert isinstance(comps.tokenizer, ClipTokenizer) and isinstance(comps.tokenizer_2, ClipTokenizer)
    tiny = load_components(str(pipe), CPU, torch.float32, VaeKind.TINY, vae_id=str(taesd))
    assert same_weights(tiny.vae, saved["taesd"])
    assert tiny.default_size == 32 * 2  # unet sample_size x the 2x tiny VAE


def _config(model, width=W, height=H, **kw):
    from rtdiffusion.config import EngineConfig

    return EngineConfig(model, width, height, CPU, torch.float32, **kw)


# ------------------------------------------------------------------ parity with diffusers' SDXL img2img
@pytest.mark.parametrize("cfg,negative", [("none", ""), ("full", "blurry, dark")])
def test_one_step_matches_diffusers_sdxl_img2img(xl_folder, cfg, negative):
    """Same weights, same noise, same frame: our stream step against StableDiffusionXLImg2ImgPipeline.

    Two inference steps at strength 0.5 make the pipeline run exactly one step, the schedule's last (t=499,
    EulerAncestral's sigma_to = 0, so its output is the x0 prediction our TURBO slot computes); the engine
    runs that timestep as t_index [1] of 2. Pixels agree within 1 grey level."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLImg2ImgPipeline
    from transformers import CLIPTokenizer

    pipe_dir, taesd, _ = xl_folder
    g = 1.0 if cfg == "none" else 1.7
    engine = StreamEngine.from_pretrained(str(pipe_dir), vae_id=str(taesd), device="cpu", width=W, height=H,
                                          num_inference_steps=2, t_index_list=[1], cfg=cfg, guidance_scale=g,
                                          prompt="a red cat", negative_prompt=negative, seed=11)
    c = engine.components
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=c.vae, unet=c.unet, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(pipe_dir / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(pipe_dir / "tokenizer_2"),
        scheduler=EulerAncestralDiscreteScheduler.from_pretrained(pipe_dir, subfolder="scheduler"),
        requires_aesthetics_score=False, force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    f = frame(3)
    image = torch.from_numpy(f).permute(2, 0, 1)[None].float() / 255.0 * 2.0 - 1.0  # [1, 3, H, W]
    with torch.no_grad():
        ref = pipe(prompt="a red cat", negative_prompt=negative or None, image=image, strength=0.5,
                   num_inference_steps=2, guidance_scale=g, generator=torch.Generator().manual_seed(11),
                   output_type="pt").images  # [1, 3, H, W] in [0, 1]
    expect = (ref[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    out = engine(f)
    assert engine.status()["t_index_list"] == [1]
    diff = np.abs(out.astype(int) - expect.astype(int))
    assert diff.max() <= 1, f"max pixel difference {diff.max()}"
    assert expect.std() > 5  # a real picture, not a flat one that would match anything
