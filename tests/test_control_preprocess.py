"""ControlNet preprocessors (rtdiffusion/control/preprocess.py, canny.py, depth.py) on the CPU.

The canny preprocessor is held against a plain per-pixel numpy implementation of the same algorithm (written
after OpenCV's canny.cpp: its direction tests, its tie rules, breadth-first hysteresis) and, where OpenCV is
installed, against cv2.Canny itself. Every preprocessor is called twice under a dispatch mode that records
any op output that is not one of its inputs' storages (a fresh allocation): none for canny, tile and
external; for depth, none outside the network's forward.
"""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from rtdiffusion.control.canny import gaussian_taps
from rtdiffusion.control.preprocess import (CannyOptions, ExternalPreprocessor, PreprocessorKind, make_preprocessor,
                                            parse_options)
from rtdiffusion.errors import ConfigError, FrameError, ModelNotFoundError

F, H, W = 2, 48, 64
CPU = dict(frames=F, height=H, width=W, dtype=torch.float32, device="cpu")


# ------------------------------------------------------------------------------------------ test images
def shapes_u8(seed: int, h: int = H, w: int = W, noise: float = 6.0) -> np.ndarray:
    """A grey [h, w] uint8 picture: a disc, a rectangle, a thick diagonal line, a soft gradient, noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = 40 + 30 * x / w
    cy, cx, rad = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w, rng.uniform(0.15, 0.3) * h
    img[(y - cy) ** 2 + (x - cx) ** 2 < rad**2] = rng.uniform(150, 230)
    y0, x0 = int(rng.integers(2, h // 3)), int(rng.integers(2, w // 3))
    img[y0:y0 + h // 3, x0:x0 + w // 4] = rng.uniform(90, 130)
    a, b = rng.uniform(-1, 1, 2)
    img[np.abs(a * (x - w / 2) + b * (y - h / 2) + 3) / math.hypot(a, b) < 1.2] = 250
    img += rng.normal(0, noise, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def to_image(rgb_u8: np.ndarray) -> torch.Tensor:
    """[F, H, W, 3] uint8 -> [F, 3, H, W] fp32 in [-1, 1], the engine's frame image."""
    return torch.from_numpy(rgb_u8).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def grey_batch(seeds=(0, 1), **kw) -> np.ndarray:
    return np.stack([shapes_u8(s, **kw) for s in seeds])  # [F, H, W]


# ---------------------------------------------------------------------------- numpy reference of canny
TAN22, TAN67 = np.float32(13573 / 32768), np.float32((13573 + 65536) / 32768)


def ref_canny(rgb: np.ndarray, low: float, high: float, sigma: float, iterations: int | None) -> np.ndarray:
    """rgb [3, H, W] float32 in [-1, 1] -> bool edges [H, W]; ``iterations`` None: unbounded hysteresis."""
    f = np.float32
    h, w = rgb.shape[1:]
    gray = rgb[0] * f(0.5 * 0.299)
    gray = gray + f(0.5 * 0.587) * rgb[1]
    gray = gray + f(0.5 * 0.114) * rgb[2]
    gray = gray + f(0.5)
    taps = [f(t) for t in gaussian_taps(sigma)]
    if taps:
        r = len(taps) // 2
        pad = np.pad(gray, r, mode="edge")
        hb = pad[:, 0:w] * taps[0]
        for k in range(1, len(taps)):
            hb = hb + taps[k] * pad[:, k:k + w]
        gray = hb[0:h] * taps[0]
        for k in range(1, len(taps)):
            gray = gray + taps[k] * hb[k:k + h]
    P = np.pad(gray, 1, mode="edge")
    sv = P[0:h] + P[2:h + 2] + f(2) * P[1:h + 1]
    sh = P[:, 0:w] + P[:, 2:w + 2] + f(2) * P[:, 1:w + 1]
    dx, dy = sv[:, 2:] - sv[:, :-2], sh[2:] - sh[:-2]
    M = np.zeros((h + 2, w + 2), np.float32)
    M[1:-1, 1:-1] = np.abs(dx) * np.abs(dx) + np.abs(dy) * np.abs(dy)
    low2, high2 = f((4 * low) ** 2), f((4 * high) ** 2)
    cand = np.zeros((h, w), bool)
    for i in range(h):
        for j in range(w):
            m = M[i + 1, j + 1]
            if not m > low2:
                continue
            ax, ay = abs(dx[i, j]), abs(dy[i, j])
            if ay < ax * TAN22:  # gradient along x: left must be <, right <=
                cand[i, j] = m > M[i + 1, j] and m >= M[i + 1, j + 2]
            elif ay > ax * TAN67:  # along y: above <, below <=
                cand[i, j] = m > M[i, j + 1] and m >= M[i + 2, j + 1]
            else:  # diagonal, both strict; s = -1 when dx and dy differ in sign
                s = -1 if (dx[i, j] < 0) != (dy[i, j] < 0) else 1
                cand[i, j] = m > M[i, j + 1 - s] and m > M[i + 2, j + 1 + s]
    # hysteresis: breadth-first from the seeds through 8-connected candidates
    dist = np.full((h, w), -1)
    queue = collections.deque()
    for i, j in zip(*np.nonzero(cand & (M[1:-1, 1:-1] > high2))):
        dist[i, j] = 0
        queue.append((i, j))
    while queue:
        i, j = queue.popleft()
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                a, b = i + di, j + dj
                if 0 <= a < h and 0 <= b < w and cand[a, b] and dist[a, b] < 0:
                    dist[a, b] = dist[i, j] + 1
                    queue.append((a, b))
    return (dist >= 0) if iterations is None else (dist >= 0) & (dist <= iterations)


def f1_within_1px(a: np.ndarray, b: np.ndarray) -> float:
    """F1 of edge pixels, an edge counting as found if the other map has one within 1 pixel (8-neighbourhood)."""
    def grow(m):
        p = np.pad(m, 1)
        return np.max([p[i:i + m.shape[0], j:j + m.shape[1]] for i in range(3) for j in range(3)], axis=0)
    precision = (a & grow(b)).sum() / max(a.sum(), 1)
    recall = (b & grow(a)).sum() / max(b.sum(), 1)
    return 2 * precision * recall / max(precision + recall, 1e-9)


def run(pre, image: torch.Tensor) -> torch.Tensor:
    out = torch.full((image.shape[0], 3, *image.shape[2:]), -7.0, dtype=image.dtype)
    pre(image, out)
    return out


# ------------------------------------------------------------------------------------------------ canny
@pytest.mark.parametrize("sigma,low,high,iterations", [(0.0, 0.06, 0.2, 4), (1.0, 0.03, 0.12, 2), (0.7, 0.05, 0.15, 64)])
def test_canny_matches_the_numpy_reference(sigma, low, high, iterations):
    rng = np.random.default_rng(5)
    rgb = np.stack([np.stack([shapes_u8(s + c, noise=10) for c in range(3)], -1) for s in (3, 9)])  # [F, H, W, 3]
    rgb[1, 10:20] = rng.integers(0, 256, (10, W, 3))  # a noisy band: many weak, short chains
    image = to_image(rgb)
    pre = make_preprocessor("canny", **CPU, low=low, high=high, sigma=sigma, hysteresis_iterations=iterations)
    out = run(pre, image)
    assert set(np.unique(out.numpy())) <= {0.0, 1.0}
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    total = mismatched = 0
    for f in range(F):
        ref = ref_canny(image[f].numpy(), low, high, sigma, iterations)
        ours = out[f, 0].numpy() > 0.5
        assert ref.sum() > 50, "the picture must have edges to compare"
        total += ref.size
        mismatched += int((ref != ours).sum())
    # the same float32 arithmetic in a different order (fused multiply-adds) may flip an exact tie
    assert mismatched <= total * 0.001, f"{mismatched} of {total} pixels differ from the reference"


def test_canny_hysteresis_is_bounded_by_its_iterations():
    """A weak edge whose contrast fades along x from a strong start: k steps reach k pixels further along it."""
    g = np.full((1, 24, 40), 20, np.uint8)
    g[0, 12:, :] = 20 + np.arange(200, 40, -4)  # step of 200 at x = 0 down to 44 at x = 39
    image = to_image(np.repeat(g[..., None], 3, -1))
    lengths = []
    for k in (0, 3, 10, 100):
        pre = make_preprocessor("canny", frames=1, height=24, width=40, dtype=torch.float32, device="cpu",
                                low=0.1, high=0.72, sigma=0, hysteresis_iterations=k)
        edges = run(pre, image)[0, 0].numpy() > 0.5
        assert np.array_equal(edges, ref_canny(image[0].numpy(), 0.1, 0.72, 0, k))
        lengths.append(int(edges.sum()))
    assert lengths[0] >= 1 and lengths[1:] == [lengths[0] + 3, lengths[0] + 10, 40], lengths
    assert np.array_equal(run(pre, image)[0, 0].numpy() > 0.5, ref_canny(image[0].numpy(), 0.1, 0.72, 0, None))


def test_canny_agrees_with_opencv():
    cv2 = pytest.importorskip("cv2", reason="OpenCV (opencv-python-headless) is not installed")
    grey = grey_batch((11, 12), noise=8)
    image = to_image(np.repeat(grey[..., None], 3, -1))
    for low, high in ((0.1, 0.2), (0.04, 0.25)):
        # no blur: cv2.Canny(gray, 1020 low, 1020 high, L2gradient=True) is the same algorithm
        pre = make_preprocessor("canny", **CPU, low=low, high=high, sigma=0, hysteresis_iterations=256)
        out = run(pre, image)
        for f in range(F):
            ref = cv2.Canny(grey[f], 1020 * low, 1020 * high, L2gradient=True) > 0
            ours = out[f, 0].numpy() > 0.5
            assert ref.sum() > 50
            assert (ref != ours).sum() <= ref.size * 0.001
    # with a blur, against OpenCV's Gaussian blur (rounded to uint8) then Canny: close, not equal
    pre = make_preprocessor("canny", **CPU, low=0.05, high=0.15, sigma=1.0, hysteresis_iterations=256)
    out = run(pre, image)
    for f in range(F):
        blurred = cv2.GaussianBlur(grey[f], (7, 7), 1.0, borderType=cv2.BORDER_REPLICATE)
        ref = cv2.Canny(blurred, 1020 * 0.05, 1020 * 0.15, L2gradient=True) > 0
        assert f1_within_1px(out[f, 0].numpy() > 0.5, ref) > 0.9


def test_canny_in_half_precision_keeps_the_edges():
    """The engine's fp16 frame in, fp16 edges out; the arithmetic inside stays fp32."""
    grey = grey_batch((21, 22))
    image = to_image(np.repeat(grey[..., None], 3, -1))
    ref = run(make_preprocessor("canny", **CPU), image)
    half = make_preprocessor("canny", **{**CPU, "dtype": torch.float16})
    out = run(half, image.half())
    assert out.dtype == torch.float16
    for f in range(F):
        assert f1_within_1px(out[f, 0].float().numpy() > 0.5, ref[f, 0].numpy() > 0.5) > 0.95


# ------------------------------------------------------------------------------------------------- tile
def test_tile_passthrough_and_downscale():
    image = torch.rand(F, 3, H, W) * 2 - 1
    assert torch.allclose(run(make_preprocessor("tile", **CPU), image), (image + 1) / 2, atol=1e-6)
    for d in (2, 4, 8):
        out = run(make_preprocessor(PreprocessorKind.TILE, **CPU, downscale=d), image)
        ref = Fn.interpolate(Fn.avg_pool2d((image + 1) / 2, d), scale_factor=d, mode="bilinear", align_corners=False)
        assert torch.allclose(out, ref, atol=1e-5), d
        assert float(out.min()) >= 0 and float(out.max()) <= 1
    with pytest.raises(ConfigError, match="divide"):
        make_preprocessor("tile", **CPU, downscale=5)


# ------------------------------------------------------------------------------------------------ depth
DEPTH = dict(model="random:tiny-depth", resolution=28)


@pytest.fixture(scope="module")
def depth_pre():
    return make_preprocessor("depth", **CPU, **DEPTH)


def depth_reference(pre, image: torch.Tensor) -> torch.Tensor:
    """The same computation with allocating torch calls: resize, normalise, network, resize back, min-max."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = Fn.interpolate((image + 1) / 2, size=pre.net_size, mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        d = pre.model(pixel_values=(x - mean) / std).predicted_depth[:, None]
    d = Fn.interpolate(d, size=image.shape[-2:], mode="bilinear", align_corners=False)
    lo, hi = d.amin(dim=(2, 3), keepdim=True), d.amax(dim=(2, 3), keepdim=True)
    return ((d - lo) / (hi - lo)).expand(-1, 3, -1, -1)


def test_depth_shape_range_and_reference(depth_pre):
    assert depth_pre.net_size == (28, 42)  # shorter side 48 -> 28, longer keeps the 4:3 aspect, multiple of 14
    image = torch.rand(F, 3, H, W) * 2 - 1
    out = run(depth_pre, image)
    assert out.shape == (F, 3, H, W)
    for f in range(F):  # each frame spans [0, 1] on its own
        assert float(out[f].min()) == 0.0 and abs(float(out[f].max()) - 1.0) < 1e-5
    assert torch.equal(out[:, 0], out[:, 2])
    assert torch.allclose(out, depth_reference(depth_pre, image), atol=1e-4)
    # per-frame: frame 1 alone (same weights) gives the same map as inside the batch
    single = make_preprocessor("depth", **{**CPU, "frames": 1}, **DEPTH)
    assert torch.allclose(run(single, image[1:]), out[1:], atol=1e-5)


def test_depth_is_deterministic_per_seed(depth_pre):
    image = torch.rand(F, 3, H, W) * 2 - 1
    out = run(depth_pre, image)
    assert torch.equal(run(depth_pre, image), out)
    again = make_preprocessor("depth", **CPU, **DEPTH)
    assert torch.equal(run(again, image), out)
    other = make_preprocessor("depth", **CPU, **DEPTH, seed=1)
    assert not torch.allclose(run(other, image), out)
    assert depth_pre.describe()["network_size"] == [28, 42]


def test_depth_anything_v2_small_is_the_published_architecture():
    from rtdiffusion.control.depth import load_depth_model, network_size, patch_size

    net = load_depth_model("random:depth-anything-v2-small", dtype=torch.float16, device=torch.device("meta"))
    assert sum(p.numel() for p in net.parameters()) == 24_785_089  # its model card's count
    assert patch_size(net) == 14
    assert network_size(512, 512, 252, 14) == (252, 252) and network_size(512, 768, 252, 14) == (252, 378)


def test_depth_bad_models_and_resolutions():
    with pytest.raises(ConfigError, match="multiple of 14"):
        make_preprocessor("depth", **CPU, model="random:tiny-depth", resolution=30)
    with pytest.raises(ConfigError, match="random:depth-anything-v2-small"):
        make_preprocessor("depth", **CPU, model="random:nope")
    with pytest.raises(ModelNotFoundError, match="depth model"):
        make_preprocessor("depth", **CPU, model="/nonexistent/depth-folder", local_files_only=True)
    with pytest.raises(ConfigError, match="resolution"):
        make_preprocessor("depth", **CPU, resolution=0)


# --------------------------------------------------------------------------------------------- external
def test_external_write_and_convert():
    pre = make_preprocessor("external", **CPU)
    assert isinstance(pre, ExternalPreprocessor) and pre.frame_u8.shape == (F, H, W, 3)
    rng = np.random.default_rng(0)
    one = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    pre.write(one)  # [H, W, 3]: every frame row
    out = run(pre, torch.zeros(F, 3, H, W))
    ref = torch.from_numpy(one).permute(2, 0, 1).float() / 255
    assert torch.allclose(out, ref.expand(F, -1, -1, -1), atol=1e-6)
    both = torch.from_numpy(rng.integers(0, 256, (F, H, W, 3), dtype=np.uint8))
    pre.write(both[:, :, :, :])  # torch, [F, H, W, 3]
    pre.write(both.numpy()[:, ::1])  # numpy views too
    assert torch.allclose(run(pre, torch.zeros(F, 3, H, W)), both.permute(0, 3, 1, 2).float() / 255, atol=1e-6)
    assert pre.describe() == {"kind": "external", "writes": 3}


@pytest.mark.parametrize("bad,what", [
    (np.zeros((H, W, 3), np.float32), "dtype float32"),
    (torch.zeros(H, W, 3), "dtype torch.float32"),
    (np.zeros((H + 1, W, 3), np.uint8), f"shape \\[{H + 1}, {W}, 3\\]"),
    (np.zeros((3, H, W), np.uint8), "shape"),
    (np.zeros((F + 1, H, W, 3), np.uint8), "shape"),
    ([[0, 0, 0]], "numpy array or torch tensor"),
])
def test_external_rejects_bad_frames_and_keeps_the_last(bad, what):
    pre = make_preprocessor("external", **CPU)
    pre.write(np.full((H, W, 3), 9, np.uint8))
    with pytest.raises(FrameError, match=what) as err:
        pre.write(bad)
    assert f"[{H}, {W}, 3]" in str(err.value) and f"[{F}, {H}, {W}, 3]" in str(err.value)
    assert int(pre.frame_u8.min()) == int(pre.frame_u8.max()) == 9 and pre.writes == 1


# ------------------------------------------------------------------------------------------- allocation
class FreshTensors(TorchDispatchMode):
    """Records every op whose output is not a view of (or the same memory as) one of its inputs: an
    allocation. Ops run while ``paused`` (a network's forward) are not recorded."""

    def __init__(self):
        super().__init__()
        self.fresh: list[str] = []
        self.seen = 0
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if not self.paused:
            self.seen += 1
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                      if isinstance(t, torch.Tensor)}
            for t in tree_flatten(result)[0]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    self.fresh.append(str(func))
        return result


def test_the_allocation_detector_sees_allocations():
    x, out = torch.rand(2, 3), torch.zeros(2, 3)
    with FreshTensors() as mode:
        torch.mul(x, 2.0, out=out)
        out.add_(x).clamp_(0, 1)
        out.copy_(x[:1].expand(2, 3))
    assert mode.fresh == [] and mode.seen >= 4
    with FreshTensors() as mode:
        torch.mul(x, 2)
        torch.zeros(3)
        Fn.max_pool2d(x[None, None], 1)
    assert len(mode.fresh) >= 3, mode.fresh


def tensor_addresses(pre) -> dict[str, int]:
    return {k: v.data_ptr() for k, v in vars(pre).items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("kind,options", [
    ("canny", {}), ("canny", {"sigma": 0.0}), ("tile", {}), ("tile", {"downscale": 4}), ("external", {}),
])
def test_calls_allocate_nothing(kind, options):
    pre = make_preprocessor(kind, **CPU, **options)
    image, out = torch.rand(F, 3, H, W) * 2 - 1, torch.zeros(F, 3, H, W)
    pre(image, out)
    before, out_ptr = tensor_addresses(pre), out.data_ptr()
    for _ in range(2):
        with FreshTensors() as mode:
            pre(image, out)
        assert mode.seen > 0 and mode.fresh == [], mode.fresh
    assert tensor_addresses(pre) == before and out.data_ptr() == out_ptr


def test_depth_allocates_only_inside_the_network(depth_pre):
    image, out = torch.rand(F, 3, H, W) * 2 - 1, torch.zeros(F, 3, H, W)
    depth_pre(image, out)
    before = tensor_addresses(depth_pre)
    mode = FreshTensors()
    pre_hook = depth_pre.model.register_forward_pre_hook(lambda *a: setattr(mode, "paused", mode.paused + 1))
    post_hook = depth_pre.model.register_forward_hook(lambda *a: setattr(mode, "paused", mode.paused - 1))
    try:
        for _ in range(2):
            mode.fresh.clear()
            with mode:
                depth_pre(image, out)
            assert mode.seen > 0 and mode.fresh == [], mode.fresh
    finally:
        pre_hook.remove()
        post_hook.remove()
    assert tensor_addresses(depth_pre) == before


# ------------------------------------------------------------------------------------------ bad options
@pytest.mark.parametrize("kind,options,match", [
    ("sobel", {}, "canny, tile, depth, external"),
    (3, {}, "canny, tile, depth, external"),
    ("canny", {"threshold": 0.2}, "'threshold'.*allowed: low, high, sigma, hysteresis_iterations"),
    ("canny", {"low": 0.3, "high": 0.2}, "low must be <= high"),
    ("canny", {"low": float("nan")}, "low must be a finite number"),
    ("canny", {"high": 1.5}, r"high must be in \[0.0, 1.0\]"),
    ("canny", {"sigma": -1}, "sigma"),
    ("canny", {"hysteresis_iterations": True}, "hysteresis_iterations must be an integer"),
    ("canny", {"hysteresis_iterations": 2.5}, "hysteresis_iterations must be an integer"),
    ("tile", {"downscale": 0}, "downscale"),
    ("tile", {"low": 0.1}, "allowed: downscale"),
    ("external", {"scale": 1}, "allowed: none"),
    ("depth", {"model": ""}, "depth option model"),
    ("depth", {"resolution": "252"}, "resolution must be an integer"),
    ("depth", {"local_files_only": "yes"}, "local_files_only"),
])
def test_bad_kinds_and_options(kind, options, match):
    with pytest.raises(ConfigError, match=match):
        make_preprocessor(kind, **CPU, **options)


def test_bad_sizes_and_dtypes_and_option_parsing():
    with pytest.raises(ConfigError, match="frames"):
        make_preprocessor("canny", **{**CPU, "frames": 0})
    with pytest.raises(ConfigError, match="dtype"):
        make_preprocessor("tile", **{**CPU, "dtype": torch.uint8})
    assert make_preprocessor(" Canny ", **CPU).kind is PreprocessorKind.CANNY
    assert parse_options("canny", {"low": 0.05}) == CannyOptions(low=0.05)
    assert make_preprocessor("canny", **CPU, sigma=0).describe() == {
        "kind": "canny", "low": 0.1, "high": 0.2, "sigma": 0, "hysteresis_iterations": 16, "blur_radius": 0}


# ------------------------------------------------------------------------------------ CUDA (device only)
@pytest.mark.gpu
@pytest.mark.parametrize("kind,options", [
    ("canny", {}), ("tile", {"downscale": 4}), ("external", {}),
    ("depth", {"model": "random:depth-anything-v2-small"}),
])
def test_cuda_graph_capture_replays_the_eager_result(kind, options):
    """Each preprocessor captures into a CUDA graph (capture fails on a host sync) and a replay on a new frame
    equals an eager call; canny, tile and external make no allocation at all once warm."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    frames, h, w = 2, 256, 320
    kw = dict(frames=frames, height=h, width=w, dtype=torch.float16, device="cuda")
    pre = make_preprocessor(kind, **kw, **options)
    if kind == "external":
        pre.write(np.random.default_rng(0).integers(0, 256, (frames, h, w, 3), dtype=np.uint8))
    gen = torch.Generator(device="cuda").manual_seed(0)
    image = (torch.rand(frames, 3, h, w, device="cuda", generator=gen) * 2 - 1).half()
    out = torch.zeros(frames, 3, h, w, device="cuda", dtype=torch.float16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            pre(image, out)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    if kind != "depth":
        before = torch.cuda.memory_stats()["allocation.all.allocated"]
        pre(image, out)
        torch.cuda.synchronize()
        assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pre(image, out)
    image.copy_((torch.rand(frames, 3, h, w, device="cuda", generator=gen) * 2 - 1).half())
    graph.replay()
    eager = torch.zeros_like(out)
    pre(image, eager)
    torch.cuda.synchronize()
    assert float((out.float() - eager.float()).abs().max()) <= 1e-3
    assert float(out.min()) >= 0 and float(out.max()) <= 1
