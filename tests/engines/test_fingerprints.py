"""Weights fingerprints remembered across restarts (engines/fingerprints.py)."""

from __future__ import annotations

import json
import os

import torch

from engines.fingerprints import FILE, cached_fingerprint, origin_key
from engines.versions import weights_fingerprint


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 4))


RANDOM = {"model": "random:tiny", "seed": 0, "vae": "tiny", "lora": []}


def test_random_model_fingerprint_is_remembered_and_read_back(tmp_path):
    net = _net(0)
    first = cached_fingerprint(net, RANDOM, "unet", tmp_path)
    assert first == weights_fingerprint(net)
    table = json.loads((tmp_path / FILE).read_text())
    key = origin_key(net, RANDOM, "unet")
    assert table == {key: first}
    # a restart reads the table instead of hashing: a value planted under the key comes back as is
    table[key] = "s32:planted"
    (tmp_path / FILE).write_text(json.dumps(table))
    assert cached_fingerprint(_net(0), RANDOM, "unet", tmp_path) == "s32:planted"


def test_origin_key_changes_with_what_makes_the_weights(tmp_path):
    net = _net(0)
    base = origin_key(net, RANDOM, "unet")
    assert origin_key(net, {**RANDOM, "seed": 1}, "unet") != base
    assert origin_key(net, RANDOM, "vae_encoder") != base
    assert origin_key(net.half(), RANDOM, "unet") != base  # dtype
    assert origin_key(torch.nn.Linear(3, 3), RANDOM, "unet") != base  # module and tensors
    assert origin_key(net, {**RANDOM, "lora": [["x.safetensors", 1.0]]}, "unet") is None  # fused LoRA: hash
    assert origin_key(net, None, "unet") is None
    assert origin_key(net, {"model": "some/hub-id"}, "unet") is None  # no folder: nothing pins the weights


def test_folder_key_follows_the_weight_files(tmp_path):
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    w = folder / "unet" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(b"x" * 100)
    ident = {"model": str(folder), "folder": str(folder), "vae": "tiny", "lora": []}
    net = _net(0)
    a = origin_key(net, ident, "unet")
    assert a is not None
    assert origin_key(net, ident, "vae_encoder") is None  # TAESD comes from another folder
    w.write_bytes(b"y" * 101)  # replaced weights: another size and time
    os.utime(w, ns=(1, 1))
    assert origin_key(net, ident, "unet") not in (None, a)


def test_unreadable_table_is_ignored_and_rewritten(tmp_path):
    (tmp_path / FILE).write_text("{not json")
    net = _net(3)
    assert cached_fingerprint(net, RANDOM, "unet", tmp_path) == weights_fingerprint(net)
    assert json.loads((tmp_path / FILE).read_text())
