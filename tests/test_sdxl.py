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
from rtdiffusion.config import PromptSpec
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
    runs that timestep as t_index [1] of 2. The step's latent agrees to 1e-5 (relative), pixels within 1 grey
    level."""
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
    image = torch.from_numpy(f).permute(2, 0, 1)[None].float() / 255.0  # [1, 3, H, W] in [0, 1]
    with torch.no_grad():
        ref = pipe(prompt="a red cat", negative_prompt=negative or None, image=image, strength=0.5,
                   num_inference_steps=2, guidance_scale=g, generator=torch.Generator().manual_seed(11),
                   output_type="pt").images  # [1, 3, H, W] in [0, 1]
        ref_latent = pipe(prompt="a red cat", negative_prompt=negative or None, image=image, strength=0.5,
                          num_inference_steps=2, guidance_scale=g, generator=torch.Generator().manual_seed(11),
                          output_type="latent").images  # [1, 4, h, w]: the step's x0, scaled latent space
    expect = (ref[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    out = engine(f)
    assert engine.status()["t_index_list"] == [1]
    latent = engine._state.buffers.denoised  # [1, 4, h, w]
    rel = float((latent - ref_latent).norm() / ref_latent.norm())
    assert rel < 1e-5, f"latent relative difference {rel:.2e}"
    diff = np.abs(out.astype(int) - expect.astype(int))
    assert diff.max() <= 1, f"max pixel difference {diff.max()}"
    assert expect.std() > 5  # a real picture, not a flat one that would match anything


# ------------------------------------------------------------------------ conditioning, prompts, modes
@pytest.fixture(scope="module")
def xl_components():
    return load_components("random:tiny-sdxl", CPU, torch.float32, VaeKind.TINY)


def test_conditioning_is_written_once_per_prompt_or_size_change(xl_components):
    """The pooled embedding is written when the prompt changes, the size ids when a layout's buffers are
    made; an unchanged prompt is never re-encoded and nothing is rewritten between frames."""
    engine = StreamEngine(_config("random:tiny-sdxl"), xl_components)
    engine.update_prompt("a red cat")
    engine(frame())
    cond = engine._conditioning
    writes, encodes = dict(cond.writes), engine.status()["prompt_encodes"]
    b = engine._state.buffers
    addresses = [t.data_ptr() for t in b.added]
    for i in range(4):
        engine(frame(i))
    assert cond.writes == writes and engine.status()["prompt_encodes"] == encodes
    engine.update_prompt("a red cat")  # the same text again: nothing to do
    engine(frame())
    assert cond.writes == writes and engine.status()["prompt_encodes"] == encodes
    pooled_before = b.added[0].clone()
    engine.update_prompt("a blue dog")
    engine(frame())
    assert cond.writes == {"prompt": writes["prompt"] + 1, "size": writes["size"]}
    assert engine.status()["prompt_encodes"] == encodes + 1
    assert not torch.equal(b.added[0], pooled_before)
    assert [t.data_ptr() for t in b.added] == addresses  # written in place
    engine.update(t_index_list=[20, 40])  # a new layout: new buffers, size ids written once for them
    engine(frame())
    assert cond.writes["size"] == writes["size"] + 1
    b2 = engine._state.buffers
    assert b2.added[1].tolist() == [[H, W, 0, 0, H, W]] * 2
    assert torch.equal(b2.added[0][0], b.added[0][0])  # the same prompt's pooled embedding in every row


def test_blends_negative_prompts_and_every_cfg_mode(xl_components):
    """Blends mix the pooled embedding too; a negative prompt fills the uncond rows (zeros when empty, as
    diffusers' SDXL pipelines do); every residual-CFG mode runs and gives finite frames."""
    engine = StreamEngine(_config("random:tiny-sdxl"), xl_components)
    p = engine._prompts
    red, blue = p.encode_texts(["a red cat", "a blue dog"])
    mix = p.embed(PromptSpec.parse([("a red cat", 0.25), ("a blue dog", 0.75)], "linear", ""))
    torch.testing.assert_close(mix.pooled, 0.25 * red.pooled + 0.75 * blue.pooled)
    torch.testing.assert_close(mix.embeds, 0.25 * red.embeds + 0.75 * blue.embeds)
    sl = p.embed(PromptSpec.parse([("a red cat", 0.5), ("a blue dog", 0.5)], "slerp", ""))
    assert sl.pooled.shape == (1, 32) and not torch.allclose(sl.pooled, mix.pooled)
    zero = p.negative(PromptSpec.parse("x", "linear", ""))
    assert not zero.embeds.any() and not zero.pooled.any()
    neg = p.negative(PromptSpec.parse("x", "linear", "blurry"))
    assert neg.pooled.abs().sum() > 0
    outs = {}
    for cfg, steps in (("none", [32]), ("self", [20, 40]), ("initialize", [20, 40]), ("full", [20, 40])):
        engine.update(cfg=cfg, guidance_scale=1.5, t_index_list=steps, negative_prompt="blurry",
                      prompt=[["a red cat", 0.5], ["a blue dog", 0.5]], prompt_method="slerp")
        for i in range(3):
            out = engine(frame(i))
        b = engine._state.buffers
        U = b.layout.uncond_rows
        if U:  # uncond rows carry the negative prompt's pooled embedding
            torch.testing.assert_close(b.added[0][:U], neg.pooled.expand(U, -1))
        assert torch.isfinite(b.denoised).all()
        outs[cfg] = out
    assert len({o.tobytes() for o in outs.values()}) == 4


# ------------------------------------------------------------------------------------------- bad input
def test_wrong_size_for_sdxl_is_a_clear_error():
    """SDXL needs multiples of 32 pixels (8x VAE, three UNet levels); random: models say so before building."""
    with pytest.raises(ConfigError, match="width must be a multiple of 32 pixels for random:sdxl-turbo; got 520"):
        StreamEngine.from_pretrained("random:sdxl-turbo", device="cpu", width=520, height=512)
    with pytest.raises(ConfigError, match="height must be a multiple of 32 pixels for random:sdxl; got 1000"):
        StreamEngine.from_pretrained("random:sdxl", device="cpu", height=1000)


def test_an_sd15_lora_on_an_sdxl_model_is_a_clear_error(xl_folder, tmp_path):
    pytest.importorskip("peft", reason="LoRA fusing needs peft: pip install rtdiffusion[lora]")
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe, taesd, saved = xl_folder
    sd_unet = UNet2DConditionModel.from_config(read_config("tiny_unet_sd2style.json"))  # 32-wide text
    sd_unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(sd_unet))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "sd_lora", unet_lora_layers=lora)
    with pytest.raises(ConfigError, match=r"does not fit this sdxl UNet.*attn2.to_k.*takes 64 inputs but the "
                                          r"LoRA's takes 32.*SD 1.5 LoRA on an SDXL model"):
        load_components(str(pipe), CPU, torch.float32, VaeKind.TINY, vae_id=str(taesd),
                        lora=((str(tmp_path / "sd_lora"), 1.0),))


def test_single_safetensors_file_in_the_original_layout(xl_folder, tmp_path):
    """One .safetensors file as users download SDXL fine-tunes (UNet + both text encoders, no configs):
    the architecture is mapped from the packaged configs, every tensor comes back unchanged, and the
    tokenizers are taken from the folders next to the file."""
    import shutil

    from safetensors.torch import save_file

    from sdxl_single_file import clip_to_original, open_clip_to_original, unet_to_original

    pipe, taesd, saved = xl_folder
    sd = {**unet_to_original(saved["unet"].state_dict(), read_config("tiny_unet_sdxl_style.json")),
          **clip_to_original(saved["text_encoder"].state_dict()),
          **open_clip_to_original(saved["text_encoder_2"].state_dict())}
    path = tmp_path / "my-tiny-sdxl-turbo-finetune.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    for sub in ("tokenizer", "tokenizer_2"):
        shutil.copytree(pipe / sub, tmp_path / sub)
    comps = load_components(str(path), CPU, torch.float32, VaeKind.TINY, vae_id=str(taesd))
    assert comps.family is SDXL and comps.identity["file"] == str(path)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        assert same_weights(getattr(comps, name), saved[name]), name
    assert isinstance(comps.tokenizer_2, ClipTokenizer)
    engine = StreamEngine(_config(str(path)), comps)
    engine.update_prompt("a red cat")
    assert engine(frame()).shape == (H, W, 3)
    with pytest.raises(ConfigError, match="holds no VAE weights"):
        load_components(str(path), CPU, torch.float32, VaeKind.KL)


def test_temporal_kv_cache_runs_with_sdxl(xl_components):
    """The cache's processors sit on SDXL's self-attention layers like on SD's; the added conditioning
    passes through its networks wrapper. Enabled, frames differ from the plain stream; disabled again,
    the plain stream comes back exactly."""
    plain = StreamEngine(_config("random:tiny-sdxl"), xl_components)
    plain.update_prompt("a red cat")
    want = [plain(frame(i)) for i in range(3)]
    engine = StreamEngine(_config("random:tiny-sdxl"), xl_components)
    engine.update_prompt("a red cat")
    engine.update(cache_enabled=True, cache_maxframes=2)
    got = [engine(frame(i)) for i in range(3)]
    assert engine.status()["temporal_cache"]["active"]
    np.testing.assert_array_equal(got[0], want[0])  # empty bank on the first frame: plain attention
    assert any(not np.array_equal(g, w) for g, w in zip(got[1:], want[1:]))
    engine.update(cache_enabled=False)
    np.testing.assert_array_equal(engine(frame(5)), plain(frame(5)))


# -------------------------------------------------------------------------------- VAE dtype, exporters
def test_sdxl_kl_vae_runs_in_fp32_under_fp16_and_the_networks_cast_around_it(xl_components):
    """SDXL's stock KL VAE overflows in fp16: the loader keeps it in fp32 (not the fp16-fix VAE, not TAESD,
    not other families), and the networks cast the frame in and the result out."""
    from engines.base import TorchNetworks
    from rtdiffusion.models.families import SD21
    from rtdiffusion.models.loading import _vae_dtype

    f16, f32 = torch.float16, torch.float32
    assert _vae_dtype(SDXL, VaeKind.KL, f16, None) == f32
    assert _vae_dtype(SDXL, VaeKind.KL, f16, "madebyollin/sdxl-vae-fp16-fix") == f16
    assert _vae_dtype(SDXL, VaeKind.TINY, f16, None) == f16 and _vae_dtype(SD21, VaeKind.KL, f16, None) == f16
    import copy

    unet = copy.deepcopy(xl_components.unet).to(torch.bfloat16)  # a low-precision UNet beside an fp32 VAE
    nets = TorchNetworks(unet, xl_components.vae)
    image = torch.rand(1, 3, H, W, dtype=torch.bfloat16) * 2 - 1
    latent = nets.encode(image)
    assert latent.dtype == torch.bfloat16
    torch.testing.assert_close(latent, xl_components.vae.encode(image.float()).latents.to(torch.bfloat16))
    assert nets.decode(latent).dtype == torch.bfloat16


def test_aoti_unet_call_exports_the_added_conditioning(xl_components):
    """The compiled backend's AOTInductor packages export UNetCall: it takes SDXL's added inputs in spec
    order, and torch.export's program computes what the module does."""
    from engines.aoti import UNetCall

    call = UNetCall(xl_components.unet).eval()
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 4, 32, 32, generator=g), torch.tensor([999.0, 499.0]), torch.randn(2, 77, 64, generator=g),
            torch.randn(2, 32, generator=g), torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2))
    with torch.no_grad():
        program = torch.export.export(call, args, strict=False)
        torch.testing.assert_close(program.module()(*args), call(*args))


def test_an_sdxl_lora_is_fused(xl_folder, tmp_path):
    """An SDXL LoRA (diffusers format, as latent-consistency/lcm-lora-sdxl ships) fits and is fused:
    W' = W + scale * up @ down on the cross-attention that reads the 64-wide SDXL text embedding."""
    pytest.importorskip("peft", reason="LoRA fusing needs peft: pip install rtdiffusion[lora]")
    import copy

    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe, taesd, saved = xl_folder
    donor = copy.deepcopy(saved["unet"])
    donor.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(5)
    for name, p in donor.named_parameters():
        if "lora" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.2
    lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(donor))
    StableDiffusionXLPipeline.save_lora_weights(tmp_path / "xl_lora", unet_lora_layers=lora)
    comps = load_components(str(pipe), CPU, torch.float32, VaeKind.TINY, vae_id=str(taesd),
                            lora=((str(tmp_path / "xl_lora"), 0.5),))
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    base = saved["unet"].state_dict()[key + ".weight"]
    expect = base + 0.5 * lora[key + ".lora.up.weight"] @ lora[key + ".lora.down.weight"]
    fused = comps.unet.state_dict()[key + ".weight"]
    assert fused.shape == (64, 64) and torch.allclose(fused, expect, atol=1e-5) and not torch.allclose(fused, base)


def test_a_pickled_checkpoint_is_refused_clearly():
    with pytest.raises(ConfigError, match=r"from \.safetensors only"):
        load_components("model.ckpt", CPU, torch.float32)
