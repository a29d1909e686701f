"""Write a diffusers SDXL model as ONE checkpoint in the original Stability layout (as users download
SDXL fine-tunes), for the single-file loading test. The inverse of diffusers' own single-file converters:
the test checks that the loader, through those converters, gets every tensor back unchanged."""

from __future__ import annotations

import torch

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
_TOP = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),
        ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2.")]


def unet_prefixes(cfg) -> list[tuple[str, str]]:
    """(diffusers prefix, original prefix) for every block of a UNet2DConditionModel config."""
    L, n = cfg["layers_per_block"], len(cfg["block_out_channels"])
    out = list(_TOP)
    for i in range(n):
        for j in range(L):
            out += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{(L + 1) * i + j + 1}.0."),
                    (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{(L + 1) * i + j + 1}.1.")]
        if i < n - 1:
            out.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(L + 1) * (i + 1)}.0.op."))
        for j in range(L + 1):
            out += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{(L + 1) * i + j}.0."),
                    (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{(L + 1) * i + j}.1.")]
        if i < n - 1:
            attn = cfg["up_block_types"][i].startswith("CrossAttn")
            out.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(L + 1) * i + L}.{2 if attn else 1}."))
    out += [("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
            ("mid_block.resnets.1.", "middle_block.2.")]
    return out


def unet_to_original(sd: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    prefixes = unet_prefixes(cfg)
    out = {}
    for key, value in sd.items():
        dp, op = max(((d, o) for d, o in prefixes if key.startswith(d)), key=lambda x: len(x[0]))
        rest = key[len(dp):]
        if ".resnets." in dp:
            for a, b in _RESNET:
                if rest.startswith(a + "."):
                    rest = b + rest[len(a):]
        out["model.diffusion_model." + op + rest] = value
    return out


def clip_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"conditioner.embedders.0.transformer." + k: v for k, v in sd.items()}


def open_clip_to_original(sd: dict[str, torch.Tensor], prefix: str = "conditioner.embedders.1.model.") -> dict:
    out = {prefix + "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           prefix + "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           prefix + "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           prefix + "ln_final.bias": sd["text_model.final_layer_norm.bias"],
           prefix + "text_projection": sd["text_projection.weight"].T.contiguous()}
    n = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers."))
    for i in range(n):
        a, b = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[b + f"attn.in_proj_{p}"] = torch.cat([sd[a + f"self_attn.{x}_proj.{p}"] for x in "qkv"])
            out[b + f"attn.out_proj.{p}"] = sd[a + f"self_attn.out_proj.{p}"]
            out[b + f"ln_1.{p}"] = sd[a + f"layer_norm1.{p}"]
            out[b + f"ln_2.{p}"] = sd[a + f"layer_norm2.{p}"]
            out[b + f"mlp.c_fc.{p}"] = sd[a + f"mlp.fc1.{p}"]
            out[b + f"mlp.c_proj.{p}"] = sd[a + f"mlp.fc2.{p}"]
    return out
