"""ONNX export of the three networks, checked against torch with ONNX Runtime on the CPU (tiny models)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from engines.cache import EngineCache  # noqa: E402
from engines.onnx_export import ONNX_FILE, export_onnx, export_to_cache, verify_onnx  # noqa: E402
from engines.specs import AxisRange, Binding, SpecParams, make_specs, unet_batch_range, unet_spec  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "rtdiffusion" / "models" / "configs"
log = logging.getLogger(__name__)


def _cfg(name):
    return {k: v for k, v in json.loads((CONFIGS / name).read_text()).items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def tiny():
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(_cfg("tiny_unet_sd2style.json")).eval()
    taesd = AutoencoderTiny.from_config(_cfg("tiny_taesd_test.json")).eval()
    kl = AutoencoderKL.from_config(_cfg("tiny_vae_kl.json")).eval()
    return unet, taesd, kl


@pytest.fixture(scope="module")
def specs(tiny):
    unet, taesd, _ = tiny
    p = SpecParams.from_modules(unet, taesd, 32, 32, batch=unet_batch_range(1, 3, 1),
                                frames=AxisRange(1, 1, 2), text_len=8)
    return make_specs(p)


def _check(report, record_property):
    record_property(f"{report.network}_max_abs_diff", report.worst)
    log.info("%s", report)
    assert report.ok, str(report)
    assert len(report.max_abs_diff) >= 2  # min and max of the dynamic axis were both run


@pytest.fixture(scope="module")
def unet_onnx(tiny, specs, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "unet.onnx"
    assert export_onnx(tiny[0], specs["unet"], path, exporter="torchscript") == "torchscript"
    return path


def test_unet_onnx_parity(tiny, specs, unet_onnx, record_property):
    _check(verify_onnx(tiny[0], specs["unet"], unet_onnx), record_property)


# The KL decoder runs the same decode() adapter as TAESD's; its encoder is checked for the posterior mode.
@pytest.mark.parametrize("network,vae", [("vae_encoder", "taesd"), ("vae_decoder", "taesd"), ("vae_encoder", "kl")])
def test_vae_onnx_parity(tiny, specs, tmp_path, network, vae, record_property):
    module = tiny[1] if vae == "taesd" else tiny[2]
    spec = specs[network]
    path = tmp_path / f"{network}.onnx"
    assert export_onnx(module, spec, path, exporter="torchscript") == "torchscript"
    _check(verify_onnx(module, spec, path), record_property)


def test_onnx_graph_matches_spec(specs, unet_onnx):
    """Binding names, dtypes and the symbolic batch axis in the file are the spec's."""
    spec = specs["unet"]
    m = onnx.load(str(unet_onnx))
    names = [i.name for i in m.graph.input]
    assert names == spec.input_names
    assert [o.name for o in m.graph.output] == spec.output_names
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input]
    assert dims == [list(b.dims) for b in spec.inputs]
    assert m.opset_import[0].version == spec.opset


def test_dynamo_exporter(tiny, specs, tmp_path, record_property):
    """The fallback exporter (torch.export based) gives the same bindings and parity."""
    spec = specs["vae_decoder"]
    path = tmp_path / "dec.onnx"
    assert export_onnx(tiny[1], spec, path, exporter="dynamo") == "dynamo"
    assert [i.name for i in onnx.load(str(path)).graph.input] == spec.input_names
    _check(verify_onnx(tiny[1], spec, path), record_property)


class _SpecOrderedUNet(torch.nn.Module):
    """Stand-in for the KV-cache UNet: extra input and output bindings after the standard ones."""

    spec_ordered = True

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4))

    def forward(self, sample, timestep, embeds, bank):
        eps = sample * self.w.view(1, 4, 1, 1) + timestep.view(-1, 1, 1, 1) * 1e-3 + embeds.mean()
        return eps, bank.flip(1) + 1.0


def test_extra_bindings_export(tiny, tmp_path, record_property):
    """Extra named inputs/outputs (KV-cache banks) export through the same code without change."""
    p = SpecParams.from_modules(tiny[0], tiny[1], 32, 32, batch=unet_batch_range(1, 2), text_len=8)
    spec = unet_spec(p, extra_inputs=[Binding("kv_bank.0", ("B", "M", 6), "float32")],
                     extra_outputs=[Binding("kv_fresh.0", ("B", "M", 6), "float32")],
                     extra_axes={"M": AxisRange(1, 2, 3)})
    assert spec.input_names == ["sample", "timestep", "embeds", "kv_bank.0"]
    assert spec.dynamic_axes()["kv_bank.0"] == {0: "B", 1: "M"}
    assert spec.profile_shapes(0)["kv_bank.0"] == ((1, 1, 6), (2, 2, 6), (2, 3, 6))
    torch.manual_seed(1)
    module = _SpecOrderedUNet().eval()
    path = tmp_path / "unet_kv.onnx"
    export_onnx(module, spec, path)
    _check(verify_onnx(module, spec, path), record_property)


def test_export_to_cache_hits_and_records_parity(tiny, specs, tmp_path, monkeypatch):
    cache = EngineCache(tmp_path / "cache")
    spec = specs["vae_decoder"]
    e1 = export_to_cache(tiny[1], spec, cache, model="tiny", weights="w1")
    assert (e1.path / ONNX_FILE).is_file()
    parity = e1.manifest["extra"]["parity"]
    assert max(parity["max_abs_diff"].values()) <= parity["atol"]
    assert e1.manifest["key"]["backend"] == "onnx"

    import engines.onnx_export as ox

    monkeypatch.setattr(ox, "export_onnx", lambda *a, **k: pytest.fail("a cache hit must not export again"))
    e2 = export_to_cache(tiny[1], spec, cache, model="tiny", weights="w1")
    assert e2.path == e1.path
