"""`rtdiffusion build` and `rtdiffusion doctor` on the CPU (no GPU, no TensorRT)."""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest

from rtdiffusion.cli import main


def test_doctor_table(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for word in ("GPU", "NVIDIA driver", "CUDA", "torch", "tensorrt", "onnxruntime", "diffusers", "backends:", "eager"):
        assert word in out


def test_doctor_json(capsys, tmp_path):
    assert main(["doctor", "--json", "--engine-dir", str(tmp_path)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["backends"]["eager"]["usable"] is True
    assert set(r["versions"]) >= {"torch", "tensorrt", "onnx", "onnxruntime", "diffusers"}
    assert r["engine_cache"] == {"root": str(tmp_path), "entries": 0}
    if importlib.util.find_spec("tensorrt") is None:
        assert r["backends"]["trt"]["usable"] is False and "not installed" in r["backends"]["trt"]["why"]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_build_trt_without_tensorrt_fails_clearly(caplog, tmp_path):
    with caplog.at_level(logging.ERROR):
        assert main(["build", "--model", "random:tiny", "--backend", "trt", "--engine-dir", str(tmp_path)]) == 2
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "tensorrt" in msg and "--export-only" in msg
    # it suggests only what build accepts: not the run-time backends eager / graph
    assert "--backend compiled" in msg and "eager" not in msg and "graph" not in msg


@pytest.mark.parametrize("argv,expect", [
    (["--min-steps", "3", "--max-steps", "2", "--export-only"], "min_steps <= max_steps"),
    (["--guidance", "double", "--export-only"], "--cfg must be one of"),  # the old spelling of --cfg
    (["--frame-buffer-size", "17", "--export-only"], "--frame-buffer-size must be from 1 to 16; got 17"),
    (["--cfg", "full", "--dtype", "float64", "--export-only"], "--dtype must be one of 'auto'"),  # flags, not API
])
def test_build_rejects_bad_flags(caplog, tmp_path, argv, expect):
    with caplog.at_level(logging.ERROR):
        assert main(["build", "--model", "random:tiny", "--engine-dir", str(tmp_path), *argv]) == 2
    assert any(expect in r.getMessage() for r in caplog.records)


def test_build_refuses_backends_it_cannot_build(capsys):
    """build makes trt or compiled engines; the run-time backends are refused by the parser, which names
    the two it takes."""
    for flag, bad, allowed in [("--backend", "onnxx", "'trt', 'compiled'"), ("--backend", "eager", "'trt', 'compiled'"),
                               ("--backend", "graph", "'trt', 'compiled'"), ("--vae", "big", "'tiny', 'kl'")]:
        with pytest.raises(SystemExit) as exc:
            main(["build", "--model", "random:tiny", flag, bad])
        assert exc.value.code == 2
        assert f"invalid choice: '{bad}' (choose from {allowed})" in capsys.readouterr().err


def test_build_export_only_fills_the_cache(tmp_path, caplog):
    argv = ["build", "--model", "random:tiny", "--export-only", "--width", "32", "--height", "32",
            "--max-steps", "2", "--engine-dir", str(tmp_path)]
    assert main(argv) == 0
    entries = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert [e.split("-")[0] for e in entries] == ["unet", "vae_decoder", "vae_encoder"]
    for e in entries:
        m = json.loads((tmp_path / e / "manifest.json").read_text())
        assert "model.onnx" in m["artifacts"] and m["key"]["backend"] == "onnx"
        assert max(m["extra"]["parity"]["max_abs_diff"].values()) <= m["extra"]["parity"]["atol"]
    unet = json.loads((tmp_path / entries[0] / "manifest.json").read_text())
    # default --cfg full, as the engine loads its TensorRT UNet: 1 row .. 2 steps x 2 (uncond rows)
    assert unet["key"]["shapes"]["profiles"] == [{"B": [1, 4, 4]}]
    # a second run finds everything in the cache and builds nothing
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="engines.cache"):
        assert main(argv) == 0
    assert not any("built" in r.getMessage() for r in caplog.records)


def test_build_defaults_are_the_profile_the_engine_loads():
    """An ahead-of-time `build` with default flags must produce the UNet range the trt backend asks for,
    or the engine would never find it in the cache."""
    from engines.specs import unet_batch_range
    from rtdiffusion.backends import TRT_GUIDANCE, TRT_MAX_STEPS, TRT_MIN_STEPS
    from rtdiffusion.cli import build_parser

    args = build_parser().parse_args(["build", "--model", "random:tiny"])
    assert (args.min_steps, args.max_steps, args.cfg) == (TRT_MIN_STEPS, TRT_MAX_STEPS, TRT_GUIDANCE)
    assert unet_batch_range(args.min_steps, args.max_steps, 1, args.cfg) == unet_batch_range(1, 4, 1, "full")
