"""ONNX export of the networks (UNet, VAE encoder and decoder, ControlNets) from their specs, parity against
torch with ONNX Runtime, and caching.

Export reads everything from the ``NetworkSpec``: input/output names, dynamic axes, sample inputs, opset; the
module is wrapped to take the spec's inputs in order by ``onnx_adapters.export_adapter``.
The TorchScript exporter (``dynamo=False``) is tried first: it is the one TensorRT's demo and most tools use
and it exports the diffusers UNet in seconds; if it fails, the torch.export-based exporter is used with
dynamic shapes taken from the same spec (the log says which one ran and why).

Large models: a protobuf cannot exceed 2 GB (the fp32 SD UNet is 3.4 GB). After export, a model whose
weights total at most ``_INLINE_LIMIT`` (1 GiB) is saved as one self-contained ``<name>.onnx``; above that,
the weights (every tensor of 1 KiB or more) move into one side file ``<name>.onnx.data`` next to
``<name>.onnx``, so such a cache entry is two files; TensorRT's parser and ONNX Runtime both read it from
the same folder.

Sizes run here: the tiny test models (CPU, fp32, seconds). Not run here: the 866 M-parameter SD UNet
(needs about 10 GB host memory for fp32 export and 2-3 minutes), fp16 export on a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .cache import CacheEntry, CacheKey, EngineCache
from .onnx_adapters import export_adapter
from .specs import NetworkSpec, torch_dtype
from .versions import package_version

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
ONNX_DATA = "model.onnx.data"
_INLINE_LIMIT = 1 << 30  # above this many bytes of weights, store them in the side file


# ---- export ------------------------------------------------------------------------------------------

def export_onnx(module: torch.nn.Module, spec: NetworkSpec, path: str | os.PathLike, *,
                exporter: str = "auto") -> str:
    """Export ``module`` (adapted to ``spec``) to ``path``; returns the exporter used ("torchscript"/"dynamo").

    Sample inputs are made on the module's device in the spec's dtypes at profile 0's opt sizes.
    ``exporter``: "auto" (TorchScript, then dynamo on failure), "torchscript" or "dynamo".
    """
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise ValueError(f"exporter must be 'auto', 'torchscript' or 'dynamo'; got {exporter!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    adapter = export_adapter(spec, module).eval()
    device = next(adapter.parameters()).device
    args = spec.sample_inputs(device)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as scratch:
        raw = Path(scratch) / ONNX_FILE
        used = None
        if exporter in ("auto", "torchscript"):
            try:
                _export_torchscript(adapter, spec, args, raw)
                used = "torchscript"
            except Exception as exc:  # noqa: BLE001 - any exporter failure: try the other one, say so
                if exporter == "torchscript":
                    raise
                log.warning("TorchScript ONNX export of %s failed (%s: %s); trying the dynamo exporter",
                            spec.name, type(exc).__name__, exc)
                shutil.rmtree(scratch, ignore_errors=True)
                Path(scratch).mkdir(exist_ok=True)
        if used is None:
            _export_dynamo(adapter, spec, args, raw)
            used = "dynamo"
        _finalize(raw, path)
    log.info("exported %s to %s with the %s exporter", spec.name, path, used)
    return used


def _addcmul(g, self, tensor1, tensor2, value):
    """aten::addcmul in ``self``'s type. TorchScript's own symbolic multiplies by an fp32 [1] constant, which
    turns an fp16 graph fp32 from there on (the IP-Adapter processor's ``out.addcmul_(ip_out, scale)``)."""
    prod = g.op("Mul", tensor1, tensor2)
    node = value.node()
    if node.kind() != "onnx::Constant" or float(node.t("value")) != 1.0:  # value: a graph constant
        prod = g.op("Mul", prod, g.op("CastLike", value, self))
    return g.op("Add", self, prod)


@contextlib.contextmanager
def _typed_symbolics(opset: int):
    """Symbolics that keep the module's dtype, registered for the duration of one export."""
    torch.onnx.register_custom_op_symbolic("aten::addcmul", _addcmul, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::addcmul", opset)


def _export_torchscript(adapter: torch.nn.Module, spec: NetworkSpec, args: tuple, out: Path) -> None:
    with torch.no_grad(), warnings.catch_warnings(), _typed_symbolics(spec.opset):
        warnings.simplefilter("ignore")  # TracerWarnings about shape asserts in diffusers; deprecation note
        torch.onnx.export(adapter, args, str(out), dynamo=False, opset_version=spec.opset,
                          input_names=spec.input_names, output_names=spec.output_names,
                          dynamic_axes=spec.dynamic_axes(), do_constant_folding=True)


def _export_dynamo(adapter: torch.nn.Module, spec: NetworkSpec, args: tuple, out: Path) -> None:
    dims: dict[str, Any] = {}
    ranges = spec.max_sizes()
    for axis, hi in ranges.items():
        lo = min(r.min for p in spec.profiles for a, r in p if a == axis)
        dims[axis] = torch.export.Dim(axis, min=max(lo, 1), max=max(hi, 2))
    dynamic_shapes = tuple({i: dims[d] for i, d in enumerate(b.dims) if isinstance(d, str)} or None
                           for b in spec.inputs)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The dynamo exporter emits opset-18 ops (Split with num_outputs) even when asked for 17.
        program = torch.onnx.export(adapter, args, dynamo=True, opset_version=max(spec.opset, 18),
                                    input_names=spec.input_names, output_names=spec.output_names,
                                    dynamic_shapes=dynamic_shapes, external_data=True)
        program.save(str(out), external_data=True)


def _finalize(raw: Path, dest: Path) -> None:
    """Move an export into place: weights inline if small, else in one side file ``<dest>.data``."""
    import onnx

    files = [f for f in raw.parent.iterdir() if f.is_file()]
    model = onnx.load(str(raw), load_external_data=True)
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    for f in (dest, dest.with_name(dest.name + ".data")):
        if f.exists():
            f.unlink()
    if weight_bytes > _INLINE_LIMIT:
        onnx.save_model(model, str(dest), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=dest.name + ".data", size_threshold=1024)
    elif len(files) == 1:
        os.replace(raw, dest)
    else:
        onnx.save_model(model, str(dest))
    onnx.checker.check_model(str(dest))


# ---- parity ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParityReport:
    """Max abs difference between torch and ONNX Runtime per output and batch size tried."""

    network: str
    max_abs_diff: Mapping[str, float]  # "eps@B=2" -> difference
    atol: float
    provider: str
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def worst(self) -> float:
        return max(self.max_abs_diff.values())

    @property
    def ok(self) -> bool:
        return self.worst <= self.atol

    def __str__(self) -> str:
        parts = ", ".join(f"{k}: {v:.3g}" for k, v in self.max_abs_diff.items())
        return f"{self.network} ONNX parity ({self.provider}): max abs diff {parts}; tolerance {self.atol:g}"


def default_atol(spec: NetworkSpec) -> float:
    dt = torch_dtype(spec.outputs[0].dtype)
    return 1e-3 if dt == torch.float32 else 5e-2


def verify_onnx(module: torch.nn.Module, spec: NetworkSpec, onnx_path: str | os.PathLike, *,
                atol: float | None = None, sizes: Sequence[Mapping[str, int]] | None = None,
                providers: Sequence[str] = ("CPUExecutionProvider",)) -> ParityReport:
    """Run torch and ONNX Runtime on the same random inputs at each size in ``sizes`` (default: every
    profile's min and max, so the dynamic axes are exercised) and report the max abs differences."""
    import onnxruntime as ort

    adapter = export_adapter(spec, module).eval()
    device = next(adapter.parameters()).device
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=list(providers))
    if sizes is None:
        sizes = [spec.sizes(w, i) for i in range(len(spec.profiles)) for w in ("min", "max")]
        sizes = [dict(s) for s in {tuple(sorted(s.items())) for s in sizes}]
    diffs: dict[str, float] = {}
    for n, sz in enumerate(sizes):
        args = spec.sample_inputs(device, sz, seed=n)
        with torch.no_grad():
            ref = adapter(*args)
        ref = ref if isinstance(ref, (tuple, list)) else (ref,)
        feeds = {b.name: a.detach().cpu().numpy() for b, a in zip(spec.inputs, args)}
        got = sess.run(spec.output_names, feeds)
        tag = ",".join(f"{k}={v}" for k, v in sorted(sz.items()))
        for b, r, g in zip(spec.outputs, ref, got):
            if tuple(g.shape) != tuple(r.shape):
                raise AssertionError(f"{spec.name}: ONNX output {b.name} has shape {g.shape}, torch {tuple(r.shape)}")
            diffs[f"{b.name}@{tag}"] = float((torch.from_numpy(g).float() - r.float().cpu()).abs().max())
    report = ParityReport(spec.name, diffs, default_atol(spec) if atol is None else atol, providers[0])
    log.info("%s", report)
    return report


# ---- cached export -----------------------------------------------------------------------------------

def onnx_cache_key(spec: NetworkSpec, *, model: str, weights: str,
                   lora: Sequence[tuple[str, str, float]] = ()) -> CacheKey:
    """Key of an ONNX export: device-independent, depends on torch (the exporter) and the opset."""
    return CacheKey(model=model, weights=weights, lora=tuple(lora), network=spec.name,
                    shapes=spec.cache_fields(), dtype=spec.outputs[0].dtype, backend="onnx",
                    backend_version=f"torch {torch.__version__}; onnx {package_version('onnx')}",
                    gpu="any", options={"opset": spec.opset})


def export_to_cache(module: torch.nn.Module, spec: NetworkSpec, cache: EngineCache, *, model: str,
                    weights: str, lora: Sequence[tuple[str, str, float]] = (), verify: bool = True) -> CacheEntry:
    """The cached ONNX export of ``module`` for ``spec`` (exported now if missing or corrupt).

    With ``verify`` and a module on the CPU, the export is checked against torch with ONNX Runtime before
    it is published (a failed check raises and publishes nothing); the report goes into the manifest.
    """
    key = onnx_cache_key(spec, model=model, weights=weights, lora=lora)

    def build(folder: Path) -> dict[str, Any]:
        used = export_onnx(module, spec, folder / ONNX_FILE)
        extra: dict[str, Any] = {"exporter": used, "onnx_file": ONNX_FILE}
        device = next(module.parameters()).device
        if verify and device.type == "cpu" and package_version("onnxruntime"):
            report = verify_onnx(module, spec, folder / ONNX_FILE)
            if not report.ok:
                raise RuntimeError(f"ONNX export does not match torch: {report}")
            extra["parity"] = {"max_abs_diff": dict(report.max_abs_diff), "atol": report.atol}
        return extra

    return cache.get_or_build(key, build, versions={"torch": torch.__version__, "onnx": package_version("onnx")})


def network_modules(unet: torch.nn.Module, vae: torch.nn.Module, unet_export: torch.nn.Module | None = None,
                    controlnets: Sequence[torch.nn.Module] = ()) -> dict[str, torch.nn.Module]:
    """The module each network is exported from (``unet_export``: a spec-ordered UNet, e.g. with KV banks;
    ``controlnets``: one per ``controlnet_<i>`` spec)."""
    return {"unet": unet_export if unet_export is not None else unet, "vae_encoder": vae, "vae_decoder": vae,
            **{f"controlnet_{i}": cn for i, cn in enumerate(controlnets)}}


def export_all_to_cache(unet: torch.nn.Module, vae: torch.nn.Module, specs: Mapping[str, NetworkSpec],
                        cache: EngineCache, *, model: str, lora: Sequence[tuple[str, str, float]] = (),
                        weights: Mapping[str, str] | None = None, unet_export: torch.nn.Module | None = None,
                        controlnets: Sequence[torch.nn.Module] = (), verify: bool = True) -> dict[str, CacheEntry]:
    """ONNX cache entries for every spec in ``specs`` (exported where missing).

    ``weights``: precomputed fingerprints {"unet": ..., "vae": ..., "controlnet_0": ...}; computed here when
    not given. Each ControlNet is keyed by its own weights (two engines with the same ControlNet share one).
    """
    from .versions import weights_fingerprint

    modules = network_modules(unet, vae, unet_export, controlnets)
    missing = [n for n in specs if n not in modules]
    if missing:
        raise ValueError(f"no module to export {missing} from: pass one ControlNet per controlnet_<i> spec")
    weights = dict(weights or {})
    weights.setdefault("unet", weights_fingerprint(unet))
    weights.setdefault("vae", weights_fingerprint(vae))
    for i, cn in enumerate(controlnets):
        weights.setdefault(f"controlnet_{i}", weights_fingerprint(cn))
    out = {}
    for name, spec in specs.items():
        wid = weights[name] if name.startswith("controlnet_") else weights["unet" if name == "unet" else "vae"]
        out[name] = export_to_cache(modules[name], spec, cache, model=model, weights=wid,
                                    lora=lora if name == "unet" else (), verify=verify)  # LoRA: UNet only
    return out
