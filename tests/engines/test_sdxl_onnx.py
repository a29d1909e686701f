"""The SDXL UNet's one network spec (added conditioning inputs) exported to ONNX and checked with ONNX
Runtime on the CPU, with the tiny SDXL-style config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from engines.onnx_export import export_adapter, export_onnx, verify_onnx  # noqa: E402
from engines.specs import AxisRange, SpecParams, make_specs, unet_batch_range  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "rtdiffusion" / "models" / "configs"


def _cfg(name):
    return {k: v for k, v in json.loads((CONFIGS / name).read_text()).items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def xl():
    from diffusers import AutoencoderTiny, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(_cfg("tiny_unet_sdxl_style.json")).eval()
    taesd = AutoencoderTiny.from_config(_cfg("tiny_taesd_test.json")).eval()
    return unet, taesd


def test_sdxl_unet_spec_has_the_added_conditioning_inputs(xl):
    unet, taesd = xl
    p = SpecParams.from_modules(unet, taesd, 32, 32, batch=unet_batch_range(1, 2, 1, "full"), text_len=8)
    spec = make_specs(p)["unet"]
    assert spec.input_names == ["sample", "timestep", "embeds", "text_embeds", "time_ids"]
    assert spec.binding("text_embeds").dims == ("B", 32) and spec.binding("time_ids").dims == ("B", 6)
    assert spec.binding("embeds").dims == ("B", 8, 64)
    assert spec.cache_fields()["inputs"][3] == ["text_embeds", ["B", 32], "float32"]


def test_sdxl_unet_onnx_parity(xl, tmp_path):
    unet, taesd = xl
    p = SpecParams.from_modules(unet, taesd, 32, 32, batch=unet_batch_range(1, 2, 1, "full"),
                                frames=AxisRange(1, 1, 1), text_len=8, dtype=torch.float32)
    spec = make_specs(p)["unet"]
    path = tmp_path / "unet.onnx"
    assert export_onnx(unet, spec, path, exporter="torchscript") == "torchscript"
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == spec.input_names
    report = verify_onnx(unet, spec, path)  # B at the profile's min (1) and max (4)
    assert report.ok, str(report)
    assert len(report.max_abs_diff) >= 2
    # the added inputs reach the network: other size ids give another eps
    adapter = export_adapter(spec, unet)
    args = list(spec.sample_inputs())
    with torch.no_grad():
        a = adapter(*args)
        args[4] = args[4] + 64.0
        b = adapter(*args)
    assert (a - b).abs().max() > 1e-4
