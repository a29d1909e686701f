"""ControlNet export (issue 14): the ControlNet's own network spec, the UNet spec with the residual inputs,
both exported to ONNX and checked against the torch modules with ONNX Runtime on the CPU (tiny configs).

- the residual layout computed from a config (``engines.base.unet_control_inputs``) is the one diffusers'
  ControlNet returns (tiny SD2-style and SDXL-style), and 12 / 9 residuals for the SD 1.5 / SDXL architectures;
- SD2-style in fp32: ControlNet and UNet-with-residuals parity at the smallest and largest batch, and the
  chain ControlNet (ONNX) -> scaled residuals -> UNet (ONNX) equals diffusers' own ControlNet + UNet call;
- SDXL-style in fp16 (what a strongly typed TensorRT engine is built from): fp16 weights, the spec's binding
  types, parity against the fp16 modules;
- the control layout is in the UNet's cache key; a ControlNet of another layout is refused by name;
- an fp16 UNet with IP-Adapter processors (``rtdiffusion.control.ip_attention``) and residuals: the
  ``ip_scale`` input is what the graph reads (ONNX at a scale == torch with that scale in its live buffer).

The ControlNet is ``ControlNetModel.from_unet`` of the tiny UNet with every weight redrawn (the zero convs
too), so residuals are not zeros and a lost input would show.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from engines.base import unet_control_inputs  # noqa: E402
from engines.onnx_export import export_adapter, export_onnx, onnx_cache_key, verify_onnx  # noqa: E402
from engines.specs import SpecParams, make_specs, unet_batch_range  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "rtdiffusion" / "models" / "configs"
ONNX_TYPES = {"float16": "FLOAT16", "float32": "FLOAT"}


def _cfg(name):
    return {k: v for k, v in json.loads((CONFIGS / name).read_text()).items() if not k.startswith("_")}


def _randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Redraw every weight: matrices ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1), biases ~ N(0, 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if p.dim() > 1:
                p.copy_(r / math.sqrt(p[0].numel()))
            else:
                p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.1 * r)
    return module.eval().requires_grad_(False)


def _models(unet_config: str, dtype: torch.dtype):
    from diffusers import AutoencoderTiny, ControlNetModel, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(_cfg(unet_config)).eval().requires_grad_(False)
    vae = AutoencoderTiny.from_config(_cfg("tiny_taesd_test.json")).eval().requires_grad_(False)
    # the tiny VAE scales by 2, so the conditioning embedding downsamples by 2 (one stride-2 conv)
    cn = _randomise(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)), seed=1)
    unet, vae, cn = (m.to(dtype) for m in (unet, vae, cn))
    params = SpecParams.from_modules(unet, vae, 32, 32, batch=unet_batch_range(1, 3, 1), text_len=8,
                                     controlnets=[cn])
    return unet, vae, cn, params


@pytest.fixture(scope="module")
def sd2():
    return _models("tiny_unet_sd2style.json", torch.float32)


@pytest.fixture(scope="module")
def sd2_onnx(sd2, tmp_path_factory):
    unet, _, cn, params = sd2
    specs = make_specs(params)
    folder = tmp_path_factory.mktemp("control")
    for name, module in (("unet", unet), ("controlnet_0", cn)):
        assert export_onnx(module, specs[name], folder / f"{name}.onnx", exporter="torchscript") == "torchscript"
    return specs, folder


@pytest.mark.parametrize("config", ["tiny_unet_sd2style.json", "tiny_unet_sdxl_style.json"])
def test_residual_layout_is_diffusers(config):
    """The computed names and shapes are what a diffusers ControlNet of that config returns (odd size too)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(_cfg(config))
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).eval()
    for h, w in ((8, 8), (7, 10)):
        kw = {"added_cond_kwargs": {"text_embeds": torch.zeros(1, 32), "time_ids": torch.zeros(1, 6)}} \
            if "sdxl" in config else {}
        with torch.no_grad():
            down, mid = cn(torch.zeros(1, 4, h, w), torch.zeros(1), torch.zeros(1, 3, cn.config.cross_attention_dim),
                           torch.zeros(1, 3, 2 * h, 2 * w), return_dict=False, **kw)
        got = tuple((f"down_res_{i}", tuple(t.shape[1:])) for i, t in enumerate(down)) + (("mid_res", tuple(mid.shape[1:])),)
        assert unet_control_inputs(unet.config, h, w) == got


def test_residual_counts_of_the_real_architectures():
    sd15 = unet_control_inputs(_cfg("sd15_unet.json"), 64, 64)  # 512 x 512
    assert [n for n, _ in sd15] == [f"down_res_{i}" for i in range(12)] + ["mid_res"]
    assert sd15[0][1] == (320, 64, 64) and sd15[3][1] == (320, 32, 32) and sd15[-1][1] == (1280, 8, 8)
    xl = unet_control_inputs(_cfg("sdxl_unet.json"), 128, 128)  # 1024 x 1024
    assert len(xl) == 10 and xl[-2][1] == (1280, 32, 32) and xl[-1] == ("mid_res", (1280, 32, 32))


def test_control_specs(sd2):
    unet, vae, cn, params = sd2
    specs = make_specs(params)
    assert list(specs) == ["unet", "vae_encoder", "vae_decoder", "controlnet_0"]
    c = specs["controlnet_0"]
    assert c.input_names == ["sample", "timestep", "embeds", "controlnet_cond"]
    assert c.binding("controlnet_cond").dims == ("B", 3, 32, 32)
    assert c.output_names == [f"down_res_{i}" for i in range(6)] + ["mid_res"]
    assert all(b.dims[0] == "B" for b in c.outputs) and c.dynamic_axes()["mid_res"] == {0: "B"}
    u = specs["unet"]
    assert u.input_names[3:] == c.output_names and u.binding("mid_res").dims == ("B", 64, 8, 8)
    assert u.profile_shapes(0)["down_res_3"] == ((1, 32, 8, 8), (3, 32, 8, 8), (3, 32, 8, 8))
    plain = make_specs(SpecParams.from_modules(unet, vae, 32, 32, batch=unet_batch_range(1, 3, 1), text_len=8))
    assert list(plain) == ["unet", "vae_encoder", "vae_decoder"]
    # the control layout is part of the UNet's cache key (and the VAE's key is untouched)
    key = {n: onnx_cache_key(s, model="m", weights="w").digest for n, s in specs.items()}
    key_plain = {n: onnx_cache_key(s, model="m", weights="w").digest for n, s in plain.items()}
    assert key["unet"] != key_plain["unet"] and key["vae_decoder"] == key_plain["vae_decoder"]


def test_controlnet_of_another_layout_is_refused(sd2):
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet, vae, _, _ = sd2
    other = ControlNetModel.from_unet(UNet2DConditionModel.from_config(_cfg("tiny_unet_sdxl_style.json")),
                                      conditioning_embedding_out_channels=(8, 16))
    with pytest.raises(ValueError, match="ControlNet 0 .* another model family"):
        SpecParams.from_modules(unet, vae, 32, 32, batch=unet_batch_range(1, 2), text_len=8, controlnets=[other])
    eight = ControlNetModel.from_unet(unet)  # the published conditioning embedding scales images by 8, the VAE by 2
    with pytest.raises(ValueError, match=r"ControlNet 1 .* 32, 8\); the UNet and VAE need .* 32, 2\)"):
        SpecParams.from_modules(unet, vae, 32, 32, batch=unet_batch_range(1, 2), text_len=8,
                                controlnets=[sd2[2], eight])


@pytest.mark.parametrize("name", ["controlnet_0", "unet"])
def test_sd2_control_onnx_parity(sd2, sd2_onnx, name):
    unet, _, cn, _ = sd2
    specs, folder = sd2_onnx
    spec = specs[name]
    m = onnx.load(str(folder / f"{name}.onnx"))
    assert [i.name for i in m.graph.input] == spec.input_names
    assert [o.name for o in m.graph.output] == spec.output_names
    report = verify_onnx(cn if name == "controlnet_0" else unet, spec, folder / f"{name}.onnx")
    assert report.ok and len(report.max_abs_diff) == 2 * len(spec.outputs), str(report)  # B = 1 and 3


def test_onnx_chain_equals_diffusers_controlnet_unet(sd2, sd2_onnx):
    """ControlNet (ONNX) -> residuals x 0.7 -> UNet (ONNX) == diffusers' ControlNet(conditioning_scale=0.7)
    and UNet: the residuals reach the UNet graph, in diffusers' order."""
    unet, _, cn, _ = sd2
    specs, folder = sd2_onnx
    sample, t, embeds, cond = specs["controlnet_0"].sample_inputs(sizes={"B": 2}, seed=5)
    with torch.no_grad():
        down, mid = cn(sample, t, embeds, cond, conditioning_scale=0.7, return_dict=False)
        want = unet(sample, t, embeds, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                    return_dict=False)[0]
        plain = unet(sample, t, embeds, return_dict=False)[0]
    sess = {n: ort.InferenceSession(str(folder / f"{n}.onnx"), providers=["CPUExecutionProvider"])
            for n in ("controlnet_0", "unet")}
    feeds = dict(zip(specs["controlnet_0"].input_names, (x.numpy() for x in (sample, t, embeds, cond))))
    res = sess["controlnet_0"].run(None, feeds)
    feeds = {"sample": feeds["sample"], "timestep": feeds["timestep"], "embeds": feeds["embeds"],
             **{n: 0.7 * r for n, r in zip(specs["controlnet_0"].output_names, res)}}
    got = torch.from_numpy(sess["unet"].run(["eps"], feeds)[0])
    assert (want - plain).abs().max() > 1e-2  # the control changes eps ...
    assert (got - want).abs().max() < 1e-3  # ... and the ONNX chain changes it the same way


def test_sdxl_control_onnx_fp16(tmp_path):
    """fp16 exports from fp16 modules, as a strongly typed engine needs: fp16 weights, the spec's binding
    types (timestep fp32), parity with the fp16 torch modules at the smallest and largest batch."""
    unet, _, cn, params = _models("tiny_unet_sdxl_style.json", torch.float16)
    specs = make_specs(params)
    assert specs["controlnet_0"].input_names == ["sample", "timestep", "embeds", "controlnet_cond",
                                                 "text_embeds", "time_ids"]
    assert specs["unet"].input_names[5:] == specs["controlnet_0"].output_names
    for name, module in (("controlnet_0", cn), ("unet", unet)):
        spec, path = specs[name], tmp_path / f"{name}.onnx"
        export_onnx(module, spec, path, exporter="torchscript")
        m = onnx.load(str(path))
        type_name = onnx.TensorProto.DataType.Name
        bindings = {v.name: type_name(v.type.tensor_type.elem_type) for v in [*m.graph.input, *m.graph.output]}
        assert bindings == {b.name: ONNX_TYPES[b.dtype] for b in spec.bindings}
        weights = {type_name(i.data_type) for i in m.graph.initializer if i.data_type in (1, 10, 16)}
        assert weights <= {"FLOAT16"}, f"{name}: fp32 weights in an fp16 export: {weights}"
        report = verify_onnx(module, spec, path)
        assert report.ok and len(report.max_abs_diff) == 2 * len(spec.outputs), str(report)
    # the SDXL ControlNet reads its added conditioning
    adapter = export_adapter(specs["controlnet_0"], cn)
    args = list(specs["controlnet_0"].sample_inputs())
    with torch.no_grad():
        a = adapter(*args)[-1]
        args[5] = args[5] + 64.0
        assert (adapter(*args)[-1] - a).abs().max() > 1e-3


def test_ip_adapter_unet_onnx_fp16(sd2, tmp_path):
    """An fp16 UNet with IP-Adapter processors (rtdiffusion.control.ip_attention) and ControlNet residuals:
    embeds [B, T_text + T_ip, D], ``ip_scale [1] fp32`` last. ONNX Runtime at a scale equals the torch UNet
    whose live buffer holds that scale; the graph stays fp16 apart from that input."""
    ip_attention = pytest.importorskip("rtdiffusion.control.ip_attention", reason="the IP-Adapter processor")
    from diffusers import UNet2DConditionModel

    _, vae, cn, _ = sd2
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(_cfg("tiny_unet_sd2style.json")).eval().requires_grad_(False)
    unet, vae, cn = (copy.deepcopy(m).half() for m in (unet, vae, cn))
    gen = torch.Generator().manual_seed(3)
    layers = {}
    for i, (_, hidden) in enumerate(ip_attention.cross_attention_layers(unet)):
        for w in ("to_k_ip", "to_v_ip"):
            layers[f"{2 * i + 1}.{w}.weight"] = torch.randn(hidden, 32, generator=gen) / math.sqrt(32)
    scale = ip_attention.IPScale(torch.device("cpu"))
    ip_attention.install(unet, layers, text_tokens=8, scale=scale)
    params = SpecParams.from_modules(unet, vae, 32, 32, batch=unet_batch_range(1, 3, 1), text_len=8,
                                     controlnets=[cn], ip_tokens=4)
    spec = make_specs(params)["unet"]
    assert spec.binding("embeds").dims == ("B", 12, 32) and spec.input_names[-2:] == ["mid_res", "ip_scale"]
    path = tmp_path / "unet_ip.onnx"
    export_onnx(unet, spec, path, exporter="torchscript")
    m = onnx.load(str(path))
    type_name = onnx.TensorProto.DataType.Name
    bindings = {v.name: type_name(v.type.tensor_type.elem_type) for v in [*m.graph.input, *m.graph.output]}
    assert bindings == {b.name: ONNX_TYPES[b.dtype] for b in spec.bindings}
    assert {type_name(i.data_type) for i in m.graph.initializer if i.data_type in (1, 10, 16)} <= {"FLOAT16"}
    report = verify_onnx(unet, spec, path)
    assert report.ok and len(report.max_abs_diff) == 2, str(report)
    # the input is what the graph reads: at 0.8 it is the torch UNet with 0.8 in its live buffer
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    args = spec.sample_inputs(sizes={"B": 2}, seed=7)
    feeds = {b.name: a.numpy() for b, a in zip(spec.inputs, args)}
    got = {s: torch.from_numpy(sess.run(["eps"], {**feeds, "ip_scale": torch.tensor([s]).numpy()})[0]).float()
           for s in (0.0, 0.8)}
    scale.write(0.8)
    with torch.no_grad():
        want = unet(args[0], args[1], args[2], down_block_additional_residuals=args[3:-2],
                    mid_block_additional_residual=args[-2], return_dict=False)[0].float()
    assert (got[0.8] - got[0.0]).abs().max() > 1e-2  # the scale reaches the graph
    assert (got[0.8] - want).abs().max() < 5e-2
