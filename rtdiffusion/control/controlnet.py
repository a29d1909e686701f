"""ControlNet units: what the user asks for (:class:`ControlNetSpec`) and loading the network it names.

A spec names the ControlNet (``random:controlnet-sd15|sd21|sdxl``, the CPU-test ``random:controlnet-tiny`` /
``random:controlnet-tiny-sdxl``, a hub id, a local diffusers folder or one ``.safetensors`` file), its
preprocessor (``rtdiffusion/control/preprocess.py``: canny, tile, depth, external; or a ready preprocessor
object) and its starting live settings (``config.ControlNetSettings``: scale, start, end, enabled).

A ControlNet must belong to the model's family: its cross-attention width, added conditioning and block
widths must be the UNet's (its residuals are added to the UNet's skip connections), else a ConfigError names
both families. ``random:`` ControlNets are the published architectures (configs in ``models/configs/``)
with seeded random weights; diffusers zero-initialises a ControlNet's output convolutions ("zero convs"),
which would make every residual 0 and every test pass trivially, so they are re-randomised here.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..config import ControlNetSettings
from ..errors import ConfigError, ModelNotFoundError
from ..models.families import family_of
from ..models.loading import RANDOM_PREFIX, _ready, _strip, read_config, resolve_model_folder
from ..models.random_init import seeded_rng
from .preprocess import PreprocessorKind, parse_kind, parse_options

log = logging.getLogger(__name__)

# random:<name> -> packaged architecture config
RANDOM_CONTROLNETS = {
    "controlnet-sd15": "controlnet_sd15.json",  # lllyasviel/control_v11p_sd15_* (361 M parameters)
    "controlnet-sd21": "controlnet_sd21.json",  # SD 2.1 / sd-turbo ControlNets (364 M)
    "controlnet-sdxl": "controlnet_sdxl.json",  # diffusers/controlnet-canny-sdxl-1.0 (1.25 G)
    "controlnet-tiny": "tiny_controlnet_sd2style.json",  # CPU tests, for random:tiny
    "controlnet-tiny-sdxl": "tiny_controlnet_sdxl_style.json",  # CPU tests, for random:tiny-sdxl
}
# the packaged config a single .safetensors ControlNet is read with, by the model's family (offline)
SINGLE_FILE_CONFIGS = {"sd15": "controlnet_sd15.json", "sd21": "controlnet_sd21.json", "sdxl": "controlnet_sdxl.json"}

PREPROCESSOR_KINDS = tuple(k.value for k in PreprocessorKind)  # canny, tile, depth, external
SPEC_KEYS = ("model", "preprocessor", "scale", "start", "end", "enabled", "preprocessor_options")
# the parts of a config a ControlNet must share with the UNet it feeds
FAMILY_FIELDS = ("cross_attention_dim", "addition_embed_type", "block_out_channels")


@dataclass(frozen=True)
class ControlNetSpec:
    """One ControlNet of an engine, as given to ``StreamEngine.from_pretrained(controlnets=...)``.

    preprocessor: a kind name (canny, tile, depth, external) made by ``control.preprocess.make_preprocessor``
    with ``preprocessor_options``, or a ready preprocessor object (``__call__(image, out)``, see preprocess.py).
    """

    model: str
    preprocessor: Any = "canny"
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    enabled: bool = True
    preprocessor_options: tuple[tuple[str, Any], ...] = ()

    def settings(self) -> ControlNetSettings:
        return ControlNetSettings(self.scale, self.start, self.end, self.enabled)

    @property
    def preprocessor_name(self) -> str:
        p = self.preprocessor
        if isinstance(p, str):
            return p
        kind = getattr(p, "kind", None)
        return str(getattr(kind, "value", kind) or type(p).__name__)

    @staticmethod
    def parse(value: Any, index: int = 0) -> "ControlNetSpec":
        """A spec, a dict with keys among SPEC_KEYS, or a plain model string (canny, defaults)."""
        where = f"controlnets[{index}]"
        if isinstance(value, ControlNetSpec):
            value = {k: getattr(value, k) for k in SPEC_KEYS}
            value["preprocessor_options"] = dict(value["preprocessor_options"])
        elif isinstance(value, str):
            value = {"model": value}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a model string or a dict with keys among {', '.join(SPEC_KEYS)}; "
                              f"got {type(value).__name__}")
        unknown = set(value) - set(SPEC_KEYS)
        if unknown or "model" not in value:
            raise ConfigError(f"{where} needs 'model' and takes keys among {', '.join(SPEC_KEYS)}; got "
                              f"{sorted(value)}")
        model, pre = value["model"], value.get("preprocessor", "canny")
        if not isinstance(model, str) or not model:
            raise ConfigError(f"{where}: model must be a random:controlnet-* name, a hub id, a folder or a "
                              f".safetensors file; got {model!r}")
        if not isinstance(pre, str) and not callable(pre):
            raise ConfigError(f"{where}: preprocessor must be one of {', '.join(PREPROCESSOR_KINDS)} or a "
                              f"preprocessor object; got {pre!r}")
        options = value.get("preprocessor_options") or {}
        if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
            raise ConfigError(f"{where}: preprocessor_options must be a dict of option names; got {options!r}")
        if isinstance(pre, str):  # kind and options checked here, before any weights load (preprocess.py)
            try:
                pre = parse_kind(pre).value
                parse_options(pre, options)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        try:
            live = ControlNetSettings(**{k: value[k] for k in ("scale", "start", "end", "enabled") if k in value})
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        return ControlNetSpec(model, pre, live.scale, live.start, live.end, live.enabled,
                              tuple(sorted(options.items())))


def parse_specs(controlnets: Any) -> tuple[ControlNetSpec, ...]:
    """``from_pretrained(controlnets=...)``: a sequence of specs / dicts / model strings (None or () for none)."""
    if controlnets is None:
        return ()
    if isinstance(controlnets, (str, Mapping, ControlNetSpec)):
        controlnets = [controlnets]
    if not isinstance(controlnets, (list, tuple)):
        raise ConfigError(f"controlnets must be a list of ControlNet dicts or model names; got "
                          f"{type(controlnets).__name__}")
    return tuple(ControlNetSpec.parse(v, i) for i, v in enumerate(controlnets))


# ------------------------------------------------------------------------------------------- loading
def build_random_controlnet(name: str, *, seed: int = 0, device: torch.device | str = "cpu") -> torch.nn.Module:
    """``random:<name>`` with seeded random weights, zero convs included. device "meta" builds no weights."""
    from diffusers import ControlNetModel

    cfg = RANDOM_CONTROLNETS.get(name)
    if cfg is None:
        raise ConfigError(f"unknown random ControlNet {RANDOM_PREFIX + name!r}; expected one of "
                          f"{', '.join(RANDOM_PREFIX + k for k in RANDOM_CONTROLNETS)}")
    device = torch.device(device)
    with seeded_rng(seed, device), device:
        model = ControlNetModel.from_config(_strip(read_config(cfg)))
        for conv in (*model.controlnet_down_blocks, model.controlnet_mid_block,
                     model.controlnet_cond_embedding.conv_out):
            conv.reset_parameters()  # diffusers zero-initialises these; random residuals test something
    return model


def load_controlnet(model: str, device: torch.device, dtype: torch.dtype, unet_config: Mapping[str, Any], *,
                    seed: int = 0, local_files_only: bool | None = None) -> torch.nn.Module:
    """Load one ControlNet onto ``device`` in ``dtype`` and check it fits the UNet (ConfigError naming both
    families otherwise)."""
    if model.startswith(RANDOM_PREFIX):
        name = model[len(RANDOM_PREFIX):]
        if name in RANDOM_CONTROLNETS:  # checked before any weights are made
            check_family(read_config(RANDOM_CONTROLNETS[name]), unet_config, model)
        module = build_random_controlnet(name, seed=seed, device=device)
    elif model.lower().endswith(".safetensors"):
        module = _single_file(model, dtype, unet_config, local_files_only)
    else:
        from diffusers import ControlNetModel

        root = resolve_model_folder(model, local_files_only=local_files_only, subfolders=())
        sub = "controlnet" if os.path.isfile(os.path.join(root, "controlnet", "config.json")) else None
        config_path = os.path.join(root, sub or "", "config.json")
        if not os.path.isfile(config_path):
            raise ModelNotFoundError(f"{root!r} is not a diffusers ControlNet folder: it has no config.json "
                                     "(nor controlnet/config.json)")
        with open(config_path) as f:
            check_family(json.load(f), unet_config, model)
        module = ControlNetModel.from_pretrained(root, subfolder=sub, torch_dtype=dtype)
    check_family(module.config, unet_config, model)
    return _ready(module.to(device), dtype)


def _single_file(path: str, dtype: torch.dtype, unet_config: Mapping[str, Any],
                 local_files_only: bool | None) -> torch.nn.Module:
    """A ControlNet in one .safetensors file (original or diffusers key layout), read with the packaged config
    of the model's family, so no config is fetched from the hub."""
    from diffusers import ControlNetModel

    if not os.path.isfile(path):
        raise ModelNotFoundError(f"ControlNet file {path!r} does not exist")
    if not hasattr(ControlNetModel, "from_single_file"):
        raise ConfigError(f"ControlNet {path!r}: this diffusers ({_diffusers_version()}) cannot read single-file "
                          "ControlNets (ControlNetModel.from_single_file); convert it to a diffusers folder")
    family = family_of(unet_config).name.value
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(_strip(read_config(SINGLE_FILE_CONFIGS[family])), f)
        try:
            return ControlNetModel.from_single_file(path, config=folder, torch_dtype=dtype,
                                                    local_files_only=True if local_files_only is None
                                                    else local_files_only)
        except Exception as exc:  # noqa: BLE001 - diffusers' conversion raises many kinds
            raise ConfigError(f"ControlNet file {path!r} could not be read as a {family} ControlNet: "
                              f"{type(exc).__name__}: {exc}") from exc


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def describe_family(config: Mapping[str, Any]) -> str:
    fields = ", ".join(f"{k} {config.get(k)!r}" for k in FAMILY_FIELDS)
    return f"{family_of(config).name.value} ({fields})"


def check_family(controlnet_config: Mapping[str, Any], unet_config: Mapping[str, Any], model: str) -> None:
    """ConfigError naming both families unless the ControlNet's residuals and conditioning fit the UNet."""
    def norm(cfg, key):
        v = cfg.get(key)
        return [int(x) for x in v] if key == "block_out_channels" else v

    if any(norm(controlnet_config, k) != norm(unet_config, k) for k in FAMILY_FIELDS):
        raise ConfigError(f"ControlNet {model!r} is made for {describe_family(controlnet_config)}, but the model "
                          f"is {describe_family(unet_config)}; use a ControlNet of the model's family")
