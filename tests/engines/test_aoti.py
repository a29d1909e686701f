"""Backend 'compiled' with AOTInductor packages in the engine cache, on the CPU (tiny model, float32).

A first process compiles the UNet, VAE encoder and decoder packages (about 40 s on 2 cores); every other
test reuses that cache: a restart loads them and compiles nothing, a truncated package is rebuilt, the KV
cache's stateful UNet runs the fallback, and `rtdiffusion build` finds what the engine built. Other
weights get other keys: Inductor folds a few derived constants into a package.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from engines import aoti
from engines.cache import EngineCache
from rtdiffusion import StreamEngine

pytestmark = pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++")),
                                reason="AOTInductor compiles C++ on the CPU: needs g++ (apt-get install g++)")

SIZE = 64
ENGINE = dict(width=SIZE, height=SIZE, device="cpu", dtype="float32", prompt="a lighthouse", seed=7)

RUN = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    t0 = time.monotonic()
    from rtdiffusion import StreamEngine
    engine = StreamEngine.from_pretrained("random:tiny", backend="compiled", engine_dir=sys.argv[1],
                                          **json.loads(sys.argv[2]))
    frames = np.load(sys.argv[3])
    np.save(sys.argv[4], np.stack([np.asarray(engine(f)) for f in frames]))
    print(json.dumps({"networks": engine.status()["networks"], "reason": engine.status()["backend_reason"],
                      "seconds": time.monotonic() - t0}))
""")


def frames(n: int = 6) -> np.ndarray:
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (SIZE, SIZE, 3)).astype(np.int16)
    return np.stack([np.clip(base + 6 * i, 0, 255).astype(np.uint8) for i in range(n)])


def run_process(cache, folder, name: str) -> tuple[dict, np.ndarray]:
    np.save(folder / "frames.npy", frames())
    out = folder / f"{name}.npy"
    r = subprocess.run([sys.executable, "-c", RUN, str(cache), json.dumps(ENGINE), str(folder / "frames.npy"),
                        str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), np.load(out)


def eager_outputs(**kw) -> np.ndarray:
    engine = StreamEngine.from_pretrained("random:tiny", backend="eager", **ENGINE, **kw)
    return np.stack([np.asarray(engine(f)) for f in frames()])


def counts(networks: dict) -> dict[str, tuple[int, int]]:
    return {k: (networks[k]["built"], networks[k]["loaded"]) for k in ("unet", "vae_encoder", "vae_decoder")}


@pytest.fixture(scope="module")
def first_start(tmp_path_factory):
    folder = tmp_path_factory.mktemp("aoti")
    cache = folder / "engines"
    status, out = run_process(cache, folder, "first")
    return cache, folder, status, out


def test_first_start_builds_one_package_per_network_into_the_cache(first_start):
    cache, _, status, out = first_start
    assert "compile artifacts: aoti" in status["reason"]
    assert counts(status["networks"]) == {k: (1, 0) for k in ("unet", "vae_encoder", "vae_decoder")}
    entries = {e.path.name: e for e in EngineCache(cache).entries()}
    assert sorted(e.manifest["key"]["network"] for e in entries.values()) == ["unet", "vae_decoder", "vae_encoder"]
    for e in entries.values():
        assert e.manifest["key"]["backend"] == "aoti"
        assert list(e.manifest["artifacts"]) == [aoti.PACKAGE]
        assert e.manifest["key"]["weights"].startswith("s32:")  # the weights it was built from
        assert e.manifest["extra"]["constants"]
    assert out.shape == (len(frames()), SIZE, SIZE, 3) and out.std() > 1


def test_restart_loads_the_packages_compiles_nothing_and_gives_the_same_frames(first_start):
    cache, folder, first, out = first_start
    again, out2 = run_process(cache, folder, "again")
    assert counts(again["networks"]) == {k: (0, 1) for k in ("unet", "vae_encoder", "vae_decoder")}
    np.testing.assert_array_equal(out2, out)
    assert again["seconds"] < first["seconds"] / 2, (again["seconds"], first["seconds"])


def test_compiled_matches_eager(first_start):
    _, _, _, out = first_start
    diff = np.abs(out.astype(int) - eager_outputs().astype(int))
    assert diff.max() <= 2, diff.max()  # float32; Inductor's kernels sum in another order


def test_weights_are_bound_at_load_not_copied_into_the_package(first_start, tiny_components):
    (entry,) = [e for e in EngineCache(first_start[0]).entries() if e.manifest["key"]["network"] == "vae_decoder"]
    runner = aoti.load_package(entry, aoti.DecodeCall(tiny_components.vae), torch.device("cpu"))
    # the package reads the module's own tensors (user-managed constants: same storage, no copy)
    own = dict(tiny_components.vae.named_parameters(remove_duplicate=False))
    assert runner.bound and all(t.data_ptr() == own[name.removeprefix("net.")].data_ptr()
                                for name, t in runner.bound.items())
    latent = torch.randn(1, 4, SIZE // 2, SIZE // 2)
    with torch.no_grad():
        torch.testing.assert_close(runner(latent), tiny_components.vae.decode(latent, return_dict=False)[0],
                                   rtol=1e-4, atol=1e-4)


def test_truncated_package_is_rebuilt_with_a_warning(first_start, tmp_path, caplog):
    cache = tmp_path / "engines"
    shutil.copytree(first_start[0], cache)
    (decoder,) = [e for e in EngineCache(cache).entries() if e.manifest["key"]["network"] == "vae_decoder"]
    package = decoder.artifact(aoti.PACKAGE)
    package.write_bytes(package.read_bytes()[:1000])
    engine = StreamEngine.from_pretrained("random:tiny", backend="compiled", engine_dir=str(cache), **ENGINE)
    out = np.stack([np.asarray(engine(f)) for f in frames()])
    assert counts(engine.status()["networks"]) == {"unet": (0, 1), "vae_encoder": (0, 1), "vae_decoder": (1, 0)}
    assert any("vae_decoder" in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(out, first_start[3])


def test_kv_cache_unet_runs_the_fallback_and_matches_eager(first_start):
    cache = first_start[0]
    kw = dict(cache_enabled=True, cache_maxframes=2)
    engine = StreamEngine.from_pretrained("random:tiny", backend="compiled", engine_dir=str(cache), **ENGINE, **kw)
    out = np.stack([np.asarray(engine(f)) for f in frames()])
    nets = engine.status()["networks"]
    assert nets["unet"]["exportable"] is False and nets["unet"]["packages"] == []  # stateful processors
    assert counts(nets)["vae_encoder"] == (0, 1)
    assert np.abs(out.astype(int) - eager_outputs(**kw).astype(int)).max() <= 2
    engine.update(cache_enabled=False)  # the stock processors are back: the UNet package runs again
    engine(frames()[0])
    assert engine.status()["networks"]["unet"]["exportable"] is True
    assert counts(engine.status()["networks"])["unet"] == (0, 1)


def test_constants_that_do_not_match_are_refused(first_start, tiny_components):
    (unet_entry,) = [e for e in EngineCache(first_start[0]).entries() if e.manifest["key"]["network"] == "unet"]
    import copy

    unet = copy.deepcopy(tiny_components.unet).to(memory_format=torch.channels_last)  # other strides
    with pytest.raises(aoti.ConstantsMismatch, match="shape, stride, dtype"):
        aoti.load_package(unet_entry, aoti.UNetCall(unet), torch.device("cpu"))


def test_key_changes_with_what_the_generated_code_depends_on(tiny_components):
    unet = aoti.UNetCall(tiny_components.unet)
    x = (torch.zeros(1, 4, 8, 8), torch.zeros(1), torch.zeros(1, 77, 32))
    cpu = torch.device("cpu")

    def key(args=x, options=None, wrapper=unet):
        return aoti.package_key(aoti.NetworkKind.UNET, wrapper, aoti.signature(args), model="random:tiny",
                                device=cpu, options=options or aoti.inductor_options({}))

    base = key()
    assert key() == base and key().digest == base.digest
    assert key((torch.zeros(2, 4, 8, 8), torch.zeros(2), torch.zeros(2, 77, 32))) != base  # batch
    assert key((x[0].to(memory_format=torch.channels_last), *x[1:])) != base  # strides
    assert key(tuple(t.double() for t in x)) != base  # dtype
    assert key(options=aoti.inductor_options({"conv_1x1_as_mm": True})) != base  # build options
    # "freezing" needs the weights inside the package, so packages leave it out
    assert aoti.inductor_options({"freezing": True}) == aoti.inductor_options({})
    import copy

    other = copy.deepcopy(tiny_components.unet)
    other.register_to_config(norm_eps=1e-3)  # same constants, other arithmetic
    assert key(wrapper=aoti.UNetCall(other)) != base
    tuned = copy.deepcopy(tiny_components.unet)
    with torch.no_grad():
        tuned.conv_out.bias.add_(0.01)  # a fine-tune: Inductor may have folded the old values into the code
    assert key(wrapper=aoti.UNetCall(tuned)) != base
    assert base.gpu.startswith("cpu-")


def test_a_package_that_cannot_be_built_falls_back_visibly(tiny_components, tmp_path, caplog):
    nets = aoti.AotiNetworks(tiny_components.unet, tiny_components.vae, cache=EngineCache(tmp_path),
                             model="random:tiny", preset={"no_such_inductor_option": True})
    image = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    got = nets.encode(image)
    ref = tiny_components.vae.encode(image, return_dict=False)[0]
    torch.testing.assert_close(got, ref)  # the fallback (the module itself on the CPU) ran it
    fallbacks = nets.describe()["vae_encoder"]["fallbacks"]
    assert list(fallbacks) == [f"1x3x{SIZE}x{SIZE}"] and "no_such_inductor_option" in next(iter(fallbacks.values()))
    assert any("could not package vae_encoder" in r.getMessage() for r in caplog.records)
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]  # nothing published


def test_build_command_finds_what_the_engine_built(first_start):
    cache = first_start[0]

    def entries():  # dot-named files are the cache's own bookkeeping (locks, fingerprints, stamps, build times)
        return sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))

    before = entries()
    r = subprocess.run([sys.executable, "-c", "import sys; from rtdiffusion.cli import main; sys.exit(main())",
                        "build", "--model", "random:tiny", "--backend", "compiled", "--device", "cpu",
                        "--width", str(SIZE), "--height", str(SIZE), "--max-steps", "1", "--cfg", "none",
                        "--engine-dir", str(cache)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert entries() == before  # nothing built: every package was found
    for name in before:
        assert name in r.stderr + r.stdout
    assert "AOTInductor: loaded unet" in r.stderr + r.stdout


def test_aoti_on_cuda_is_refused_with_the_reason_unless_asked_for(monkeypatch):
    """Loading packages segfaulted on the H200 (BENCHMARKS.md): refuse it up front, never crash the process."""
    import types

    from rtdiffusion.backends import AOTI_CUDA_ENV, choose_backend
    from rtdiffusion.config import Backend, CompileArtifacts
    from rtdiffusion.errors import ConfigError

    monkeypatch.delenv(AOTI_CUDA_ENV, raising=False)
    config = types.SimpleNamespace(backend=Backend.COMPILED, device=torch.device("cuda"), max_vram_gb=None,
                                   compile_artifacts=CompileArtifacts.AOTI)
    with pytest.raises(ConfigError, match=r"AOTInductor packages on CUDA are disabled: .*segfault.*"
                                          r"compile_artifacts='jit'.*RTDIFFUSION_AOTI_CUDA=1"):
        choose_backend(config)
    monkeypatch.setenv(AOTI_CUDA_ENV, "1")
    assert choose_backend(config)[0] is Backend.COMPILED
    config.device = torch.device("cpu")  # the CPU path is what the tests above run
    monkeypatch.delenv(AOTI_CUDA_ENV)
    assert choose_backend(config)[0] is Backend.COMPILED
