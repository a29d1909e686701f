"""Start-up path (issue 17 part 3): what a start imports, and the seeded random weights of random: models.

One subprocess (a fresh interpreter, as a restart is) checks that importing the package and building the CLI
parser pull in no optional library, that version probes import nothing, and builds random:tiny; its weights
must equal this process's bit for bit (seeded, the same in every process) and must not be zeros. The
weights' statistics are held against the libraries' own initialisers, tensor by tensor.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from engines.versions import weights_fingerprint
from rtdiffusion.models.families import RANDOM_ARCHS
from rtdiffusion.models.loading import _strip, _text_model, load_components, read_config
from rtdiffusion.models.random_init import seeded_build

OPTIONAL = ("onnx", "onnxruntime", "tensorrt", "av", "fastapi", "uvicorn", "diffusers", "transformers", "triton")

CHILD = r"""
import json, sys
import rtdiffusion
from rtdiffusion import StreamEngine, MultiStreamEngine
from rtdiffusion.cli import build_parser
build_parser()
from engines.versions import library_versions, package_version
versions = library_versions()
light = sorted(m for m in %(optional)r if m in sys.modules)
import torch
from engines.versions import weights_fingerprint
from rtdiffusion.models.loading import load_components
comps = load_components("random:tiny", torch.device("cpu"), torch.float32, seed=7)
print(json.dumps({"imported": light, "onnx": versions["onnx"],
                  "weights": {n: weights_fingerprint(getattr(comps, n), full=True)
                              for n in ("unet", "vae", "text_encoder")}}))
"""


def test_a_fresh_process_imports_no_optional_library_and_builds_the_same_random_weights():
    out = subprocess.run([sys.executable, "-c", CHILD % {"optional": OPTIONAL}], capture_output=True, text=True,
                         timeout=300, check=True)
    child = json.loads(out.stdout.strip().splitlines()[-1])
    # import rtdiffusion, StreamEngine, the CLI parser and the version probes: none of the optional libraries
    assert child["imported"] == []
    pytest.importorskip("onnx")  # installed with the [onnx] extra: its version read without importing it
    assert child["onnx"] == __import__("onnx").__version__
    comps = load_components("random:tiny", torch.device("cpu"), torch.float32, seed=7)
    for name, fingerprint in child["weights"].items():
        module = getattr(comps, name)
        assert weights_fingerprint(module, full=True) == fingerprint, f"{name}: other values in another process"
        for pname, p in module.named_parameters():
            if p.dim() >= 2:  # every weight matrix and kernel is drawn (norm biases start at zero)
                assert float((p != 0).float().mean()) > 0.999, f"{name}.{pname} is (mostly) zeros"
    other = load_components("random:tiny", torch.device("cpu"), torch.float32, seed=8)
    assert weights_fingerprint(other.unet, full=True) != child["weights"]["unet"]  # the seed matters


@pytest.mark.parametrize("arch", ["tiny", "tiny-sdxl"])
def test_random_weights_follow_the_default_initialisers(arch):
    """Each tensor's mean and spread match what the library's own initialiser gives (torch's defaults,
    transformers' CLIP init); constants (norm weights, zero biases) are equal."""
    from diffusers import AutoencoderTiny, UNet2DConditionModel

    spec = RANDOM_ARCHS[arch]
    builders = {"unet": lambda: UNet2DConditionModel.from_config(_strip(read_config(spec.unet))),
                "taesd": lambda: AutoencoderTiny.from_config(_strip(read_config(spec.taesd)))}
    for i, name in enumerate(spec.text_encoders):
        builders[f"text{i}"] = lambda name=name, i=i: _text_model(read_config(name), i)
    checked = 0
    for label, build in builders.items():
        with torch.random.fork_rng():
            torch.manual_seed(11)
            ref = dict(build().state_dict())
        with seeded_build(3, torch.device("cpu"), label):
            new = build().state_dict()
        assert list(new) == list(ref)
        for key, v in new.items():
            r = ref[key]
            if not r.is_floating_point() or r.numel() < 2 or float(r.std()) == 0:
                assert torch.equal(v, r), f"{label}.{key}: a constant or an integer buffer changed"
                continue
            if r.numel() < 2048:
                continue  # too few values for a statistical check
            tol = 6 / math.sqrt(r.numel())  # about 4 standard errors of either statistic
            assert abs(float(v.std() / r.std()) - 1) < tol, f"{label}.{key}: spread differs"
            assert abs(float(v.mean() - r.mean())) < tol * float(r.std()), f"{label}.{key}: mean differs"
            assert float(v.abs().max()) <= 1.5 * float(r.abs().max()), f"{label}.{key}: range differs"
            checked += 1
    assert checked > 20


class _Probe(torch.nn.Module):
    """Initialisers that read, overwrite, partly write and share what an earlier one drew."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 40, padding_idx=0)  # normal_, then row 0 zeroed (a partial write)
        self.lin = torch.nn.Linear(40, 30)
        self.register_buffer("lin_sum", self.lin.weight.detach().sum().reshape(1))  # reads the drawn values
        torch.nn.init.normal_(self.lin.weight, 0.0, 0.02)  # drawn twice: the last distribution counts
        self.tied = torch.nn.Linear(40, 50, bias=False)
        self.tied.weight = self.emb.weight
        self.one = torch.nn.Parameter(torch.empty(8).uniform_(-1, 1))
        torch.nn.init.ones_(self.one)  # a whole-tensor fill replaces a pending draw


def test_fast_init_keeps_what_every_initialiser_step_sees(monkeypatch):
    from rtdiffusion.models import random_init

    monkeypatch.setattr(random_init, "SMALL", 0)  # catch every fill, however small (as a large model's)
    with seeded_build(5, torch.device("cpu"), "probe"):
        torch.manual_seed(0)  # the global generator must not matter inside
        a = _Probe()
    with seeded_build(5, torch.device("cpu"), "probe"):
        torch.manual_seed(1)
        b = _Probe()
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert torch.all(a.emb.weight[0] == 0) and a.emb.weight[1:].abs().min() > 0
    assert 0.8 < float(a.emb.weight[1:].std()) < 1.2  # Embedding: N(0, 1)
    assert float(a.lin.weight.std()) == pytest.approx(0.02, rel=0.15)  # not the uniform's 0.091
    bias_bound = 1 / math.sqrt(40)
    assert 0 < float(a.lin.bias.abs().max()) <= bias_bound
    assert a.tied.weight is a.emb.weight
    assert torch.equal(a.one, torch.ones(8))
    assert a.lin_sum.abs() > 0  # what the buffer read was drawn before it was read
    with seeded_build(6, torch.device("cpu"), "probe"):
        c = _Probe()
    assert not torch.equal(a.lin.weight, c.lin.weight)


def test_fast_init_leaves_the_callers_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    with seeded_build(0, torch.device("cpu"), "x"):
        torch.nn.Linear(8, 8)
    assert torch.equal(torch.rand(4), expected)


def _cache_key():
    from engines.cache import CacheKey

    return CacheKey(model="m", weights="s32:w", lora=(), network="unet", shapes={"x": [1, 2]}, dtype="float16",
                    backend="aoti", backend_version="torch x", gpu="cpu")


def test_a_cached_artifact_is_hashed_once_per_version_of_the_file(tmp_path, monkeypatch):
    """Verify.SHA256 remembers an artifact it hashed (cache_stamps.py): a restart does not read it again,
    a changed file is hashed again and caught, and a file written just now is never remembered."""
    from engines import cache as cache_mod
    from engines import cache_stamps
    from engines.cache import CacheCorrupt, EngineCache

    hashed: list[str] = []
    real = cache_mod.sha256_file
    monkeypatch.setattr(cache_mod, "sha256_file", lambda p, *a: hashed.append(p.name) or real(p, *a))
    monkeypatch.setattr(cache_stamps, "SETTLED_S", 3600.0)  # "just written" for sure, however slow this machine
    cache = EngineCache(tmp_path)
    entry = cache.get_or_build(_cache_key(), lambda d: (d / "model.pt2").write_bytes(b"x" * 5000) and None)
    hashed.clear()
    assert cache.lookup(_cache_key()) is not None and hashed == ["model.pt2"]
    assert cache.lookup(_cache_key()) is not None and hashed == ["model.pt2"] * 2  # just written: not settled
    assert not (tmp_path / cache_stamps.FILE).exists()
    monkeypatch.setattr(cache_stamps, "SETTLED_S", -3600.0)  # as if the file were an hour old
    assert cache.lookup(_cache_key()) is not None and len(hashed) == 3
    assert EngineCache(tmp_path).lookup(_cache_key()) is not None and len(hashed) == 3  # remembered
    art = entry.path / "model.pt2"
    art.write_bytes(b"y" * 5000)  # same size, other bytes
    stat = art.stat()
    os.utime(art, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a distinct time even on a coarse clock
    with pytest.raises(CacheCorrupt, match="does not match its sha256"):
        EngineCache(tmp_path).lookup(_cache_key())
    (tmp_path / cache_stamps.FILE).write_text("{not json")  # unreadable: ignored, hashed again
    art.write_bytes(b"x" * 5000)
    assert EngineCache(tmp_path).lookup(_cache_key()) is not None and len(hashed) == 5
