"""IP-Adapter on the CPU with tiny configs: our stream step against diffusers' own IP-Adapter forward.

The adapters are written to disk in the published layout (``.safetensors`` with ``image_proj.`` / ``ip_adapter.``
prefixes, and a ``.bin`` pickle as h94/IP-Adapter ships them) with a saved CLIP vision encoder folder, and the
engine loads them as a user would. The reference is diffusers' UNet with the same state dict loaded by
``unet._load_ip_adapter_weights`` and called with ``added_cond_kwargs={"image_embeds": [...]}`` as its pipelines
call it (uncond rows: zero image embeds for base, a zero image's hidden states for plus and full-face).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from rtdiffusion import ConfigError, StreamEngine
from rtdiffusion.control import ip_adapter as ipa
from rtdiffusion.control.ip_attention import IPAttnProcessor
from rtdiffusion.control.style import CLIP_MEAN, CLIP_STD, StyleEncoder
from rtdiffusion.models.loading import load_components, read_config

CPU = torch.device("cpu")
MODELS = {"sd15": "random:tiny-sd15", "sdxl": "random:tiny-sdxl"}


def image(seed: int, h: int = 48, w: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """{(family, kind): (file, image encoder folder, state dict)} for the tiny UNets, saved in the published layout."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("ip-adapters")
    vision_cfg = read_config("tiny_clip_vision_ipadapter.json")
    folder = root / "image_encoder"
    ipa.random_vision(vision_cfg, seed=5).save_pretrained(folder)
    out = {}
    for family, model in MODELS.items():
        unet = load_components(model, CPU, torch.float32).unet
        for kind in ("base", "plus", "full-face"):
            arch = ipa.RANDOM_IP_ADAPTERS["ip-adapter-tiny" if kind == "base" else f"ip-adapter-{kind}-tiny"]
            sd = ipa.random_state_dict(arch, unet, vision_cfg, seed=11)
            if kind == "plus" and family == "sd15":  # the .bin pickle layout
                path = root / f"ip-adapter-{kind}_{family}.bin"
                torch.save(sd, path)
            else:
                path = root / f"ip-adapter-{kind}_{family}.safetensors"
                save_file({f"{s}.{k}": v.contiguous() for s in sd for k, v in sd[s].items()}, str(path))
            out[family, kind] = (str(path), str(folder), sd)
    return out


def make(family, adapters=None, kind="base", scale=0.7, **kw):
    ip = None
    if adapters is not None:
        path, folder, _ = adapters[family, kind]
        ip = {"model": path, "image_encoder": folder, "scale": scale}
    return StreamEngine.from_pretrained(MODELS[family], device="cpu", ip_adapter=ip, prompt="a red cat", seed=3,
                                        **kw)


def reference_eps(engine, sd, kind, scale, style):
    """diffusers' UNet with the same IP-Adapter weights, on the engine's buffers after a frame."""
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
    from transformers import CLIPVisionModelWithProjection

    b, T = engine._state.buffers, engine._prompts.tokens
    unet = copy.deepcopy(engine.components.unet)
    unet.set_attn_processor(AttnProcessor2_0())
    unet._load_ip_adapter_weights([sd])
    for proc in unet.attn_processors.values():
        if isinstance(proc, IPAdapterAttnProcessor2_0):
            proc.scale = [scale]
    vision = CLIPVisionModelWithProjection.from_pretrained(engine._ip.spec.image_encoder).eval()
    pix = engine._ip.style.preprocess(torch.from_numpy(style))  # [1, 3, S, S]
    with torch.no_grad():
        if kind != "base":  # plus, full-face: hidden states
            cond = vision(pix, output_hidden_states=True).hidden_states[-2]
            uncond = vision(torch.zeros_like(pix), output_hidden_states=True).hidden_states[-2]
        else:
            cond = vision(pix).image_embeds
            uncond = torch.zeros_like(cond)
        U, B = b.layout.uncond_rows, b.layout.unet_rows
        embeds = torch.cat([uncond.expand(U, *cond.shape[1:]), cond.expand(B - U, *cond.shape[1:])])[:, None]
        added = dict(zip(("text_embeds", "time_ids"), b.added))
        return unet(b.unet_in, b.t_unet, encoder_hidden_states=b.embeds[:, :T],
                    added_cond_kwargs={**added, "image_embeds": [embeds]}, return_dict=False)[0]


@pytest.mark.parametrize("family,kind,cfg,frames", [("sd15", "base", "none", 1), ("sd15", "plus", "full", 1),
                                                    ("sdxl", "base", "full", 2), ("sdxl", "plus", "none", 1),
                                                    ("sd15", "full-face", "full", 1)])
def test_stream_step_matches_diffusers_ip_adapter(adapters, family, kind, cfg, frames):
    """One stream step (1 step; uncond rows with cfg full; 2 frames a call) against diffusers' IP-Adapter UNet."""
    g = 1.5 if cfg == "full" else 1.0
    engine = make(family, adapters, kind, scale=0.7, cfg=cfg, guidance_scale=g, frame_buffer_size=frames)
    style = image(1)
    engine.set_style_image(style)
    engine(np.stack([image(2 + i, 64, 64) for i in range(frames)]) if frames > 1 else image(2, 64, 64))
    b = engine._state.buffers
    assert b.embeds.shape[1] == engine._prompts.tokens + engine._ip.tokens
    tokens = {"base": 4, "plus": 4, "full-face": 1 + (32 // 8) ** 2}[kind]  # full-face: every patch + CLS
    assert engine._ip.tokens == tokens and engine.status()["ip_adapter"]["kind"] == kind
    eps_ref = reference_eps(engine, adapters[family, kind][2], kind, 0.7, style)
    with torch.no_grad():
        eps_ours = engine._base_nets.unet(b.unet_in, b.t_unet, b.embeds, *b.added)
        eps_plain = reference_eps(engine, adapters[family, kind][2], kind, 0.0, style)
    assert (eps_ref - eps_plain).abs().max() > 1e-3  # the image tokens matter
    assert torch.allclose(eps_ours, eps_ref, atol=1e-5, rtol=1e-4), (eps_ours - eps_ref).abs().max()
    # the step itself: denoised = A * x_t + B * (guided eps)
    SF = b.layout.stream_rows
    pred = eps_ref[-SF:] if cfg == "none" else g * eps_ref[SF:] + (1 - g) * eps_ref[:SF]
    expect = b.coef_A * b.x_t + b.coef_B * pred
    assert torch.allclose(b.denoised, expect, atol=1e-5, rtol=1e-4), (b.denoised - expect).abs().max()


def test_live_scale_applies_at_the_next_frame_boundary(adapters):
    engine = make("sd15", adapters, "base", scale=0.7)
    plain = make("sd15")
    engine.set_style_image(image(1))
    frame = image(2, 64, 64)
    engine(frame)
    state, embeds_ptr = engine._state, engine._state.buffers.embeds.data_ptr()
    engine.update(ip_adapter_scale=0.0)
    assert engine._ip.scale.tensor.item() == pytest.approx(0.7)  # not before the boundary
    out = engine(frame)
    assert engine._ip.scale.tensor.item() == 0.0 and engine.status()["ip_adapter"]["scale"] == 0.0
    assert engine._state is state and engine._state.buffers.embeds.data_ptr() == embeds_ptr  # buffer write only
    plain(frame)
    assert np.abs(out.astype(int) - plain(frame).astype(int)).max() <= 1  # scale 0: the plain model
    engine.update(ip_adapter_scale=1.3)
    engine(frame)
    assert engine._ip.scale.tensor.item() == pytest.approx(1.3)
    engine.update(ip_adapter_enabled=False)
    engine(frame)
    st = engine.status()["ip_adapter"]
    assert engine._ip.scale.tensor.item() == 0.0 and st["scale"] == pytest.approx(1.3) and st["enabled"] is False
    engine.update(ip_adapter_enabled=True)
    engine(frame)
    assert engine._ip.scale.tensor.item() == pytest.approx(1.3) and st["encodes"] == 1


def test_blend_of_two_images_is_the_weighted_average_of_their_embeddings(adapters):
    engine = make("sd15", adapters, "plus", cfg="initialize", guidance_scale=1.4)
    a, c = image(1), image(4, 30, 70)
    engine.set_style_image([(a, 1.0), (c, 3.0)])
    engine(image(2, 64, 64))
    style, b, T = engine._ip.style, engine._state.buffers, engine._prompts.tokens
    with torch.no_grad():
        fa, fc = (style.encode(style.preprocess(torch.from_numpy(x))) for x in (a, c))
        expect = style.projection(0.25 * fa + 0.75 * fc)  # [1, T_ip, D]
    assert torch.allclose(b.embeds[1:, T:], expect.expand(b.layout.stream_rows, -1, -1), atol=1e-6)
    assert torch.allclose(b.embeds[:1, T:], style.uncond_tokens, atol=1e-6)  # the uncond row: a zero image
    st = engine.status()["ip_adapter"]
    assert st["encodes"] == 2 and [w for _, w in st["images"]] == [1.0, 3.0] and st["tokens"] == 4
    engine.set_style_image([(torch.from_numpy(a), 2.0), (c, 6.0)])  # same blend, same images: nothing encoded
    engine(image(2, 64, 64))
    assert engine.status()["ip_adapter"]["encodes"] == 2
    assert torch.allclose(b.embeds[1:, T:], expect.expand(b.layout.stream_rows, -1, -1), atol=1e-6)


def test_style_image_is_encoded_once_per_distinct_image(adapters, tmp_path):
    from PIL import Image

    engine = make("sd15", adapters, "base")
    frame = image(2, 64, 64)
    assert engine.status()["ip_adapter"]["encodes"] == 0 and engine.status()["ip_adapter"]["images"] == []
    a, c = image(1), image(5)
    encodes = []
    for style in (a, a.copy(), None, c, a):
        if style is not None:
            engine.set_style_image(style)
        engine(frame)
        encodes.append(engine.status()["ip_adapter"]["encodes"])
    assert encodes == [1, 1, 1, 2, 2]  # unchanged: never again; back to an earlier one: cached
    Image.fromarray(c).save(tmp_path / "style.png")
    engine.set_style_image(str(tmp_path / "style.png"))  # the same pixels from a file
    engine(frame)
    st = engine.status()["ip_adapter"]
    assert st["encodes"] == 2 and st["images"] == [[str(tmp_path / "style.png"), 1.0]]


def test_sd_turbo_and_other_families_are_refused():
    with pytest.raises(ConfigError, match="SD 2.x"):
        StreamEngine.from_pretrained("random:sd-turbo", device="cpu", ip_adapter="random:ip-adapter-sd15")
    with pytest.raises(ConfigError, match="SD 2.x"):
        StreamEngine.from_pretrained("random:tiny", device="cpu", ip_adapter="random:ip-adapter-tiny")
    with pytest.raises(ConfigError, match="sd15.*sdxl"):
        StreamEngine.from_pretrained("random:sdxl-turbo", device="cpu", ip_adapter="random:ip-adapter-sd15")
    with pytest.raises(ConfigError, match="ip-adapter-plus-sdxl"):  # the message lists the known names
        StreamEngine.from_pretrained("random:tiny-sd15", device="cpu", ip_adapter="random:ip-adapter-vit-g")


def test_faceid_files_are_refused_with_the_reason(tmp_path):
    """FaceID adapters read InsightFace face embeddings, not CLIP image features (MLPProjModel: proj.0, proj.2, norm;
    FaceID Plus: perceiver_resampler.*)."""
    from safetensors.torch import save_file

    faceid = {"image_proj.proj.0.weight": torch.zeros(64, 512), "image_proj.proj.2.weight": torch.zeros(128, 64),
              "image_proj.norm.weight": torch.ones(32), "ip_adapter.1.to_k_ip.weight": torch.zeros(32, 32)}
    save_file(faceid, str(tmp_path / "ip-adapter-faceid_sd15.safetensors"))
    with pytest.raises(ConfigError, match="FaceID adapter: it reads InsightFace face embeddings"):
        StreamEngine.from_pretrained("random:tiny-sd15", device="cpu",
                                     ip_adapter=str(tmp_path / "ip-adapter-faceid_sd15.safetensors"))
    with pytest.raises(ConfigError, match="FaceID"):
        ipa.projection_kind({"perceiver_resampler.proj_in.weight": torch.zeros(1), "proj.0.weight": torch.zeros(1)},
                            "ip-adapter-faceid-plusv2_sd15.bin")


def test_a_file_of_another_family_is_refused_naming_both(adapters):
    path, folder, sd = adapters["sd15", "base"]
    with pytest.raises(ConfigError, match=r"width 32\) but the model is sdxl \(width 64\)"):
        StreamEngine.from_pretrained("random:tiny-sdxl", device="cpu", ip_adapter={"model": path,
                                                                                  "image_encoder": folder})
    from rtdiffusion.models.families import SDXL

    published_sd15 = {"image_proj": sd["image_proj"], "ip_adapter": {"1.to_k_ip.weight": torch.zeros(320, 768)}}
    with pytest.raises(ConfigError, match=r"for sd15 models .* the model is sdxl"):
        ipa.check_fits(published_sd15, load_components("random:tiny-sdxl", CPU, torch.float32).unet, SDXL, "x.bin")


def test_bad_input_is_refused_and_the_stream_keeps_its_style(adapters, tmp_path):
    engine = make("sd15", adapters, "base")
    frame = image(2, 64, 64)
    engine.set_style_image(image(1))
    engine(frame)
    before = engine.status()["ip_adapter"]
    (tmp_path / "notes.png").write_text("not an image")
    bad = [(str(tmp_path / "missing.png"), "could not be read"), (str(tmp_path / "notes.png"), "could not be read"),
           (image(1).astype(np.float32), "uint8"), (np.zeros((8, 8, 4), np.uint8), r"\[H, W, 3\]"),
           ([(image(1), -1.0)], ">= 0"), ([(image(1), 0.0)], "weight > 0"), ([image(1)], "pairs"),
           ([], "empty"), (12, "PIL image")]
    for value, message in bad:
        with pytest.raises(ConfigError, match=message):
            engine.set_style_image(value)
    for kw, message in (({"ip_adapter_scale": float("nan")}, "0 to 5"), ({"ip_adapter_scale": -1}, "0 to 5"),
                        ({"ip_adapter_enabled": "yes"}, "true or false")):
        with pytest.raises(ConfigError, match=message):
            engine.update(**kw)
    engine(frame)
    assert engine.status()["ip_adapter"] == before  # same images, scale, encodes
    plain = make("sd15")
    with pytest.raises(ConfigError, match="needs an IP-Adapter"):
        plain.set_style_image(image(1))
    with pytest.raises(ConfigError, match="need an IP-Adapter"):
        plain.update(ip_adapter_scale=0.5)
    assert plain.status()["ip_adapter"] is None
    for spec, message in (({"model": "random:ip-adapter-tiny", "scale": float("nan")}, "0 to 5"),
                          ({"model": "random:ip-adapter-tiny", "weight": 1}, "unknown ip_adapter key"),
                          ({"scale": 1.0}, "model string or a dict"),
                          (["random:ip-adapter-tiny", "random:ip-adapter-plus-tiny"], "one IP-Adapter .* not a list"),
                          (str(tmp_path / "missing.bin"), "does not exist")):
        with pytest.raises((ConfigError, FileNotFoundError), match=message):
            StreamEngine.from_pretrained("random:tiny-sd15", device="cpu", ip_adapter=spec)


def test_ip_adapter_and_temporal_kv_cache_coexist(adapters):
    """The KV cache replaces self-attention processors only; the IP ones on cross-attention stay."""
    engine = make("sd15", adapters, "base")
    engine.set_style_image(image(1))
    frame = image(2, 64, 64)

    def ip_layers():
        return sum(isinstance(p, IPAttnProcessor) for p in engine.components.unet.attn_processors.values())

    n = ip_layers()
    assert n == len([k for k in engine.components.unet.attn_processors if "attn2" in k]) > 0
    engine.update(cache_enabled=True)
    engine(frame)
    assert engine.status()["temporal_cache"]["active"] and ip_layers() == n
    engine.update(cache_enabled=False)
    out = engine(frame)
    assert ip_layers() == n and out.shape == (64, 64, 3)


def test_image_encoder_is_found_beside_the_file_by_its_width(adapters, tmp_path):
    """h94's layout: sdxl_models/ holds a ViT-bigG encoder that the *_vit-h files there do not read; the ViT-H one
    is models/image_encoder, which models/ip-adapter_sd15_vit-G does not read. The encoder whose width fits is
    taken; a wrong one given explicitly is refused."""
    import shutil

    path, folder, sd = adapters["sd15", "base"]
    (tmp_path / "sdxl_models").mkdir()
    model = str(tmp_path / "sdxl_models" / "ip-adapter_vit-h.safetensors")
    shutil.copy(path, model)
    wrong = tmp_path / "sdxl_models" / "image_encoder"
    ipa.random_vision(dict(read_config("tiny_clip_vision_ipadapter.json"), projection_dim=24), seed=1).save_pretrained(wrong)
    shutil.copytree(folder, tmp_path / "models" / "image_encoder")
    engine = StreamEngine.from_pretrained("random:tiny-sd15", device="cpu", ip_adapter=model)
    assert engine._ip.style.vision.config.projection_dim == 16
    with pytest.raises(ConfigError, match="width 16, but its image encoder's projection_dim is 24"):
        StreamEngine.from_pretrained("random:tiny-sd15", device="cpu", ip_adapter={"model": model,
                                                                                  "image_encoder": str(wrong)})
    # an SD 1.5 file reading the wider (bigG-like) encoder, as models/ip-adapter_sd15_vit-G: ../sdxl_models/
    from safetensors.torch import save_file

    vit_g = tmp_path / "models" / "ip-adapter_sd15_vit-G.safetensors"
    proj = dict(sd["image_proj"], **{"proj.weight": torch.randn(sd["image_proj"]["proj.weight"].shape[0], 24) / 5})
    save_file({f"{s}.{k}": v.contiguous() for s, part in (("image_proj", proj), ("ip_adapter", sd["ip_adapter"]))
               for k, v in part.items()}, str(vit_g))
    engine = StreamEngine.from_pretrained("random:tiny-sd15", device="cpu", ip_adapter=str(vit_g))
    assert engine._ip.style.vision.config.projection_dim == 24 and engine._ip.tokens == 4
    shutil.rmtree(tmp_path / "models")
    with pytest.raises(ConfigError, match="no image encoder given and none of projection_dim 16"):
        StreamEngine.from_pretrained("random:tiny-sd15", device="cpu", ip_adapter=model)
    # a hub file: the repo's encoder of the width it reads (ip-adapter_sdxl and _sd15_vit-G read ViT-bigG/14)
    from rtdiffusion.control.ip_weights import _default_encoder

    nowhere = str(tmp_path / "cache" / "x.safetensors")
    for file, plus, width, folder in (("sdxl_models/ip-adapter_sdxl.safetensors", False, 1280, "sdxl_models"),
                                      ("sdxl_models/ip-adapter_sdxl_vit-h.safetensors", False, 1024, "models"),
                                      ("sdxl_models/ip-adapter-plus_sdxl_vit-h.bin", True, 1280, "models"),
                                      ("models/ip-adapter_sd15_vit-G.bin", False, 1280, "sdxl_models")):
        assert _default_encoder(f"h94/IP-Adapter/{file}", nowhere, width, plus) == f"h94/IP-Adapter/{folder}/image_encoder"


@pytest.mark.parametrize("name,unet,params", [("ip-adapter-sd15", "sd15_unet.json", 22_319_616),
                                              ("ip-adapter-plus-sd15", "sd15_unet.json", 49_087_488),
                                              ("ip-adapter-full-face-sd15", "sd15_unet.json", 21_794_304),
                                              ("ip-adapter-sd15-vit-g", "sd15_unet.json", 23_106_048),
                                              ("ip-adapter-sdxl", "sdxl_unet.json", 351_285_248),
                                              ("ip-adapter-sdxl-vit-h", "sdxl_unet.json", 349_188_096),
                                              ("ip-adapter-plus-sdxl", "sdxl_unet.json", 423_748_864)])
def test_random_ip_adapters_have_the_published_layout(name, unet, params):
    """random:<name> is the h94/IP-Adapter file's layout: the parameter counts are those of the published fp16
    files (ip-adapter_sd15 44.6 MB, ip-adapter-plus_sd15 98.2 MB, ip-adapter-full-face_sd15 43.6 MB,
    ip-adapter_sd15_vit-G 46.2 MB, ip-adapter_sdxl
    703 MB, ip-adapter_sdxl_vit-h 698 MB, ip-adapter-plus_sdxl_vit-h 848 MB at 2 bytes a parameter); counted on a
    meta-device UNet, no weights made."""
    from diffusers import UNet2DConditionModel

    from rtdiffusion.control.ip_weights import published_layout

    with torch.device("meta"):
        module = UNet2DConditionModel.from_config(read_config(unet))
    arch = ipa.RANDOM_IP_ADAPTERS[name]
    layout = published_layout(arch, module, read_config(arch.vision_config))
    assert sum(math.prod(shape) for keys in layout.values() for shape, _ in keys.values()) == params
    assert len(layout["ip_adapter"]) == 2 * (16 if "sd15" in name else 70)
    assert layout["ip_adapter"]["1.to_k_ip.weight"][0] == (320 if "sd15" in name else 640, 768 if "sd15" in name else 2048)
    first = {"base": "proj.weight", "plus": "proj_in.weight", "full-face": "proj.0.weight"}[arch.kind.value]
    reads = layout["image_proj"][first][0][1]  # the width it reads
    bigg = arch.published in ("sdxl_models/ip-adapter_sdxl", "models/ip-adapter_sd15_vit-G")
    assert ipa.H94_ENCODERS[arch.kind.hidden_states, reads] == ("sdxl_models" if bigg else "models") + "/image_encoder"


def test_the_image_encoder_configs_have_the_published_sizes():
    """ViT-bigG/14 (h94's sdxl_models/image_encoder) and ViT-H/14 (models/image_encoder) on the meta device: open_clip's
    image-tower parameter counts (model_profile.csv: 1844.91 M and 632.08 M); the one each random: adapter reads."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    for config, params, width in (("clip_vit_bigg14_vision_ipadapter.json", 1_844_907_264, 1280),
                                  ("clip_vit_h14_vision_ipadapter.json", 632_076_800, 1024)):
        cfg = {k: v for k, v in read_config(config).items() if not k.startswith("_") and k not in
               ("architectures", "torch_dtype", "transformers_version", "model_type")}
        with torch.device("meta"):
            model = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg))
        assert sum(p.numel() for p in model.parameters()) == params and cfg["projection_dim"] == width
    bigg = {n for n, a in ipa.RANDOM_IP_ADAPTERS.items() if a.vision_config == "clip_vit_bigg14_vision_ipadapter.json"}
    assert bigg == {"ip-adapter-sdxl", "ip-adapter-sd15-vit-g"}


def test_processor_traces_in_one_graph_and_reads_the_live_scale():
    """torch.compile (the compiled backend) traces the processor without a graph break, and a scale written in
    place is read by the compiled code: no recompile (Dynamo backend 'eager': tracing only, no code generation)."""
    import torch._dynamo
    from diffusers.models.attention_processor import Attention

    from rtdiffusion.control.ip_attention import IPScale

    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8).eval()
    text_only = copy.deepcopy(attn)  # diffusers' own processor
    scale = IPScale(CPU)
    proc = IPAttnProcessor(text_tokens=5, hidden_size=16, cross_attention_dim=8, scale=scale).eval()
    attn.set_processor(proc)
    x, embeds = torch.randn(2, 12, 16), torch.randn(2, 5 + 4, 8)  # [B, L, C], [B, T_text + T_ip, D]
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(attn, backend="eager", fullgraph=True)
    with torch.no_grad():
        scale.write(0.0)
        plain = text_only(x, embeds[:, :5])  # scale 0: cross-attention to the text alone
        assert torch.allclose(compiled(x, embeds), plain, atol=1e-6)
        scale.write(0.9)
        got, want = compiled(x, embeds), attn(x, embeds)
    assert torch.allclose(got, want, atol=1e-6) and (got - plain).abs().max() > 1e-3
    assert counters["stats"]["unique_graphs"] == 1


def test_only_the_newest_style_is_encoded_and_old_images_are_dropped(adapters):
    """Styles set faster than frames run: only the one in force at the boundary is encoded; the kept images
    (and their features) are bounded, the style in use never dropped."""
    engine = make("sd15", adapters, "base")
    frame = image(2, 64, 64)
    styles = [image(100 + i, 8, 8) for i in range(20)]
    for s in styles:
        engine.set_style_image(s)
    engine(frame)
    style = engine._ip.style
    assert style.encodes == 1 and len(style.images.keys()) == style.images.capacity
    engine.set_style_image(styles[0])  # dropped earlier: read again, encoded again
    engine(frame)
    assert style.encodes == 2 and len(style._features) <= style.images.capacity
    assert engine.status()["ip_adapter"]["images"] == [["array 8x8", 1.0]]


def test_style_and_scale_from_another_thread_while_frames_run(adapters):
    """Control from another thread lands between frames; after both threads finish, the next frame runs on the
    last style and scale set (no frame fails, nothing is torn)."""
    import threading

    engine = make("sd15", adapters, "plus", cfg="initialize", guidance_scale=1.3)
    frame = image(2, 64, 64)
    styles = [image(200 + i, 24, 24) for i in range(6)]
    errors = []

    def control():
        try:
            for i, s in enumerate(styles):
                engine.set_style_image([(s, 1.0), (styles[0], 0.5)])
                engine.update(ip_adapter_scale=0.1 * (i + 1))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    worker = threading.Thread(target=control)
    worker.start()
    for _ in range(6):
        engine(frame)
    worker.join(timeout=120)
    assert not worker.is_alive() and not errors
    engine(frame)
    st, style, b = engine.status()["ip_adapter"], engine._ip.style, engine._state.buffers
    assert st["scale"] == pytest.approx(0.6) and engine._ip.scale.tensor.item() == pytest.approx(0.6)
    assert [w for _, w in st["images"]] == [1.0, 0.5] and 2 <= st["encodes"] <= len(styles)
    with torch.no_grad():
        f = [style.encode(style.preprocess(torch.from_numpy(x))) for x in (styles[-1], styles[0])]
        expect = style.projection((f[0] * 1.0 + f[1] * 0.5) / 1.5)
    assert torch.allclose(b.embeds[1:, engine._prompts.tokens:], expect.expand(b.layout.stream_rows, -1, -1),
                          atol=1e-5)


@pytest.mark.parametrize("h,w", [(300, 400), (400, 300), (224, 224), (90, 150)])
def test_device_preprocessing_matches_clip_image_processor(adapters, h, w):
    """Shortest side to 224 (bicubic, antialiased), centre crop, CLIP mean/std on the device: what diffusers'
    pipelines get from transformers' CLIPImageProcessor, within PIL's uint8 rounding (normalised units; 0.016 is
    about one grey level)."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    style = StyleEncoder.__new__(StyleEncoder)  # only the preprocessing: no encoder needed
    style.size, style.device, style.dtype = 224, CPU, torch.float32
    style.mean, style.std = (torch.tensor(v).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    smooth = np.array(Image.fromarray(image(3, 30, 40)).resize((w, h), Image.BILINEAR))  # [h, w, 3] uint8
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    want = processor(images=smooth, return_tensors="pt").pixel_values  # [1, 3, 224, 224]
    got = style.preprocess(torch.from_numpy(smooth))
    assert got.shape == want.shape == (1, 3, 224, 224)
    assert (got - want).abs().mean() < 0.01 and (got - want).abs().max() < 0.05
