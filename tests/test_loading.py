"""Model loading on the CPU: a real (tiny) diffusers folder written here, and the published architectures.

The folder has the layout of a hub Stable Diffusion repo: unet/, text_encoder/, tokenizer/ (vocab.json +
merges.txt, as sd-turbo ships them), scheduler/, vae/; and a separate AutoencoderTiny folder like
madebyollin/taesd. Weights are seeded random; nothing is downloaded.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from rtdiffusion import ConfigError, ModelNotFoundError, SchedulerKind, StreamEngine, VaeKind
from rtdiffusion.models.loading import RANDOM_ARCHS, load_components, read_config
from rtdiffusion.models.tokenizer import ClipTokenizer

H = W = 64



def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP byte-level alphabet: one printable character per byte."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


MERGES = ["c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>"]


def write_tokenizer(folder) -> dict[str, int]:
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}  # 520 ids < the tiny text encoder's 1000
    os.makedirs(folder)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}, f)
    return vocab


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(pipeline folder, TAESD folder, the saved modules) with seeded random weights."""
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("tiny-sd")
    torch.manual_seed(123)
    saved = {
        "unet": UNet2DConditionModel.from_config(read_config("tiny_unet_sd2style.json")),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**read_config("tiny_clip_text.json"))),
        "vae": AutoencoderKL.from_config(read_config("tiny_vae_kl.json")),
        "taesd": AutoencoderTiny.from_config(read_config("tiny_taesd_test.json")),
    }
    pipe, taesd = root / "pipe", root / "taesd"
    for name in ("unet", "text_encoder", "vae"):
        saved[name].save_pretrained(pipe / name)
    saved["taesd"].save_pretrained(taesd)
    vocab = write_tokenizer(pipe / "tokenizer")
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps(read_config("sd_turbo_scheduler.json")))
    return pipe, taesd, saved, vocab


def frames(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(n)]


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


# ------------------------------------------------------------------------------------------- local folder
def test_local_folder_with_kl_vae(folders):
    pipe, _, saved, _ = folders
    engine = StreamEngine.from_pretrained(str(pipe), vae="kl", device="cpu", width=W, height=H,
                                          prompt="a red cat", t_index_list=[20, 40])
    comps = engine.components
    # the folder's own weights, not fresh random ones
    for name in ("unet", "text_encoder", "vae"):
        assert same_weights(getattr(comps, name), saved[name]), name
    assert type(comps.vae).__name__ == "AutoencoderKL"
    assert comps.scheduler is SchedulerKind.TURBO  # Euler with trailing spacing
    assert comps.identity["folder"] == os.path.abspath(pipe)
    outs = [engine(f) for f in frames(3)]
    assert all(o.shape == (H, W, 3) and o.dtype == np.uint8 for o in outs)
    assert len({o.tobytes() for o in outs}) == 3
    s = engine.status()
    assert s["model"] == str(pipe) and s["vae"] == "kl" and s["scheduler"] == "turbo"


def test_local_folder_uses_the_clip_tokenizer(folders):
    pipe, _, _, vocab = folders
    comps = load_components(str(pipe), torch.device("cpu"), torch.float32,
                            VaeKind.KL)
    tok = comps.tokenizer
    assert isinstance(tok, ClipTokenizer) and tok.max_length == 77
    ids = tok(["a red cat", "a dog", "A  RED   cat"])  # [3, 77] int64
    assert ids.shape == (3, 77) and ids.dtype == torch.long
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    # BPE with the merges written above: "red" and "cat" are single tokens, then EOS, then EOS padding
    assert ids[0, :5].tolist() == [bos, vocab["a</w>"], vocab["red</w>"], vocab["cat</w>"], eos]
    assert ids[1, :4].tolist() == [bos, vocab["a</w>"], vocab["dog</w>"], eos]
    assert not torch.equal(ids[0], ids[1])
    assert torch.equal(ids[0], ids[2])  # CLIP lower-cases and folds whitespace
    assert (ids[0, 5:] == eos).all()
    # different prompts reach the engine as different embeddings
    emb = comps.text_encoder(ids[:2])[0]
    assert (emb[0] - emb[1]).abs().max() > 1e-3


def test_local_folder_with_tiny_vae_from_a_local_taesd_folder(folders):
    pipe, taesd, saved, _ = folders
    engine = StreamEngine.from_pretrained(str(pipe), vae="tiny", vae_id=str(taesd), device="cpu",
                                          width=W, height=H, prompt="a dog")
    assert type(engine.components.vae).__name__ == "AutoencoderTiny"
    assert same_weights(engine.components.vae, saved["taesd"])
    a, b = frames(2)
    out = engine(a)
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    engine.update_prompt("a red cat")
    assert not np.array_equal(engine(a), out)


def test_local_folder_default_size_follows_the_vae(folders):
    pipe, taesd, _, _ = folders
    comps = load_components(str(pipe), torch.device("cpu"), torch.float32,
                            VaeKind.TINY, vae_id=str(taesd))
    # a 32x32-latent UNet behind a 2x VAE is made for 64x64 pictures (random:tiny says 64 too)
    assert comps.vae_scale_factor == 2
    assert comps.default_size == comps.unet.config.sample_size * comps.vae_scale_factor == 64


def _copy_without(pipe, dst, missing: str) -> str:
    os.makedirs(dst)
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler", "vae"):
        if sub != missing:
            os.symlink(pipe / sub, os.path.join(dst, sub))
    return str(dst)


@pytest.mark.parametrize("missing", ["unet", "text_encoder", "tokenizer", "scheduler"])
def test_folder_missing_a_part(folders, tmp_path, missing):
    pipe, taesd, _, _ = folders
    path = _copy_without(pipe, tmp_path / "broken", missing)
    with pytest.raises(ModelNotFoundError, match=f"it has no {missing}/") as e:
        StreamEngine.from_pretrained(path, vae="tiny", vae_id=str(taesd), device="cpu", width=W, height=H)
    assert path in str(e.value)


def test_folder_missing_vae_with_kl(folders, tmp_path):
    pipe, _, _, _ = folders
    path = _copy_without(pipe, tmp_path / "broken", "vae")
    with pytest.raises(ModelNotFoundError, match="vae/"):
        StreamEngine.from_pretrained(path, vae="kl", device="cpu", width=W, height=H)


def test_folder_without_vae_is_fine_with_a_taesd(folders, tmp_path):
    """vae/ is only read for vae='kl'."""
    pipe, taesd, _, _ = folders
    path = _copy_without(pipe, tmp_path / "no-vae", "vae")
    engine = StreamEngine.from_pretrained(path, vae="tiny", vae_id=str(taesd), device="cpu", width=W, height=H)
    assert engine(frames(1)[0]).shape == (H, W, 3)


def test_empty_folder(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a diffusers Stable Diffusion folder: it has no unet/"):
        StreamEngine.from_pretrained(str(tmp_path), device="cpu", width=W, height=H)


def test_lora_on_a_random_model_is_refused():
    with pytest.raises(ConfigError, match="LoRA"):
        load_components("random:tiny", torch.device("cpu"), torch.float32, lora=(("x.safetensors", 1.0),))


# ------------------------------------------------------------------------------- published architectures
@pytest.mark.parametrize("arch,params", [("sd-turbo", 865_910_724), ("sd15", 859_520_964)])
def test_random_arch_unet_is_the_published_one(arch, params):
    """random:<arch> builds exactly the published UNet (counted on the meta device: no weights made)."""
    from diffusers import UNet2DConditionModel

    cfg = read_config(RANDOM_ARCHS[arch].unet)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    assert next(unet.parameters()).device.type == "meta"
    assert sum(p.numel() for p in unet.parameters()) == params
    # what the engine derives from it: 64-pixel multiples with the 8x VAE, 77 x D text conditioning
    assert len(unet.config.down_block_types) == 4 and unet.config.in_channels == 4
    text = read_config(RANDOM_ARCHS[arch].text_encoder)
    assert unet.config.cross_attention_dim == text["hidden_size"] == {"sd-turbo": 1024, "sd15": 768}[arch]
    assert RANDOM_ARCHS[arch].default_size == 512


def test_published_sdxl_unet_and_taesd():
    from diffusers import AutoencoderTiny, UNet2DConditionModel

    with torch.device("meta"):
        sdxl = UNet2DConditionModel.from_config(read_config("sdxl_unet.json"))
        taesd = AutoencoderTiny.from_config(read_config("taesd.json"))
    assert sum(p.numel() for p in sdxl.parameters()) == 2_567_463_684
    assert sum(p.numel() for p in taesd.parameters()) == pytest.approx(2 * 1.22e6, rel=0.01)


@pytest.mark.parametrize("name,millions", [("clip_vit_l14_text_sd15.json", 123),
                                           ("openclip_vit_h14_text_sd21.json", 340)])
def test_published_text_encoders(name, millions):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = {k: v for k, v in read_config(name).items() if not k.startswith("_") and k != "architectures"}
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**cfg))
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, rel=0.01)


def test_lora_is_fused_into_the_unet(folders, tmp_path):
    """An LCM-LoRA-style adapter file (diffusers format) is fused at load: W' = W + scale * up @ down."""
    pytest.importorskip("peft", reason="LoRA fusing needs peft: pip install rtdiffusion[lora]")
    import copy

    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe, _, saved, _ = folders
    donor = copy.deepcopy(saved["unet"])
    donor.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(7)
    for name, p in donor.named_parameters():
        if "lora" in name:  # peft starts B at zero; a real LoRA has both factors trained
            p.data = torch.randn(p.shape, generator=g) * 0.2
    lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(donor))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=lora)

    engine = StreamEngine.from_pretrained(str(pipe), vae="kl", device="cpu", width=W, height=H,
                                          lora=[(str(tmp_path / "lora"), 0.5)])
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    base = saved["unet"].state_dict()[key + ".weight"]
    expect = base + 0.5 * lora[key + ".lora.up.weight"] @ lora[key + ".lora.down.weight"]
    fused = engine.components.unet.state_dict()[key + ".weight"]
    assert not torch.allclose(fused, base) and torch.allclose(fused, expect, atol=1e-5)
    assert not any("lora" in n for n, _ in engine.components.unet.named_parameters())  # fused, adapters gone
    assert engine.components.identity["lora"] == [[str(tmp_path / "lora"), 0.5]]
    out = engine(frames(1)[0])
    assert out.shape == (H, W, 3)
