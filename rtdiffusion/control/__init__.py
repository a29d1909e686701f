"""Conditioning beyond the prompt: ControlNets (``controlnet.py``, ``stack.py``), their preprocessors
(``preprocess.py``, ``depth.py``) and IP-Adapter (``ip_adapter.py``). Public names are re-exported here;
the other modules' names load on first use, so a module under construction never breaks this import."""

from __future__ import annotations

import importlib
from typing import Any

from .controlnet import RANDOM_CONTROLNETS, ControlNetSpec, build_random_controlnet, load_controlnet, parse_specs
from .stack import ControlStack, NoControl, make_control

_LAZY = {"PreprocessorKind": ".preprocess", "Preprocessor": ".preprocess", "make_preprocessor": ".preprocess",
         "IPAdapterSpec": ".ip_adapter", "IPAdapter": ".ip_adapter"}

__all__ = ["RANDOM_CONTROLNETS", "ControlNetSpec", "ControlStack", "NoControl", "build_random_controlnet",
           "load_controlnet", "make_control", "parse_specs", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
