"""Engine cache: keys are data, writes are atomic, corruption is detected and rebuilt, concurrent builders
(two real processes) build once."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from engines.cache import CacheCorrupt, CacheKey, EngineCache, Verify, write_atomic
from engines.specs import AxisRange, SpecParams, make_specs, unet_batch_range
from engines.versions import lora_identity, weights_fingerprint

ROOT = Path(__file__).resolve().parents[2]


def _key(**over) -> CacheKey:
    p = SpecParams(width=512, height=512, batch=unet_batch_range(1, 4), embed_dim=1024)
    base = dict(model="stabilityai/sd-turbo", weights="s32:abc", lora=(), network="unet",
                shapes=make_specs(p)["unet"].cache_fields(), dtype="float16", backend="trt",
                backend_version="tensorrt 10.7.0", gpu="sm_90", options={"fp16": True, "optimization_level": 3})
    base.update(over)
    return CacheKey(**base)


# ---- keys ----------------------------------------------------------------------------------------------

def test_equal_keys_equal_digest():
    assert _key() == _key()
    assert _key().digest == _key().digest
    assert _key().folder_name.startswith("unet-trt-")
    # option order does not matter
    assert _key(options={"optimization_level": 3, "fp16": True}).digest == _key().digest


@pytest.mark.parametrize("field,value", [
    ("weights", "s32:abd"),
    ("lora", (("style.safetensors", "h1", 0.8),)),
    ("network", "vae_decoder"),
    ("dtype", "float32"),
    ("backend", "compiled"),
    ("backend_version", "tensorrt 10.8.0"),
    ("gpu", "sm_89"),
    ("options", {"fp16": True, "optimization_level": 5}),
    ("model", "other/model"),
])
def test_every_field_changes_the_key(field, value):
    assert _key(**{field: value}).digest != _key().digest


def test_resolution_and_batch_range_change_the_key():
    def shapes(**kw):
        args = dict(width=512, height=512, batch=unet_batch_range(1, 4), embed_dim=1024) | kw
        return make_specs(SpecParams(**args))["unet"].cache_fields()

    base = _key(shapes=shapes()).digest
    assert _key(shapes=shapes(width=768)).digest != base
    assert _key(shapes=shapes(batch=unet_batch_range(1, 5))).digest != base
    assert _key(shapes=shapes(batch=unet_batch_range(1, 4, guidance="full"))).digest != base
    assert _key(shapes=shapes(batch=AxisRange(1, 2, 4))).digest != base  # opt too


def test_lora_scale_and_content_change_the_key(tmp_path):
    f = tmp_path / "a.safetensors"
    f.write_bytes(b"x" * 100)
    a = lora_identity([(str(f), 1.0)])
    assert a != lora_identity([(str(f), 0.5)])
    f.write_bytes(b"y" * 100)
    assert lora_identity([(str(f), 1.0)]) != a
    assert _key(lora=a).digest != _key(lora=lora_identity([(str(f), 1.0)])).digest


def test_key_rejects_empty_fields():
    with pytest.raises(ValueError, match="gpu"):
        _key(gpu="")


def test_weights_fingerprint():
    def model(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(200, 300), torch.nn.Linear(300, 4))

    a, b = model(0), model(0)
    assert weights_fingerprint(a) == weights_fingerprint(b)
    assert weights_fingerprint(a) != weights_fingerprint(model(1))
    with torch.no_grad():
        b[0].weight.add_(1e-3)  # a fused LoRA / fine-tune changes every element of a tensor
    assert weights_fingerprint(a) != weights_fingerprint(b)
    c = model(0)
    with torch.no_grad():
        c[0].weight[100, 7] += 1.0  # one element between the sampled windows
    assert weights_fingerprint(a, full=True) != weights_fingerprint(c, full=True)
    assert weights_fingerprint(a.half()) != weights_fingerprint(model(0))  # dtype is identity


# ---- atomic write, corruption ------------------------------------------------------------------------

def _build(content: bytes = b"engine-bytes" * 1000, calls: list | None = None):
    def build(folder: Path):
        if calls is not None:
            calls.append(folder)
        (folder / "engine.plan").write_bytes(content)
        (folder / "extra.json").write_text("{}")
        return {"note": 1.5}

    return build


def test_build_then_hit(tmp_path):
    cache = EngineCache(tmp_path)
    calls = []
    e = cache.get_or_build(_key(), _build(calls=calls), versions={"tensorrt": "10.7.0"})
    assert len(calls) == 1 and e.path.name == _key().folder_name
    m = json.loads((e.path / "manifest.json").read_text())
    assert m["key"] == _key().to_dict() and m["digest"] == _key().digest
    assert m["artifacts"]["engine.plan"]["size"] == 12000 and len(m["artifacts"]["engine.plan"]["sha256"]) == 64
    assert m["versions"] == {"tensorrt": "10.7.0"} and m["extra"] == {"note": 1.5} and m["created"]
    assert e.artifact("engine.plan").read_bytes() == b"engine-bytes" * 1000
    assert cache.get_or_build(_key(), _build(calls=calls)).path == e.path and len(calls) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_failed_build_publishes_nothing(tmp_path):
    cache = EngineCache(tmp_path)

    def bad(folder):
        (folder / "engine.plan").write_bytes(b"half")
        raise RuntimeError("builder died")

    with pytest.raises(RuntimeError, match="builder died"):
        cache.get_or_build(_key(), bad)
    assert cache.lookup(_key()) is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("damage,expect", [
    ("truncate", "bytes, the manifest says"),
    ("flip", "does not match its sha256"),
    ("delete", "is missing"),
    ("manifest", "unreadable manifest"),
    ("manifest_null", "manifest that is not a JSON object (got NoneType)"),
    ("manifest_list", "manifest that is not a JSON object (got list)"),
    ("artifact_entry", "artifact engine.plan is not a JSON object (got int)"),
])
def test_corruption_is_detected_and_rebuilt(tmp_path, caplog, damage, expect):
    cache = EngineCache(tmp_path)
    e = cache.get_or_build(_key(), _build())
    plan = e.path / "engine.plan"
    if damage == "truncate":
        plan.write_bytes(plan.read_bytes()[:100])
    elif damage == "flip":
        b = bytearray(plan.read_bytes())
        b[5000] ^= 0xFF
        plan.write_bytes(bytes(b))
    elif damage == "delete":
        plan.unlink()
    elif damage == "manifest_null":
        (e.path / "manifest.json").write_text("null")  # valid JSON, but not an object
    elif damage == "manifest_list":
        (e.path / "manifest.json").write_text("[]")
    elif damage == "artifact_entry":
        m = json.loads((e.path / "manifest.json").read_text())
        m["artifacts"]["engine.plan"] = 12000
        (e.path / "manifest.json").write_text(json.dumps(m))
    else:
        (e.path / "manifest.json").write_text('{"key": ')
    with pytest.raises(CacheCorrupt, match=re.escape(expect)):
        cache.lookup(_key())
    calls = []
    with caplog.at_level(logging.WARNING, logger="engines.cache"):
        e2 = cache.get_or_build(_key(), _build(calls=calls))
    assert len(calls) == 1
    assert any(expect in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    assert e2.artifact("engine.plan").read_bytes() == b"engine-bytes" * 1000
    assert cache.lookup(_key()) is not None


def test_size_only_verification_skips_hashing(tmp_path):
    cache = EngineCache(tmp_path, verify=Verify.SIZE)
    e = cache.get_or_build(_key(), _build())
    b = bytearray((e.path / "engine.plan").read_bytes())
    b[0] ^= 1
    (e.path / "engine.plan").write_bytes(bytes(b))
    assert cache.lookup(_key()) is not None  # same size: only SHA256 mode notices
    with pytest.raises(CacheCorrupt):
        EngineCache(tmp_path).lookup(_key())


def test_invalidate_forces_rebuild(tmp_path):
    cache = EngineCache(tmp_path)
    calls = []
    cache.get_or_build(_key(), _build(calls=calls))
    cache.invalidate(_key(), "TensorRT could not deserialise it")
    cache.get_or_build(_key(), _build(calls=calls))
    assert len(calls) == 2


def test_write_atomic_replaces_whole_file(tmp_path):
    f = tmp_path / "x.bin"
    write_atomic(f, b"old")
    write_atomic(f, b"new contents")
    assert f.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_other_key_manifest_is_corrupt(tmp_path):
    cache = EngineCache(tmp_path)
    e = cache.get_or_build(_key(), _build())
    m = json.loads((e.path / "manifest.json").read_text())
    m["key"]["gpu"] = "sm_80"
    (e.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheCorrupt, match="another key"):
        cache.lookup(_key())


@pytest.mark.parametrize("name", ["../outside.bin", "{abs}", "sub/../../outside.bin", "./engine.plan", "a//b", ""])
def test_artifact_names_outside_the_entry_are_corrupt(tmp_path, name):
    """A manifest naming a file outside its folder is corrupt, even when that file has the listed size and
    sha256 (else a tampered manifest could make the engine load any file on the machine)."""
    from engines.cache import sha256_file

    cache = EngineCache(tmp_path / "cache")
    e = cache.get_or_build(_key(), _build())
    outside = tmp_path / "cache" / "outside.bin"
    outside.write_bytes(b"not an engine")
    name = name.format(abs=str(outside))
    m = json.loads((e.path / "manifest.json").read_text())
    m["artifacts"][name] = {"size": outside.stat().st_size, "sha256": sha256_file(outside)}
    (e.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheCorrupt, match="is not a relative path inside the entry"):
        cache.lookup(_key())
    calls = []
    assert cache.get_or_build(_key(), _build(calls=calls)).artifact("engine.plan").is_file()
    assert len(calls) == 1 and outside.read_bytes() == b"not an engine"  # rebuilt; the outside file untouched


# ---- two real processes ------------------------------------------------------------------------------

_WORKER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from engines.cache import CacheKey, EngineCache
    root, log_path, go, mode = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    key = CacheKey(model="m", weights="w", lora=(), network="unet", shapes={{"B": [1, 2, 4]}}, dtype="float16",
                   backend="trt", backend_version="t", gpu="sm_90")
    def build(folder):
        with open(log_path, "a") as f:
            f.write(f"{{os.getpid()}}\\n")
        with open(folder / "engine.plan", "wb") as f:
            for i in range(20):  # a slow writer: a reader must never see this half-written
                f.write(bytes([i]) * 10000)
                f.flush()
                time.sleep(0.03)
                if mode == "die" and i == 10:
                    os.kill(os.getpid(), 9)
        return {{"pid": os.getpid()}}
    while time.time() < go:
        time.sleep(0.005)
    entry = EngineCache(root).get_or_build(key, build)
    data = (entry.path / "engine.plan").read_bytes()
    assert data == b"".join(bytes([i]) * 10000 for i in range(20)), "corrupt artifact"
    print(json.dumps({{"path": str(entry.path), "digest": entry.manifest["digest"]}}))
""")


def _spawn(tmp_path, mode="ok", go=None):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(root=str(ROOT)))
    go = go if go is not None else time.time() + 2.0
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache"), str(tmp_path / "builds.log"),
                             str(go), mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_build_the_same_key_once(tmp_path):
    go = time.time() + 2.0  # both start waiting for the same instant, then race for the lock
    procs = [_spawn(tmp_path, go=go), _spawn(tmp_path, go=go)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert outs[0] == outs[1]
    builders = (tmp_path / "builds.log").read_text().split()
    assert len(builders) == 1, f"built {len(builders)} times"
    entries = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp-")]


def test_builder_killed_mid_build_leaves_no_entry_and_the_next_builds(tmp_path):
    dying = _spawn(tmp_path, mode="die", go=time.time())
    dying.communicate(timeout=60)
    assert dying.returncode == -signal.SIGKILL
    cache_dir = tmp_path / "cache"
    assert [p.name for p in cache_dir.iterdir() if p.name.startswith(".tmp-")]  # the half-built folder
    assert not [p for p in cache_dir.iterdir() if not p.name.startswith(".")]  # nothing published
    ok = _spawn(tmp_path, go=time.time())
    out, err = ok.communicate(timeout=60)
    assert ok.returncode == 0, err
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".tmp-")]
    assert len((tmp_path / "builds.log").read_text().split()) == 2


_HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from engines.cache import CacheKey, EngineCache
    key = CacheKey(model="m", weights="w", lora=(), network="unet", shapes={{"B": [1, 2, 4]}}, dtype="float16",
                   backend="trt", backend_version="t", gpu="sm_90")
    def build(folder):
        print("building", flush=True)
        while True:  # a build that never ends by itself: the test stops, then kills, this process
            time.sleep(0.05)
    EngineCache(sys.argv[1]).get_or_build(key, build)
""")


def test_a_stopped_lock_holder_is_not_waited_for_forever(tmp_path):
    """Another process holds the key's build lock and is then stopped (SIGSTOP): a second builder gives up
    with an error naming the holder's pid instead of waiting forever; once the holder is gone it builds."""
    from engines.locks import LockTimeout, process_stopped

    script = tmp_path / "holder.py"
    script.write_text(_HOLDER.format(root=str(ROOT)))
    holder = subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "building"  # it holds the lock now
        os.kill(holder.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 60
        while not process_stopped(holder.pid):  # the kernel marks it stopped; wait for that, not a guess
            assert time.monotonic() < deadline, "the holder never showed as stopped"
            time.sleep(0.01)
        key = CacheKey(model="m", weights="w", lora=(), network="unet", shapes={"B": [1, 2, 4]}, dtype="float16",
                       backend="trt", backend_version="t", gpu="sm_90")
        cache = EngineCache(tmp_path / "cache", stopped_grace_s=0.5)
        calls = []
        with pytest.raises(LockTimeout, match=rf"held by pid {holder.pid}, which is stopped.*kill -CONT {holder.pid}"):
            cache.get_or_build(key, _build(calls=calls))
        assert calls == []
        # the overall bound (here 0 s, and a grace longer than it) names the holder too
        with pytest.raises(LockTimeout, match=rf"gave up after 0 s waiting for the lock .* held by pid {holder.pid}"):
            EngineCache(tmp_path / "cache", lock_timeout_s=0.0, stopped_grace_s=3600).get_or_build(key, _build())
    finally:
        holder.kill()  # SIGKILL ends a stopped process too
        holder.communicate(timeout=60)
    assert cache.get_or_build(key, _build(calls=calls)).artifact("engine.plan").is_file()
    assert len(calls) == 1  # the lock died with its holder
