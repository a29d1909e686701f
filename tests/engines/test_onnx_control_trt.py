"""TensorRT side of ControlNet / IP-Adapter (issue 14), on the CPU: which engine input each call argument of
``TrtNetworks`` becomes (by name, from the specs), and the specs' control bindings.

TensorRT is not run here (not installable); the engines are recorders standing in for ``TrtEngine``: they
keep the tensors each run received, by the spec's input names, so the test checks our routing, not TensorRT.
``test_real_*`` builds real engines from the tiny models (needs tensorrt and a CUDA device; skipped here).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from engines.specs import NetworkSpec, SpecParams, make_specs, unet_batch_range
from engines.trt_networks import TrtNetworks, unet_call_inputs

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
CONFIGS = Path(__file__).resolve().parents[2] / "rtdiffusion" / "models" / "configs"
RESIDUALS = tuple((f"down_res_{i}", (8, 4, 4)) for i in range(3)) + (("mid_res", (8, 2, 2)),)


class _Recorder:
    """Stands in for ``TrtEngine``: ``run`` keeps its inputs by the spec's names, returns one tensor per output."""

    def __init__(self, name: str, spec: NetworkSpec) -> None:
        self.spec, self.path, self.device = spec, Path(f"{name}.plan"), torch.device("cpu")
        self.outputs = {b.name: torch.full(b.shape(spec.max_sizes()), float(i)) for i, b in enumerate(spec.outputs)}
        self.got: dict[str, torch.Tensor] = {}

    def run(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        assert len(inputs) == len(self.spec.inputs), "an engine gets every one of its inputs on each run"
        self.got = dict(zip(self.spec.input_names, inputs))
        return tuple(self.outputs.values())


def _params(**kw) -> SpecParams:
    base = dict(width=16, height=16, vae_scale=2, batch=unet_batch_range(1, 2), text_len=5, embed_dim=8,
                dtype="float32", added=(("text_embeds", (6,)), ("time_ids", (6,))))
    return SpecParams(**{**base, **kw})


def _nets(params: SpecParams):
    specs = make_specs(params)
    engines = {n: _Recorder(n, s) for n, s in specs.items()}
    return TrtNetworks(engines, None), engines, specs


def test_ip_adapter_and_controlnet_specs():
    specs = make_specs(_params(controlnets=2, residuals=RESIDUALS, ip_tokens=4))
    u = specs["unet"]
    assert u.input_names == ["sample", "timestep", "embeds", "text_embeds", "time_ids",
                             "down_res_0", "down_res_1", "down_res_2", "mid_res", "ip_scale"]
    assert u.binding("embeds").dims == ("B", 9, 8)  # text then image tokens
    assert u.binding("ip_scale").dims == (1,) and u.binding("ip_scale").dtype == "float32"
    assert "ip_scale" not in u.dynamic_axes() and u.profile_shapes(0)["ip_scale"] == ((1,), (1,), (1,))
    for i in (0, 1):
        c = specs[f"controlnet_{i}"]
        assert c.binding("embeds").dims == ("B", 5, 8)  # text tokens only: the image tokens are the UNet's
        assert c.input_names[4:] == ["text_embeds", "time_ids"] and c.output_names == [n for n, _ in RESIDUALS]
    assert unet_call_inputs(u) == u.input_names[:-1]
    plain = make_specs(_params())["unet"].cache_fields()
    assert plain != make_specs(_params(ip_tokens=4))["unet"].cache_fields() != u.cache_fields()
    with pytest.raises(ValueError, match="residuals given exactly when controlnets > 0"):
        _params(controlnets=1)


def test_trt_networks_route_by_name():
    nets, engines, specs = _nets(_params(controlnets=2, residuals=RESIDUALS, ip_tokens=4))
    assert nets.added == ["text_embeds", "time_ids"] and nets.residuals == [n for n, _ in RESIDUALS]
    assert nets.persistent == ["ip_scale"] and nets.controlnet_count == 2
    args = specs["unet"].sample_inputs(sizes={"B": 2})
    per_call, ip_scale = args[:-1], torch.tensor([0.6])
    with pytest.raises(ValueError, match=r"persistent inputs \['ip_scale'\] first"):
        nets.unet(*per_call)
    with pytest.raises(ValueError, match="no persistent inputs .'kv_bank'."):
        nets.bind_inputs(kv_bank=ip_scale)
    nets.bind_inputs(ip_scale=ip_scale)
    with pytest.raises(ValueError, match=r"takes sample, timestep, embeds and 6 more inputs"):
        nets.unet(*per_call[:-1])  # mid_res left out
    eps = nets.unet(*per_call)
    got = engines["unet"].got
    assert all(got[b.name] is a for b, a in zip(specs["unet"].inputs, per_call))
    assert got["ip_scale"] is ip_scale and eps is engines["unet"].outputs["eps"]
    # the ControlNet call goes to its own engine and returns its outputs in spec order (down..., mid)
    cn_args = specs["controlnet_1"].sample_inputs(sizes={"B": 2})
    out = nets.controlnet(1, *cn_args)
    assert engines["controlnet_1"].got["controlnet_cond"] is cn_args[3] and not engines["controlnet_0"].got
    assert [o.shape[1:] for o in out] == [torch.Size(d) for _, d in RESIDUALS]
    # with an IP-Adapter the ControlNets get the text tokens, a strided view of the UNet's embeds: the engine
    # gets a contiguous copy, at the same address every call
    text = args[2][:, :5]
    assert not text.is_contiguous()
    nets.controlnet(0, cn_args[0], cn_args[1], text, cn_args[3], *cn_args[4:])
    first = engines["controlnet_0"].got["embeds"]
    assert first.is_contiguous() and torch.equal(first, text)
    nets.controlnet(0, cn_args[0], cn_args[1], (args[2] * 2)[:, :5], cn_args[3], *cn_args[4:])
    assert engines["controlnet_0"].got["embeds"].data_ptr() == first.data_ptr()


def test_attach_controlnets_checks_what_the_engines_were_built_from():
    from engines.versions import weights_fingerprint

    params = _params(controlnets=2, residuals=RESIDUALS)
    specs = make_specs(params)
    engines = {n: _Recorder(n, s) for n, s in specs.items()}
    modules = [torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)]
    nets = TrtNetworks(engines, None, controlnet_weights=[weights_fingerprint(m) for m in modules])
    nets.attach_controlnets(modules)
    with pytest.raises(ValueError, match="ControlNet 1 has other weights .*controlnet_1.plan"):
        nets.attach_controlnets([modules[0], torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="built for 2 ControlNets; this engine has 1"):
        nets.attach_controlnets(modules[:1])
    plain, _, _ = _nets(_params())
    with pytest.raises(ValueError, match="built for 0 ControlNets; this engine has 2.*backend 'eager'"):
        plain.attach_controlnets(modules)


def test_trt_networks_without_control_keep_the_old_calls():
    nets, engines, specs = _nets(_params(added=()))
    assert nets.persistent == [] and nets.residuals == [] and nets.controlnet_count == 0
    args = specs["unet"].sample_inputs(sizes={"B": 1})
    nets.unet(*args)
    assert list(engines["unet"].got) == ["sample", "timestep", "embeds"]
    with pytest.raises(ValueError, match="ControlNet engines must be controlnet_0"):
        TrtNetworks({**engines, "controlnet_1": engines["unet"]}, None)


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TRT, reason="needs the tensorrt package (10.1+ or 11.x) and a CUDA device")
def test_real_control_engines_match_torch(tmp_path):
    """fp16 engines of a tiny UNet with residual inputs and its ControlNet equal the torch modules."""
    from diffusers import AutoencoderTiny, ControlNetModel, UNet2DConditionModel

    from engines.base import TorchNetworks
    from engines.cache import EngineCache
    from engines.trt_build import TrtBuildOptions
    from engines.trt_runtime import load_or_build_trt

    def cfg(name):
        return {k: v for k, v in json.loads((CONFIGS / name).read_text()).items() if not k.startswith("_")}

    torch.manual_seed(0)
    dev = torch.device("cuda")
    unet = UNet2DConditionModel.from_config(cfg("tiny_unet_sd2style.json")).eval()
    vae = AutoencoderTiny.from_config(cfg("tiny_taesd_test.json")).eval()
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).eval()
    with torch.no_grad():  # no zero convs: the residuals must carry something
        for p in cn.parameters():
            p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel() if p.dim() > 1 else 100))
    unet, vae, cn = (m.to(dev, torch.float16).requires_grad_(False) for m in (unet, vae, cn))
    params = SpecParams.from_modules(unet, vae, 64, 64, batch=unet_batch_range(1, 4), dtype=torch.float16,
                                     controlnets=[cn])
    nets = load_or_build_trt(unet, vae, params, EngineCache(tmp_path), model="tiny", controlnets=[cn],
                             options=TrtBuildOptions(optimization_level=0))
    nets.attach_controlnets([cn])
    ref = TorchNetworks(unet, vae)
    ref.attach_controlnets([cn])
    specs = make_specs(params)
    for b in (1, 4):
        x = [t.to(dev) for t in specs["controlnet_0"].sample_inputs("cpu", {"B": b})]
        got, want = nets.controlnet(0, *x), ref.controlnet(0, *x)
        assert len(got) == len(want) == len(params.residuals)
        for g, w in zip(got, want):
            assert (g.float() - w.float()).abs().max() < 5e-2
        u = [t.to(dev) for t in specs["unet"].sample_inputs("cpu", {"B": b})]
        assert (nets.unet(*u).float() - ref.unet(*u).float()).abs().max() < 5e-2
    torch.cuda.synchronize()
