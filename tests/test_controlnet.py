"""ControlNets in the engine (issue 14), on the CPU with the tiny configs.

Our stream step with ControlNets is held against diffusers' own computation on the same weights: for the SD
2-style tiny model, StreamDiffusion's recurrence written plainly (test_stream_parity.ReferenceStream) whose
UNet call goes through diffusers' ControlNetModel / MultiControlNetModel and UNet2DConditionModel with
down/mid residuals; for the tiny SDXL model, diffusers' StableDiffusionXLControlNetImg2ImgPipeline. The
random ControlNets have their zero convolutions re-randomised, so the residuals are not zero (checked).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engines.base import unet_control_inputs
from rtdiffusion import ConfigError, FrameError, ModelNotFoundError, StreamEngine
from rtdiffusion.config import EngineConfig, StreamSettings, apply_updates
from rtdiffusion.control import RANDOM_CONTROLNETS, ControlNetSpec, build_random_controlnet
from rtdiffusion.models.loading import read_config
from test_sdxl import xl_folder  # noqa: F401 - the tiny SDXL diffusers folder fixture
from test_stream_parity import ReferenceStream, moving_frames

H = W = 64
CPU = torch.device("cpu")


class Tile:
    """A trivial preprocessor (the contract's protocol): the frame itself, [-1, 1] -> [0, 1]."""

    kind = "tile"

    def __call__(self, image: torch.Tensor, out: torch.Tensor) -> None:
        torch.add(image, 1.0, out=out)
        out.mul_(0.5)


class Negative(Tile):
    """Another one: the inverted frame, (1 - image) / 2."""

    kind = "negative"

    def __call__(self, image: torch.Tensor, out: torch.Tensor) -> None:
        torch.mul(image, -0.5, out=out)
        out.add_(0.5)


def control_of(frame: np.ndarray, negative: bool = False) -> torch.Tensor:
    """What the preprocessors above make of a uint8 frame, computed as ReferenceStream reads it: [1, 3, H, W]."""
    x = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255.0 * 2.0 - 1.0
    return (1.0 - x) / 2 if negative else (x + 1.0) / 2


def engine_with(comps, controlnets, frames=1, **updates) -> StreamEngine:
    config = EngineConfig("random:tiny", W, H, CPU, torch.float32, frame_buffer_size=frames)
    settings = apply_updates(StreamSettings(), 50, **updates)
    return StreamEngine(config, comps, settings, controlnets=controlnets)


class ControlledUNet:
    """diffusers' ControlNet (or MultiControlNetModel) then the UNet with down/mid residuals, as
    StableDiffusionControlNetPipeline calls them; stands in for ``comps.unet`` inside ReferenceStream."""

    def __init__(self, unet, controlnet, scale):
        self.unet, self.controlnet, self.scale, self.cond = unet, controlnet, scale, None

    def __call__(self, x, t, encoder_hidden_states):
        rows = lambda c: c.repeat(x.shape[0] // c.shape[0], 1, 1, 1)  # noqa: E731 - every row, every slot
        cond = [rows(c) for c in self.cond] if isinstance(self.cond, list) else rows(self.cond)
        down, mid = self.controlnet(x, t, encoder_hidden_states=encoder_hidden_states, controlnet_cond=cond,
                                    conditioning_scale=self.scale, return_dict=False)
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid)


class WithUNet:
    def __init__(self, comps, unet):
        self._comps, self.unet = comps, unet

    def __getattr__(self, name):
        return getattr(self._comps, name)


def run_against(engine, ref, frames, tol=1e-4):
    worst = 0.0
    for f in frames:
        out, expect = engine(f), ref(f)
        scale = max(1.0, ref.denoised.abs().max().item())
        worst = max(worst, (engine._state.buffers.denoised - ref.denoised).abs().max().item() / scale)
        assert np.abs(out.astype(int) - expect.astype(int)).max() <= 1
    assert worst < tol, f"latent difference {worst:.2e}"


# ------------------------------------------------------------------------------ parity with diffusers
@pytest.mark.parametrize("cfg,frames", [("full", 1), ("initialize", 2)])
def test_one_controlnet_matches_diffusers_sd2style(tiny_components, cfg, frames):
    """Two slots with CFG (uncond rows too), F = 1 or 2 frames per call, three calls: every row gets the
    residuals of the newest frames' control images (row r: frame r mod F)."""
    case = dict(t_index_list=[20, 40], cfg=cfg, guidance_scale=1.5)
    engine = engine_with(tiny_components, [{"model": "random:controlnet-tiny", "preprocessor": Tile(),
                                            "scale": 0.7}], frames=frames, **case)
    engine.update_prompt("a glass jellyfish")
    engine.update_seed(7)
    net = engine._control.units[0].module
    unet = ControlledUNet(tiny_components.unet, net, 0.7)
    ref = ReferenceStream(WithUNet(tiny_components, unet), case["t_index_list"], cfg, 1.5, 1.0, seed=7,
                          prompt="a glass jellyfish", frames=frames)
    calls = moving_frames(3, frames)
    for f in calls:
        unet.cond = torch.cat([control_of(x) for x in (f if frames > 1 else [f])])  # [F, 3, H, W]
        run_against(engine, ref, [f])
    # the residuals matter (random zero convs) and have the shapes unet_control_inputs names
    sums = engine._state.buffers.control.sums
    assert [tuple(s.shape[1:]) for s in sums] == [d for _, d in unet_control_inputs(tiny_components.unet.config,
                                                                                       32, 32)]
    assert len(sums) == 7 and all(s.abs().mean() > 1e-3 for s in sums)
    plain = ReferenceStream(tiny_components, case["t_index_list"], cfg, 1.5, 1.0, seed=7, prompt="a glass jellyfish",
                            frames=frames)
    for f in calls:
        plain(f)
    assert (plain.denoised - ref.denoised).abs().max() > 1e-2


def test_two_controlnets_summed_match_diffusers_multicontrolnet(tiny_components):
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    engine = engine_with(tiny_components, [
        {"model": "random:controlnet-tiny", "preprocessor": Tile(), "scale": 0.6},
        {"model": "random:controlnet-tiny", "preprocessor": Negative(), "scale": 1.3}])
    nets = [u.module for u in engine._control.units]
    assert not torch.equal(nets[0].controlnet_mid_block.weight, nets[1].controlnet_mid_block.weight)
    unet = ControlledUNet(tiny_components.unet, MultiControlNetModel(nets), [0.6, 1.3])
    ref = ReferenceStream(WithUNet(tiny_components, unet), [32], "none", 1.0, 1.0, seed=2, prompt="")
    for f in moving_frames(2):
        unet.cond = [control_of(f), control_of(f, negative=True)]
        run_against(engine, ref, [f])
    assert [c["scale"] for c in engine.status()["controlnets"]] == [0.6, 1.3]


def test_controlnet_matches_diffusers_sdxl_controlnet_img2img(xl_folder):  # noqa: F811
    """Tiny SDXL: our one step against StableDiffusionXLControlNetImg2ImgPipeline (as test_sdxl's img2img
    parity: 2 inference steps at strength 0.5 run exactly the schedule's last step, t_index [1] of 2)."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLControlNetImg2ImgPipeline
    from transformers import CLIPTokenizer

    pipe_dir, taesd, _ = xl_folder
    engine = StreamEngine.from_pretrained(
        str(pipe_dir), vae_id=str(taesd), device="cpu", width=W, height=H, num_inference_steps=2,
        t_index_list=[1], cfg="full", guidance_scale=1.7, prompt="a red cat", negative_prompt="blurry", seed=11,
        controlnets=[{"model": "random:controlnet-tiny-sdxl", "preprocessor": Tile(), "scale": 0.8}])
    c = engine.components
    pipe = StableDiffusionXLControlNetImg2ImgPipeline(
        vae=c.vae, unet=c.unet, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(pipe_dir / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(pipe_dir / "tokenizer_2"),
        controlnet=engine._control.units[0].module,
        scheduler=EulerAncestralDiscreteScheduler.from_pretrained(pipe_dir, subfolder="scheduler"),
        requires_aesthetics_score=False, force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    f = moving_frames(1)[0]
    image = torch.from_numpy(f).permute(2, 0, 1)[None].float() / 255.0  # [1, 3, H, W] in [0, 1]
    with torch.no_grad():
        ref = pipe(prompt="a red cat", negative_prompt="blurry", image=image, control_image=control_of(f),
                   strength=0.5, num_inference_steps=2, guidance_scale=1.7, controlnet_conditioning_scale=0.8,
                   generator=torch.Generator().manual_seed(11), output_type="latent").images  # [1, 4, h, w]
    engine(f)
    latent = engine._state.buffers.denoised
    rel = float((latent - ref).norm() / ref.norm())
    assert rel < 1e-5, f"latent relative difference {rel:.2e}"
    sums = engine._state.buffers.control.sums  # SDXL-style: text_embeds and time_ids reach the ControlNet too
    assert len(sums) == 7 and all(s.abs().mean() > 1e-3 for s in sums)


# ------------------------------------------------------------------------- live settings
def test_live_changes_apply_at_the_next_frame_boundary_by_buffer_writes(tiny_components):
    """One slot, no CFG: nothing carries over between frames, so each frame must equal a fresh engine built
    with the settings that frame ran with. A change is invisible until the next frame, costs a buffer write,
    and keeps the layout, its buffers and its graph key (graph capture needs CUDA: the GPU test below)."""
    unit = {"model": "random:controlnet-tiny", "preprocessor": Tile(), "scale": 1.0}
    engine = engine_with(tiny_components, [unit])
    frames = moving_frames(5)

    def fresh(**live):
        e = engine_with(tiny_components, [{**unit, **live}])
        e._control.units[0].module.load_state_dict(engine._control.units[0].module.state_dict())
        return e

    st, key = engine._state, engine._graph_key(engine._state.buffers.layout)
    addresses = [t.data_ptr() for t in st.buffers.control.scales + list(st.buffers.control.sums)]
    writes = st.buffers.control.writes
    changes = [{"scale": 0.4}, {"enabled": False}, {"enabled": True, "start": 0.5},
               {"start": 0.0, "end": 0.5, "scale": 2.0}, {"end": 1.0}]
    live = {}
    for f, change in zip(frames, changes):
        out = engine(f)  # runs with the changes made before it
        assert np.array_equal(out, fresh(**live)(f)), live
        applied = engine.settings.controlnets[0]
        engine.update(controlnets={0: change})
        assert engine.settings.controlnets[0] == applied  # accepted, applied at the next frame
        live.update(change)
    assert engine._state is st and engine._graph_key(st.buffers.layout) == key
    assert [t.data_ptr() for t in st.buffers.control.scales + list(st.buffers.control.sums)] == addresses
    assert st.buffers.control.writes == writes + len(changes) - 1  # the last change waits for a frame
    # disabled (or outside its steps) is exactly the model without ControlNets
    plain = engine_with(tiny_components, [])
    with pytest.raises(ConfigError, match="no ControlNets"):
        plain.update(controlnets=[{"scale": 1.0}])
    with pytest.raises(ConfigError, match="no ControlNets"):
        plain.set_control_image(frames[0])
    engine.update(controlnets=[{"enabled": False}])
    expect = plain(frames[0])
    assert np.array_equal(engine(frames[0]), expect)
    assert st.buffers.control.writes == writes + len(changes)  # the last change and this one: one write
    engine.update(controlnets=[{"enabled": True, "start": 0.5}])  # one slot, outside [0.5, 1]
    assert np.array_equal(engine(frames[0]), expect)
    engine.update(controlnets=[{"enabled": False, "start": 0.25}])
    described = {"model": "random:controlnet-tiny", "family": "sd21", "preprocessor": "tile", "scale": 2.0,
                 "start": 0.5, "end": 1.0, "enabled": True}
    assert engine.status()["controlnets"] == [described]  # status shows what the frames run with
    engine(frames[1])
    assert engine.status()["controlnets"] == [{**described, "start": 0.25, "enabled": False}]


def test_start_end_select_slots_as_diffusers_controlnet_keep(tiny_components):
    """Row scales with S = 3 slots and INITIALIZE CFG (F uncond rows, copies of slot 0): scale * keep(slot)
    with diffusers' keep = 1 - (s / S < start or (s + 1) / S > end)."""
    engine = engine_with(tiny_components, [{"model": "random:controlnet-tiny", "preprocessor": Tile(),
                                            "scale": 0.5, "start": 0.3, "end": 0.7}],
                         t_index_list=[10, 25, 40], cfg="initialize", guidance_scale=1.2)
    engine(moving_frames(1)[0])
    keep = [1.0 - float(s / 3 < 0.3 or (s + 1) / 3 > 0.7) for s in range(3)]  # [0, 1, 0]
    rows = [keep[0]] + keep  # uncond row first
    assert engine._state.buffers.control.scales[0].flatten().tolist() == [0.5 * k for k in rows]


@pytest.mark.gpu
def test_graph_backend_live_scale_changes_capture_nothing():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    engine = StreamEngine.from_pretrained("random:tiny", device="cuda", width=W, height=H, backend="graph",
                                          controlnets=[{"model": "random:controlnet-tiny", "preprocessor": Tile()}])
    frames = moving_frames(12)
    for f in frames[:3]:
        engine(f)
    captures = engine.status()["graph_cache"]["captures"]
    for i, f in enumerate(frames[3:]):
        engine.update(controlnets=[{"scale": 0.1 * i, "enabled": i % 3 != 0}])
        out = engine(f)
        assert np.abs(out.astype(int) - engine(f, use_graph=False).astype(int)).max() <= 1
    assert engine.status()["graph_cache"]["captures"] == captures


# ------------------------------------------------------------------------------------ bad input
def test_bad_inputs_name_what_was_expected_and_keep_the_stream(tiny_components):
    engine = engine_with(tiny_components, [{"model": "random:controlnet-tiny", "preprocessor": Tile(),
                                            "scale": 0.7},
                                           {"model": "random:controlnet-tiny", "preprocessor": "external"}])
    f = moving_frames(1)[0]
    engine.set_control_image(np.full((H, W, 3), 128, np.uint8), index=1)
    first = engine(f)
    settings = engine.settings
    bad = [(dict(controlnets=[{"scale": float("nan")}]), "scale must be a number from 0 to 10"),
           (dict(controlnets={2: {"scale": 1.0}}), "index must be an integer from 0 to 1"),
           (dict(controlnets=[{"start": 0.8, "end": 0.2}]), "start must be <= its end"),
           (dict(controlnets=[{"strength": 1.0}]), "keys among scale, start, end, enabled"),
           (dict(controlnets=0.5), "list of settings dicts")]
    for kw, words in bad:
        with pytest.raises(ConfigError, match=words):
            engine.update(**kw)
    with pytest.raises(FrameError, match=r"\[64, 64, 3\]"):
        engine.set_control_image(np.zeros((32, 32, 3), np.uint8), index=1)
    with pytest.raises(ConfigError, match="only 'external' ones"):
        engine.set_control_image(np.zeros((H, W, 3), np.uint8), index=0)
    with pytest.raises(ConfigError, match="from 0 to 1"):
        engine.set_control_image(np.zeros((H, W, 3), np.uint8), index=5)
    assert np.array_equal(engine(f), first) and engine.settings == settings  # running on the previous ones


def test_wrong_family_and_bad_specs_are_refused_at_construction(tiny_components):
    with pytest.raises(ConfigError, match=r"made for sdxl .* but the model is sd21"):
        engine_with(tiny_components, ["random:controlnet-tiny-sdxl"])
    with pytest.raises(ConfigError, match=r"made for sd21 \(cross_attention_dim 1024"):
        engine_with(tiny_components, [{"model": "random:controlnet-sd21", "preprocessor": Tile()}])  # before any weights
    for spec, words in [({"model": "random:controlnet-tiny", "preprocessor": "sobel"}, "one of canny, tile"),
                        ({"model": "random:controlnet-tiny", "scale": -1}, r"controlnets\[0\]: .*scale"),
                        ({"model": "random:controlnet-tiny", "weight": 1}, "takes keys among"),
                        ({"model": "random:nope"}, "unknown random ControlNet")]:
        with pytest.raises(ConfigError, match=words):
            engine_with(tiny_components, [spec])
    with pytest.raises(ConfigError, match="vae_overlap"):
        StreamEngine(EngineConfig("random:tiny", W, H, CPU, torch.float32, vae_overlap=True), tiny_components,
                     controlnets=[{"model": "random:controlnet-tiny", "preprocessor": Tile()}])


# ----------------------------------------------------------------------------- architectures
@pytest.mark.parametrize("name,params", [("controlnet-sd15", 361_279_120), ("controlnet-sd21", 364_228_240),
                                         ("controlnet-sdxl", 1_251_014_160)])
def test_random_controlnets_are_the_published_architectures(name, params):
    """Built on the meta device (no weights allocated); counts from shared/model_configs/README.md. The
    residual shapes are those unet_control_inputs names for the matching UNet."""
    net = build_random_controlnet(name, device="meta")
    assert sum(p.numel() for p in net.parameters()) == params
    unet_cfg = read_config({"controlnet-sd15": "sd15_unet.json", "controlnet-sd21": "sd_turbo_unet.json",
                            "controlnet-sdxl": "sdxl_unet.json"}[name])
    names = [n for n, _ in unet_control_inputs(unet_cfg, 64, 64)]
    assert len(names) == (10 if name == "controlnet-sdxl" else 13) and names[-1] == "mid_res"
    assert set(RANDOM_CONTROLNETS) >= {"controlnet-sd15", "controlnet-sd21", "controlnet-sdxl"}


def test_spec_parsing():
    assert ControlNetSpec.parse("random:controlnet-tiny") == ControlNetSpec("random:controlnet-tiny")
    spec = ControlNetSpec.parse({"model": "x", "preprocessor": "Depth", "scale": 0.5,
                                 "preprocessor_options": {"resolution": 252}})
    assert (spec.preprocessor, spec.settings().scale, spec.preprocessor_options) == ("depth", 0.5,
                                                                                     (("resolution", 252),))


def test_controlnet_with_ip_adapter_sees_the_prompt_tokens_only():
    """With an IP-Adapter the UNet's embeds are [B, T_text + T_ip, D]; a ControlNet gets the text tokens
    only, as diffusers' pipelines pass it prompt_embeds and the image embeds to the UNet alone."""
    engine = StreamEngine.from_pretrained("random:tiny-sd15", device="cpu", ip_adapter="random:ip-adapter-tiny",
                                          prompt="a red cat", controlnets=[{"model": "random:controlnet-tiny",
                                                                            "preprocessor": Tile(), "scale": 0.9}])
    f = moving_frames(1)[0]
    engine(f)
    b, T = engine._state.buffers, engine._prompts.tokens
    assert b.embeds.shape[1] > T  # image tokens ride behind the text
    net = engine._control.units[0].module
    with torch.no_grad():
        down, mid = net(b.unet_in, b.t_unet, encoder_hidden_states=b.embeds[:, :T], controlnet_cond=control_of(f),
                        conditioning_scale=0.9, return_dict=False)
    for ours, ref in zip(b.control.sums, (*down, mid)):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_preprocessors_by_name_run_in_the_frame(tiny_components):
    """The named preprocessors (control/preprocess.py) are made per engine and run in the frame stage: 'tile'
    gives what the local Tile gives; canny edges land in [0, 1] and change the result; bad options are refused
    when the engine is built."""
    f = moving_frames(1)[0]
    named = engine_with(tiny_components, [{"model": "random:controlnet-tiny", "preprocessor": "tile"},
                                          {"model": "random:controlnet-tiny", "preprocessor": "canny",
                                           "scale": 0.0}])
    local = engine_with(tiny_components, [{"model": "random:controlnet-tiny", "preprocessor": Tile()},
                                          {"model": "random:controlnet-tiny", "preprocessor": Tile(), "scale": 0.0}])
    assert np.abs(named(f).astype(int) - local(f).astype(int)).max() <= 1
    edges = named._control.units[1].image
    assert 0.0 <= edges.min() and edges.max() <= 1.0 and edges.max() > 0
    named.update(controlnets={1: {"scale": 1.0}})
    assert np.abs(named(f).astype(int) - local(f).astype(int)).max() > 1
    assert [c["preprocessor"] for c in named.status()["controlnets"]] == ["tile", "canny"]
    with pytest.raises(ConfigError, match="downscale"):
        engine_with(tiny_components, [{"model": "random:controlnet-tiny", "preprocessor": "tile",
                                       "preprocessor_options": {"downscale": 0}}])


def test_controlnet_from_a_local_folder(tiny_components, tmp_path):
    """A diffusers ControlNet folder (config.json + weights, or a controlnet/ subfolder) loads its own weights;
    one whose conditioning embedding does not match the VAE's scale is refused with both scales named."""
    from diffusers import ControlNetModel

    saved = build_random_controlnet("controlnet-tiny", seed=5)
    saved.save_pretrained(tmp_path / "cn" / "controlnet")
    engine = engine_with(tiny_components, [{"model": str(tmp_path / "cn"), "preprocessor": Tile()}])
    loaded = engine._control.units[0].module.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in saved.state_dict().items())
    cfg = {**dict(saved.config), "conditioning_embedding_out_channels": [8, 16, 16]}
    ControlNetModel.from_config(cfg).save_pretrained(tmp_path / "cn4")
    with pytest.raises(ConfigError, match="4x4 pixels .* VAE 2x2"):
        engine_with(tiny_components, [{"model": str(tmp_path / "cn4"), "preprocessor": Tile()}])
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        engine_with(tiny_components, [{"model": str(tmp_path / "none"), "preprocessor": Tile()}])
