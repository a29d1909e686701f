"""One vocabulary for every interface: the friendly ``strength`` / ``steps`` pair, and how errors name things.

``strength`` and ``steps``, and how they map to the expert's ``t_index_list``:

    strength  0 keeps the input, 1 restyles it fully (how much noise the first step adds)
    steps     denoising steps per frame (the stream batch S): more steps, better pictures, S x the UNet work
    t_index_list  the expert form: indices into the scheduler's N timesteps, noisiest first

The mapping (the same in the Python API, every subcommand, OSC and the web app, all of which call this):

    first = min(round((1 - strength) * (N - 1)), N - steps)      # the noisiest step
    t_index_list = first, then steps - 1 more spread evenly between it and N, strictly increasing

and back: ``strength = 1 - t_index_list[0] / (N - 1)``, ``steps = len(t_index_list)``. The defaults
(strength 0.35, steps 1, N = 50) give ``[32]``, the engine's default ``t_index_list``.

Errors name an argument as the interface the user typed it in spells it: ``device='cpu'`` in the Python
API, ``--device cpu`` on the command line (see :func:`spell` and :func:`cli_spelling`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator, Sequence

from .errors import ConfigError

DEFAULT_STRENGTH = 0.35
DEFAULT_STEPS = 1
MAX_STEPS = 16  # the most denoising steps a stream batch may hold (StreamSettings.validate)


def check_strength(value: Any, what: str = "strength") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{what} must be a number from 0 (keep the input) to 1 (restyle fully); got {value!r}")
    return float(value)


def check_steps(value: Any, num_inference_steps: int, what: str = "steps") -> int:
    top = min(MAX_STEPS, num_inference_steps)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
        raise ConfigError(f"{what} must be an integer from 1 to {top}; got {value!r}")
    return value


def t_index_for(strength: float, steps: int, num_inference_steps: int) -> list[int]:
    """``t_index_list`` for a strength (0..1) and a number of steps, as the module docstring says."""
    n = num_inference_steps
    steps = max(1, min(int(steps), n))
    first = min(round((1.0 - strength) * (n - 1)), n - steps)
    out = [first + round(i * (n - first) / steps) for i in range(steps)]
    for i in range(1, steps):  # rounding may repeat an index: keep them strictly increasing
        out[i] = max(out[i], out[i - 1] + 1)
    return out


def strength_of(t_index_list: Sequence[int], num_inference_steps: int) -> float:
    """The strength a ``t_index_list`` corresponds to (its first, noisiest index)."""
    if num_inference_steps <= 1:
        return 1.0
    return round(1.0 - t_index_list[0] / (num_inference_steps - 1), 4)


# ---- how an error names an argument: the API's `name=value`, or the CLI's `--flag value` ---------------------
# The CLI validates and builds engines inside `cli_spelling()`; everywhere else (the Python API, and OSC or the
# web app while an engine runs, on their own threads) errors name the API's arguments.
_SPELLING: contextvars.ContextVar[str] = contextvars.ContextVar("rtdiffusion_spelling", default="api")
CLI_FLAGS = {"guidance_scale": "--guidance", "similar_threshold": "--similar-filter",
             "similar_filter": "--similar-filter"}  # the rest: --name-with-dashes


@contextlib.contextmanager
def cli_spelling() -> Iterator[None]:
    """Within this block (this thread), errors name command-line flags instead of API arguments."""
    token = _SPELLING.set("cli")
    try:
        yield
    finally:
        _SPELLING.reset(token)


def spell(name: str, value: Any = None) -> str:
    """``name`` (an API argument, e.g. "device") as the current interface spells it, with ``value`` if given:
    API ``device='cpu'``, CLI ``--device cpu``. Names that are not identifiers are returned as they are."""
    if _SPELLING.get() == "cli" and name.isidentifier():
        flag = CLI_FLAGS.get(name, "--" + name.replace("_", "-"))
        return flag if value is None else f"{flag} {value}"
    return name if value is None else f"{name}={value!r}"
