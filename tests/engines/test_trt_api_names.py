"""Every TensorRT name the TensorRT backend uses exists in TensorRT 10.x and in 11.x.

TensorRT cannot be installed or run here, so the API is read from the published bindings wheels
(``tensorrt-cu12-bindings`` 10.16.1.11, ``tensorrt-cu13-bindings`` 11.4.0.106; ``trt_api_scan``), and the
names the code uses are read from the code (engines/trt_*.py; ``trt_api_uses``), so new code is checked too.
The first test that needs a wheel fetches both from PyPI into a cache folder (``fetch_trt_bindings.py``; fixed
versions and sha256), so the README's test command checks them on any machine that reaches PyPI; where they
cannot be had the wheel tests skip and say why. Nothing here imports TensorRT or needs a GPU.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fetch_trt_bindings  # noqa: E402
import trt_api_scan  # noqa: E402
import trt_api_uses  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted((ROOT / "engines").glob("trt_*.py"))
VERSIONS = {"10": "10.16.1.11", "11": "11.4.0.106"}
_APIS: dict[str, trt_api_scan.TrtApi] = {}
_FETCH_PROBLEMS: list[str] = []  # filled by the one download attempt of this session


def api(major: str) -> trt_api_scan.TrtApi:
    if major not in _APIS:
        path = fetch_trt_bindings.wheel_path(major)
        if path is None and not _FETCH_PROBLEMS:
            _FETCH_PROBLEMS.extend(fetch_trt_bindings.fetch(fetch_trt_bindings.wheel_dir()) or ["fetched"])
            path = fetch_trt_bindings.wheel_path(major)
        if path is None:
            req = fetch_trt_bindings.WHEELS[major][0]
            pytest.skip(f"the {req} wheel could not be had in {fetch_trt_bindings.wheel_dir()}: "
                        f"{'; '.join(_FETCH_PROBLEMS)} (`python tests/engines/fetch_trt_bindings.py` retries)")
        _APIS[major] = trt_api_scan.read_wheel(path)
    return _APIS[major]


def missing(a: trt_api_scan.TrtApi, chain: tuple[str, ...]) -> str | None:
    """The first part of ``chain`` that ``a`` lacks ('BuilderFlag.FP16'), or None when all exist."""
    scope = ""
    for i, name in enumerate(chain):
        nested = f"{scope}.{name}" if scope else name
        if name in a.scopes.get(scope, ()) or (scope and nested in a.scopes):
            scope = nested
            continue
        return ".".join(chain[:i + 1])
    return None


def check(source_uses: trt_api_uses.Uses, a: trt_api_scan.TrtApi, both: list[trt_api_scan.TrtApi]) -> list[str]:
    """Problems of the code against one TensorRT API (``both``: every API read, for probes and overrides)."""
    problems = []
    for u in source_uses.uses:
        if u.probe:  # may be absent here, but must exist somewhere, else it is a typo
            if all(missing(b, u.chain) for b in both):
                problems.append(f"{u}: in no TensorRT version read ({', '.join(b.version for b in both)})")
        elif (m := missing(a, u.chain)) is not None:
            problems.append(f"{u}: TensorRT {a.version} has no {m}")
    for o in source_uses.overrides:  # a method of our subclass that TensorRT calls must exist in its base
        if any(missing(b, o.chain) is None for b in both) and (m := missing(a, o.chain)) is not None:
            problems.append(f"{o}: overrides {m}, which TensorRT {a.version} does not have")
    return problems


@pytest.fixture(scope="module")
def code_uses() -> trt_api_uses.Uses:
    uses = trt_api_uses.collect(SOURCES, ROOT)
    assert len(uses.uses) > 50 and uses.overrides  # the scan found the backend's calls
    return uses


# ---- the scanner reads what the wheels say (guards against a scan that finds everything or nothing) ---

def test_scanner_reads_known_differences_between_10_and_11():
    t10, t11 = api("10"), api("11")
    assert (t10.version, t11.version) == (VERSIONS["10"], VERSIONS["11"])
    for a in (t10, t11):  # present in both
        for chain in [("Builder", "create_network"), ("NetworkDefinitionCreationFlag", "STRONGLY_TYPED"),
                      ("ICudaEngine", "device_memory_size_v2"), ("IExecutionContext", "execute_async_v3"),
                      ("ILogger", "Severity", "WARNING"), ("IProgressMonitor", "step_complete"),
                      ("BuilderFlag", "REFIT"), ("DataType", "BF16")]:
            assert missing(a, chain) is None, (a.version, chain)
    # removed in 11 (TensorRT's 10.x -> 11.x migration guide lists each of them)
    for chain in [("BuilderFlag", "FP16"), ("BuilderFlag", "BF16"), ("BuilderFlag", "INT8"), ("BuilderFlag", "FP8"),
                  ("BuilderFlag", "OBEY_PRECISION_CONSTRAINTS"), ("ICudaEngine", "device_memory_size"),
                  ("Builder", "platform_has_fast_fp16"), ("IBuilderConfig", "int8_calibrator")]:
        assert missing(t10, chain) is None and missing(t11, chain) == ".".join(chain), chain
    # a name of one class is not taken for a member of another
    assert missing(t10, ("IBuilderConfig", "execute_async_v3")) == "IBuilderConfig.execute_async_v3"
    assert missing(t10, ("DataType", "STRONGLY_TYPED")) == "DataType.STRONGLY_TYPED"


# ---- the code ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("major", ["10", "11"])
def test_every_tensorrt_name_the_code_uses_exists(code_uses, major):
    both = [api("10"), api("11")]
    problems = check(code_uses, api(major), both)
    assert not problems, "\n".join(problems)


def test_every_kept_tensorrt_result_has_a_known_type(code_uses):
    """A TensorRT call whose result the code keeps must say what it returns (trt_api_uses.RETURNS), so the
    names used on the result are checked as well."""
    assert not code_uses.undeclared, "\n".join(code_uses.undeclared)


WEAKLY_TYPED = '''
def build(trt, onnx_path):
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    config = builder.create_builder_config()
    if builder.platform_has_fast_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    return builder.build_serialized_network(network, config)

def workspace(trt, blob):
    engine = trt.Runtime(None).deserialize_cuda_engine(blob)
    return int(getattr(engine, "device_memory_size_v2", None) or engine.device_memory_size)
'''


def test_the_check_rejects_what_tensorrt_11_removed():
    """The pre-fix build code's pattern (precision flags, the V1 memory size) passes on 10, fails on 11."""
    uses = trt_api_uses.collect_source(WEAKLY_TYPED, "weak.py")
    both = [api("10"), api("11")]
    assert check(uses, both[0], both) == []
    problems = check(uses, both[1], both)
    assert len(problems) == 3, problems
    assert any("Builder.platform_has_fast_fp16" in p for p in problems)
    assert any("BuilderFlag.FP16" in p for p in problems)
    assert any("ICudaEngine.device_memory_size" in p for p in problems)
    typo = trt_api_uses.collect_source("def f(trt):\n    return hasattr(trt.BuilderFlag, 'FP61')\n", "typo.py")
    assert check(typo, both[0], both) == ["typo.py:2: trt.BuilderFlag.FP61 (probed): in no TensorRT version read "
                                          "(10.16.1.11, 11.4.0.106)"]


# ---- trt_caps on module stand-ins that have exactly the wheels' names ----------------------------------------

def stand_in(a: trt_api_scan.TrtApi) -> types.ModuleType:
    """A module with the names ``a`` lists (classes with their members; values are placeholders)."""
    mod = types.ModuleType("tensorrt")
    objs: dict[str, type] = {}
    for scope in sorted((s for s in a.scopes if s), key=lambda s: s.count(".")):
        obj = type(scope.rsplit(".", 1)[-1], (), {m: 1 for m in a.scopes[scope] if not m.startswith("__")})
        objs[scope] = obj
        parent, _, leaf = scope.rpartition(".")
        if parent in objs:
            setattr(objs[parent], leaf, obj)
    for name in a.scopes[""]:
        setattr(mod, name, objs.get(name, 1))
    mod.__version__ = a.version
    return mod


def test_caps_probe_what_10_and_11_support():
    from engines.trt_caps import Typing, probe

    c10, c11 = probe(stand_in(api("10"))), probe(stand_in(api("11")))
    assert c10.typing is Typing.FLAG and c11.typing is Typing.ALWAYS
    for c in (c10, c11):
        assert c.problem is None and c.user_memory and c.timing_cache and c.weight_streaming and c.refit
    flags = types.SimpleNamespace(NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=1))
    assert c10.network_flags(flags) == 2 and c11.network_flags(flags) == 0


def test_unsupported_tensorrt_is_refused_with_the_reason(monkeypatch):
    from engines.trt_caps import TensorRTUnavailable, import_tensorrt, installed_caps

    old = stand_in(api("10"))
    old.__version__ = "10.0.1.6"  # no V2 device-memory API yet
    del old.ICudaEngine.device_memory_size_v2
    monkeypatch.setitem(sys.modules, "tensorrt", old)
    with pytest.raises(TensorRTUnavailable, match=r"10\.0\.1\.6 is not supported; the trt backend needs 10\.x from "
                                                  r"10\.1, or 11\.x"):
        import_tensorrt()
    future = stand_in(api("11"))
    future.__version__ = "12.0.0"
    monkeypatch.setitem(sys.modules, "tensorrt", future)
    caps, why = installed_caps()
    assert caps is not None and "12.0.0 is not supported" in why


def test_doctor_reports_what_the_installed_tensorrt_supports(monkeypatch):
    from rtdiffusion.cli.doctor import collect, format_report

    monkeypatch.setitem(sys.modules, "tensorrt", stand_in(api("11")))
    r = collect()
    assert r["versions"]["tensorrt"] == VERSIONS["11"]
    assert r["tensorrt"]["typing"] == "strongly typed (always, no flag)" and r["tensorrt"]["supported"] is True
    assert r["tensorrt"]["weight_streaming"] and r["tensorrt"]["refit"] and r["tensorrt"]["timing_cache"]
    text = format_report(r)
    assert "TensorRT features" in text and "strongly typed (always, no flag)" in text
    assert json.loads(json.dumps(r))["tensorrt"] == r["tensorrt"]  # --json
    monkeypatch.setitem(sys.modules, "tensorrt", stand_in(api("10")))
    assert "STRONGLY_TYPED network flag" in format_report(collect())
