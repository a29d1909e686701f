"""The fp16 ONNX exports a strongly typed TensorRT engine is built from, checked on the CPU (tiny models).

A strongly typed engine runs every tensor in the type the ONNX graph gives it (engines/trt_build.py), so the
graph must be fp16 where the engine should be fp16 and nothing more. For the UNet (SD2-style and SDXL-style,
with and without the temporal KV cache's bindings), the TAESD encoder and decoder and the KL encoder and
decoder, exported from fp16 modules:

- every weight in the graph is fp16 and the bindings have the spec's types (fp16, the timestep fp32);
- ONNX Runtime (CPU) on the file matches the fp16 torch module within the fp16 tolerance (5e-2), at the
  smallest and largest size of every dynamic axis;
- and it stays within the same tolerance of the fp32 module: fp16 loses nothing that fp32 islands would
  have to restore on these networks. The fp32 the graphs do keep is the model's own (diffusers computes the
  timestep embedding in fp32 and casts it), not added by the export.

What this cannot show: how TensorRT computes inside its fp16 kernels (TensorRT is not run here).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from engines.onnx_export import export_adapter, export_onnx, verify_onnx  # noqa: E402
from engines.specs import AxisRange, SpecParams, make_specs, unet_batch_range, unet_spec  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "rtdiffusion" / "models" / "configs"
TOL = 5e-2  # engines.onnx_export.default_atol for fp16 outputs


def _cfg(name):
    return {k: v for k, v in json.loads((CONFIGS / name).read_text()).items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def models():
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel

    torch.manual_seed(0)
    fp32 = {"unet": UNet2DConditionModel.from_config(_cfg("tiny_unet_sd2style.json")).eval(),
            "unet_xl": UNet2DConditionModel.from_config(_cfg("tiny_unet_sdxl_style.json")).eval(),
            "taesd": AutoencoderTiny.from_config(_cfg("tiny_taesd_test.json")).eval(),
            "kl": AutoencoderKL.from_config(_cfg("tiny_vae_kl.json")).eval()}
    for m in fp32.values():
        m.requires_grad_(False)
    fp16 = {k: copy.deepcopy(m).half() for k, m in fp32.items()}
    return fp32, fp16


def _onnx_types(path: Path) -> tuple[dict[str, str], set[str]]:
    """(binding name -> element type name, element types of the initializers)."""
    m = onnx.load(str(path))
    name = onnx.TensorProto.DataType.Name
    bindings = {v.name: name(v.type.tensor_type.elem_type) for v in [*m.graph.input, *m.graph.output]}
    return bindings, {name(i.data_type) for i in m.graph.initializer if i.data_type in (1, 10, 16)}


def _check(module16, module32, spec, path, exporter="torchscript"):
    export_onnx(module16, spec, path, exporter=exporter)
    bindings, weights = _onnx_types(path)
    want = {b.name: {"float16": "FLOAT16", "float32": "FLOAT", "int64": "INT64"}[b.dtype] for b in spec.bindings}
    assert bindings == want, "binding types are the spec's"
    assert weights <= {"FLOAT16"}, f"{spec.name}: fp32 weights in an fp16 export: {weights}"
    report = verify_onnx(module16, spec, path)  # ORT (CPU) vs the fp16 module, min and max sizes
    assert report.ok and len(report.max_abs_diff) >= 2, str(report)
    # ... and vs the fp32 module on the same inputs: what fp16 costs on this network
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = export_adapter(spec, module32).eval()
    for n, sizes in enumerate([spec.sizes("min", 0), spec.sizes("max", len(spec.profiles) - 1)]):
        args = spec.sample_inputs("cpu", sizes, seed=n)
        with torch.no_grad():
            want32 = ref(*[a.float() if a.is_floating_point() else a for a in args])
        want32 = want32 if isinstance(want32, (tuple, list)) else (want32,)
        got = sess.run(spec.output_names, {b.name: a.numpy() for b, a in zip(spec.inputs, args)})
        for b, g, w in zip(spec.outputs, got, want32):
            diff = float((torch.from_numpy(g).float() - w.float()).abs().max())
            assert diff <= TOL, f"{spec.name} {b.name} at {sizes}: fp16 ONNX is {diff:.3g} from fp32 torch"
    return report


def _params(unet, vae, **kw):
    return SpecParams.from_modules(unet, vae, 32, 32, batch=unet_batch_range(1, 3, 1), frames=AxisRange(1, 1, 2),
                                   text_len=8, dtype=torch.float16, **kw)


def test_unet_fp16(models, tmp_path):
    fp32, fp16 = models
    spec = make_specs(_params(fp16["unet"], fp16["taesd"]))["unet"]
    assert spec.binding("sample").dtype == "float16" and spec.binding("timestep").dtype == "float32"
    _check(fp16["unet"], fp32["unet"], spec, tmp_path / "unet.onnx")


def test_sdxl_unet_fp16(models, tmp_path):
    fp32, fp16 = models
    spec = make_specs(_params(fp16["unet_xl"], fp16["taesd"]))["unet"]
    assert spec.input_names == ["sample", "timestep", "embeds", "text_embeds", "time_ids"]
    _check(fp16["unet_xl"], fp32["unet_xl"], spec, tmp_path / "unet_xl.onnx")


@pytest.mark.parametrize("network,vae", [("vae_encoder", "taesd"), ("vae_decoder", "taesd"),
                                         ("vae_encoder", "kl"), ("vae_decoder", "kl")])
def test_vae_fp16(models, tmp_path, network, vae):
    fp32, fp16 = models
    spec = make_specs(_params(fp16["unet"], fp16[vae]))[network]
    _check(fp16[vae], fp32[vae], spec, tmp_path / f"{vae}_{network}.onnx")


def test_kv_cache_unet_fp16(models, tmp_path):
    """The UNet with the temporal KV cache's banks as bindings (the cache in fp16, as on the GPU)."""
    from engines.kv_cache import install

    fp32, fp16 = models
    hw = 16
    cache16 = install(fp16["unet"], 2, (hw, hw), 2, torch.float16, "cpu")
    cache32 = install(fp32["unet"], 2, (hw, hw), 2, torch.float32, "cpu")
    try:
        extra_in, extra_out = cache16.export_bindings()
        params = SpecParams(width=hw * 8, height=hw * 8, embed_dim=32, text_len=8, dtype="float16",
                            batch=AxisRange(1, 2, 2))
        spec = unet_spec(params, extra_in, extra_out)
        assert spec.binding("kv_slot_bias").dtype == "float16" and spec.input_names[-1] == "kv_slot_bias"
        with cache16.export_module() as m16, cache32.export_module() as m32:
            _check(m16, m32, spec, tmp_path / "unet_kv.onnx")
    finally:
        cache16.uninstall()
        cache32.uninstall()
