"""The TensorRT backend is handed the engine's ControlNets (issue 14).

TensorRT cannot run here, so this checks the wiring up to the TensorRT build: ``backends.trt_networks`` gets
the ControlNet modules that ``control.make_control`` loaded, turns them into the UNet's residual inputs
(``SpecParams``) and passes the same modules, in index order, to ``load_or_build_trt``. The build itself is
replaced by a recorder (the thing under test is what reaches it, not TensorRT).
"""

from __future__ import annotations

import torch

from rtdiffusion import backends
from rtdiffusion.config import EngineConfig, VaeKind
from rtdiffusion.control import make_control
from rtdiffusion.models.loading import load_components

CPU = torch.device("cpu")


def test_trt_networks_get_the_controlnets_as_residual_inputs_and_engines(monkeypatch, tmp_path):
    comps = load_components("random:tiny", CPU, torch.float32, VaeKind.TINY)
    config = EngineConfig("random:tiny", 64, 64, CPU, torch.float32, engine_dir=str(tmp_path))
    stack = make_control([{"model": "random:controlnet-tiny", "preprocessor": "tile"},
                          {"model": "random:controlnet-tiny", "preprocessor": "external"}], comps, config)
    seen = {}

    def recorder(unet, vae, params, cache, **kw):
        seen.update(params=params, **kw)
        return "trt networks"

    import engines.trt_runtime as trt_runtime

    monkeypatch.setattr(trt_runtime, "load_or_build_trt", recorder)
    assert backends.trt_networks(config, comps, controlnets=stack.modules) == "trt networks"
    assert seen["controlnets"] == stack.modules and len(stack.modules) == 2
    assert seen["controlnets"][0] is not seen["controlnets"][1]  # two loaded modules, in index order
    params = seen["params"]
    names = [n for n, _ in params.residuals]
    assert params.controlnets == 2 and names[0] == "down_res_0" and names[-1] == "mid_res", params
    # without ControlNets the UNet spec has no residual inputs and no controlnet_<i> engines
    backends.trt_networks(config, comps)
    assert seen["controlnets"] == () and seen["params"].controlnets == 0 and seen["params"].residuals == ()
