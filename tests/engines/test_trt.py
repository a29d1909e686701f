"""TensorRT build and runtime.

Two parts:
- ``test_real_*``: real engines from the tiny models; need tensorrt (10.1+ or 11) and a CUDA device (skipped
  here).
- ``test_runtime_*``: the runtime's binding logic (bind once, same outputs, shapes only on change, shared
  workspace, errors naming the file) against a stand-in ``tensorrt`` module, on the CPU. They check our
  bookkeeping, not TensorRT.
"""

from __future__ import annotations

import enum
import importlib.util
import json
import sys
import types
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from engines.specs import AxisRange, SpecParams, make_specs, unet_batch_range, torch_dtype

CONFIGS = Path(__file__).resolve().parents[2] / "rtdiffusion" / "models" / "configs"
HAVE_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def _cfg(name):
    return {k: v for k, v in json.loads((CONFIGS / name).read_text()).items() if not k.startswith("_")}


# ---- real TensorRT (GPU) --------------------------------------------------------------------------------

@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TRT, reason="needs the tensorrt package (10.1+ or 11.x) and a CUDA device")
def test_real_engines_match_torch_and_bind_once(tmp_path):
    from diffusers import AutoencoderTiny, UNet2DConditionModel

    from engines.base import TorchNetworks
    from engines.cache import EngineCache
    from engines.trt_build import TrtBuildOptions
    from engines.trt_runtime import load_or_build_trt

    torch.manual_seed(0)
    dev = torch.device("cuda")
    unet = UNet2DConditionModel.from_config(_cfg("tiny_unet_sd2style.json")).to(dev, torch.float16).eval()
    vae = AutoencoderTiny.from_config(_cfg("tiny_taesd_test.json")).to(dev, torch.float16).eval()
    params = SpecParams.from_modules(unet, vae, 64, 64, batch=unet_batch_range(1, 4), dtype=torch.float16)
    cache = EngineCache(tmp_path)
    nets = load_or_build_trt(unet, vae, params, cache, model="tiny", options=TrtBuildOptions(optimization_level=0),
                             capture_graphs=True)
    ref = TorchNetworks(unet, vae)
    specs = make_specs(params)
    for b in (1, 3, 4):
        x = [t.to(dev) for t in specs["unet"].sample_inputs("cpu", {"B": b})]
        out = nets.unet(*x)
        for _ in range(3):  # warm, capture, replay: the same tensor every time
            assert nets.unet(*x) is out
        torch.cuda.synchronize()
        assert (out.float() - ref.unet(*x).float()).abs().max() < 5e-2
    img = specs["vae_encoder"].sample_inputs(dev)[0]
    lat = nets.encode(img)
    before = torch.cuda.memory_allocated()
    for _ in range(5):
        nets.decode(nets.encode(img))
    assert torch.cuda.memory_allocated() == before  # no per-call allocation
    torch.cuda.synchronize()
    assert (lat.float() - ref.encode(img).float()).abs().max() < 5e-2
    # a second load is a cache hit: nothing rebuilt
    entries = len(cache.entries())
    load_or_build_trt(unet, vae, params, cache, model="tiny", options=TrtBuildOptions(optimization_level=0))
    assert len(cache.entries()) == entries


# ---- runtime bookkeeping against a stand-in tensorrt ---------------------------------------------------

class _Mode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class _DT(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    BF16 = 7
    INT64 = 8


_TORCH_TO_DT = {torch.float32: _DT.FLOAT, torch.float16: _DT.HALF}


class _Context:
    def __init__(self, engine):
        self.engine = engine
        self.addresses, self.shapes, self.calls, self.profile = {}, [], 0, 0
        self.device_memory = None
        self.fail = False

    def set_tensor_address(self, name, ptr):
        self.addresses.setdefault(name, []).append(ptr)
        return True

    def set_input_shape(self, name, shape):
        self.shapes.append((name, tuple(shape)))
        return True

    def set_optimization_profile_async(self, i, stream):
        self.profile = i
        return True

    def set_device_memory(self, ptr, size):
        self.device_memory = (ptr, size)

    def execute_async_v3(self, stream):
        self.calls += 1
        return not self.fail


class _Engine:
    device_memory_size_v2 = 0  # class attributes, as pybind11 properties are (trt_caps probes the class)

    def __init__(self, spec, memory):
        self.spec, self.device_memory_size_v2 = spec, memory
        self.num_io_tensors = len(spec.bindings)
        self.num_optimization_profiles = len(spec.profiles)
        self.contexts = []

    def get_tensor_name(self, i):
        return self.spec.bindings[i].name

    def get_tensor_mode(self, name):
        return _Mode.INPUT if name in self.spec.input_names else _Mode.OUTPUT

    def get_tensor_dtype(self, name):
        return _TORCH_TO_DT[torch_dtype(self.spec.binding(name).dtype)]

    def create_execution_context(self, strategy=None):
        self.contexts.append(_Context(self))
        return self.contexts[-1]


def _fake_trt(registry):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.7.0"
    trt.TensorIOMode = _Mode
    trt.DataType = _DT
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(USER_MANAGED="user", STATIC="static")
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.ICudaEngine, trt.IExecutionContext = _Engine, _Context

    class ILogger:
        Severity = enum.Enum("Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE")

        def __init__(self):
            pass

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, blob):
            if blob not in registry:
                self.logger.log(ILogger.Severity.ERROR, "magic tag mismatch")
                return None
            return registry[blob]

    trt.ILogger, trt.Runtime = ILogger, Runtime
    return trt


@pytest.fixture()
def fake(monkeypatch, tmp_path):
    import engines.trt_build as tb

    registry: dict[bytes, _Engine] = {}
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_trt(registry))
    monkeypatch.setattr(tb, "_LOGGER", None)
    stream = types.SimpleNamespace(cuda_stream=1234)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "device", lambda d: nullcontext())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    params = SpecParams(width=32, height=32, vae_scale=2, batch=unet_batch_range(1, 4), frames=AxisRange(1, 1, 2),
                        text_len=8, embed_dim=32, dtype="float32")
    specs = make_specs(params)
    files = {}
    for i, (name, spec) in enumerate(specs.items()):
        blob = f"plan-{name}".encode()
        registry[blob] = _Engine(spec, memory=1000 * (i + 1))
        files[name] = tmp_path / f"{name}.plan"
        files[name].write_bytes(blob)
    return types.SimpleNamespace(specs=specs, files=files, registry=registry, tmp=tmp_path)


def _load(fake):
    from engines.trt_runtime import SharedWorkspace, TrtEngine, TrtNetworks

    engines = {n: TrtEngine(fake.files[n], fake.specs[n], torch.device("cpu")) for n in fake.specs}
    ws = SharedWorkspace(torch.device("cpu"))
    ws.attach(list(engines.values()))
    return TrtNetworks(engines, ws), engines


def test_runtime_binds_once_and_returns_the_same_outputs(fake):
    nets, engines = _load(fake)
    ctx = engines["unet"].context
    x = fake.specs["unet"].sample_inputs("cpu", {"B": 4})
    out = nets.unet(*x)
    assert out.shape == (4, 4, 16, 16)
    for _ in range(5):
        assert nets.unet(*x) is out
    assert ctx.calls == 6
    assert {k: len(v) for k, v in ctx.addresses.items()} == {"eps": 1, "sample": 1, "timestep": 1, "embeds": 1}
    assert len(ctx.shapes) == 3  # set once, for B=4
    # a smaller stream batch: new shapes, a view of the same storage, still no rebinding of outputs
    y = fake.specs["unet"].sample_inputs("cpu", {"B": 2})
    out2 = nets.unet(*y)
    assert out2.shape[0] == 2 and out2.data_ptr() == out.data_ptr()
    assert len(ctx.addresses["eps"]) == 1 and len(ctx.addresses["sample"]) == 2
    assert nets.unet(*y) is out2


def test_runtime_shares_one_workspace(fake):
    nets, engines = _load(fake)
    mems = {e.context.device_memory for e in engines.values()}
    assert len(mems) == 1 and next(iter(mems))[1] == 3000  # the largest engine's need, one buffer


def test_runtime_rejects_out_of_profile_and_wrong_dtype(fake):
    nets, _ = _load(fake)
    with pytest.raises(ValueError, match="outside every built profile"):
        nets.unet(*fake.specs["unet"].sample_inputs("cpu", {"B": 5}))
    s, t, e = fake.specs["unet"].sample_inputs("cpu", {"B": 1})
    with pytest.raises(ValueError, match="timestep must be a contiguous float32"):
        nets.unet(s, t.double(), e)


def test_runtime_errors_name_the_engine_file(fake):
    from engines.trt_runtime import TrtEngine, TrtEngineError

    nets, engines = _load(fake)
    engines["vae_decoder"].context.fail = True
    with pytest.raises(TrtEngineError, match="vae_decoder.plan"):
        nets.decode(fake.specs["vae_decoder"].sample_inputs("cpu")[0])
    bad = fake.tmp / "bad.plan"
    bad.write_bytes(b"garbage")
    with pytest.raises(TrtEngineError, match=r"bad\.plan.*magic tag mismatch"):
        TrtEngine(bad, fake.specs["unet"], torch.device("cpu"))
    with pytest.raises(TrtEngineError, match="tensors"):  # an engine for another spec
        TrtEngine(fake.files["vae_encoder"], fake.specs["unet"], torch.device("cpu"))


def test_runtime_errors_never_quote_an_older_error(fake):
    # the logger is process-wide: a failure must quote only what TensorRT said during that call
    from engines.trt_runtime import TrtEngine, TrtEngineError

    nets, engines = _load(fake)
    bad = fake.tmp / "bad.plan"
    bad.write_bytes(b"garbage")
    with pytest.raises(TrtEngineError, match="magic tag mismatch"):
        TrtEngine(bad, fake.specs["unet"], torch.device("cpu"))
    engines["vae_decoder"].context.fail = True  # fails without logging anything
    with pytest.raises(TrtEngineError, match="vae_decoder.plan failed: unknown error") as info:
        nets.decode(fake.specs["vae_decoder"].sample_inputs("cpu")[0])
    assert "magic tag mismatch" not in str(info.value)
    engines["vae_decoder"].context.fail = False
    with pytest.raises(TrtEngineError, match="magic tag mismatch"):  # a fresh error is still quoted
        TrtEngine(bad, fake.specs["unet"], torch.device("cpu"))
    fake.registry[b"plan-unet"].create_execution_context = lambda strategy=None: None
    with pytest.raises(TrtEngineError, match="execution context: unknown error") as info:
        TrtEngine(fake.files["unet"], fake.specs["unet"], torch.device("cpu"))
    assert "magic tag mismatch" not in str(info.value)


def test_modules_must_be_in_the_engine_dtype(tmp_path):
    """Strongly typed engines take their precision from the export: fp32 modules cannot make fp16 engines.
    Checked before TensorRT is needed (there is none here)."""
    from diffusers import AutoencoderTiny, UNet2DConditionModel

    from engines.cache import EngineCache
    from engines.trt_runtime import check_module_dtypes, ensure_trt_engines

    unet = UNet2DConditionModel.from_config(_cfg("tiny_unet_sd2style.json")).eval()
    vae = AutoencoderTiny.from_config(_cfg("tiny_taesd_test.json")).eval()
    params = SpecParams.from_modules(unet, vae, 32, 32, batch=unet_batch_range(1, 2), dtype=torch.float16)
    with pytest.raises(ValueError, match="the unet must be in the engine dtype float16 to be exported; it is "
                                         "float32"):
        ensure_trt_engines(unet, vae, params, EngineCache(tmp_path), model="tiny")
    check_module_dtypes(params, unet=unet.half(), vae=vae.half())  # both fp16: fine
    with pytest.raises(ValueError, match="the vae must be in the engine dtype float16.*it is float32"):
        check_module_dtypes(params, unet=unet, vae=vae.float())
    assert not list(tmp_path.iterdir())  # nothing exported or built


def _installed(monkeypatch, trt) -> None:
    """Make ``trt`` the installed tensorrt module for find_spec and import alike."""
    import importlib.machinery

    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)


def test_backend_choice_asks_trt_caps_whether_the_installed_tensorrt_is_supported(monkeypatch):
    from rtdiffusion.backends import choose_backend
    from rtdiffusion.config import Backend
    from rtdiffusion.errors import ConfigError

    def config(backend):  # choose_backend reads these three fields only; no CUDA device is touched
        return types.SimpleNamespace(backend=backend, device=torch.device("cuda"), max_vram_gb=None)

    _installed(monkeypatch, _fake_trt({}))  # a supported 10.x with user-managed memory
    assert choose_backend(config(Backend.AUTO))[0] is Backend.TRT
    old = types.ModuleType("tensorrt")
    old.__version__ = "9.2.0"
    _installed(monkeypatch, old)
    backend, why = choose_backend(config(Backend.AUTO))
    assert backend is not Backend.TRT and "TensorRT 9.2.0 is not supported" in why
    with pytest.raises(ConfigError, match=r"needs TensorRT 10.1\+ or 11.x: TensorRT 9.2.0 is not supported"):
        choose_backend(config(Backend.TRT))
