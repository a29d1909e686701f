"""What `rtdiffusion td` was asked for: ports, ring names and geometry, engine options, conditioning."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .ring import PixelFormat, RowOrder


@dataclass(frozen=True)
class BridgeConfig:
    """What `rtdiffusion td` was asked for. Engine options go to StreamEngine.from_pretrained unchanged.

    slots: ring depth; more slots let a slow reader lag further behind a fast writer without retries.
    checksum: slots carry crc32 (about 0.3 ms a 512x512 frame each side); turn on for ARM hosts.
    """

    model: str = "random:tiny"
    width: int | None = None
    height: int | None = None
    osc_host: str = "127.0.0.1"  # where /server_active, /status, /error... are sent
    osc_listen: str = "127.0.0.1"
    osc_in_port: int = 8247
    osc_out_port: int = 8248
    input_name: str | None = None
    output_name: str | None = None
    pixel_format: PixelFormat = PixelFormat.RGBA8
    row_order: RowOrder = RowOrder.TOP_DOWN
    slots: int = 3
    checksum: bool = False
    engine_options: dict[str, Any] = field(default_factory=dict)
    control_name: str | None = None  # ring of the 'external' ControlNets' images (made when there is one)
    style_name: str | None = None  # ring of the IP-Adapter's style image (made when there is an IP-Adapter)
    style_image: Any = None  # what engine.set_style_image takes, set once after loading (--style-image)

    @property
    def external_controlnets(self) -> tuple[int, ...]:
        """Indices of the ControlNets whose control image comes from the control ring."""
        nets = self.engine_options.get("controlnets") or ()
        return tuple(i for i, n in enumerate(nets) if isinstance(n, dict) and n.get("preprocessor") == "external")

    @property
    def extra_rings(self) -> tuple[str, ...]:
        return ((("/ring/control",) if self.external_controlnets else ())
                + (("/ring/style",) if self.engine_options.get("ip_adapter") else ()))

    def __post_init__(self) -> None:
        for name in ("osc_in_port", "osc_out_port"):
            v = getattr(self, name)
            lo = 0 if name == "osc_in_port" else 1
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= 65535:
                raise ValueError(f"--{name.replace('_', '-')} must be a port number from {lo} to 65535; got {v!r}")
        for name in ("input_name", "output_name", "control_name", "style_name"):
            v = getattr(self, name)
            if v is not None and (not v or len(v) > 30 or not all(c.isalnum() or c in "_-." for c in v)):
                flag = {"control_name": "control_ring", "style_name": "style_ring"}.get(name, name)
                raise ValueError(f"--{flag.replace('_', '-')} must be 1 to 30 letters, digits, '_', '-' or '.' "
                                 f"(a shared-memory name that works on Windows, macOS and Linux); got {v!r}")
        if not isinstance(self.slots, int) or not 1 <= self.slots <= 16:
            raise ValueError(f"slots must be an integer from 1 to 16; got {self.slots!r}")
