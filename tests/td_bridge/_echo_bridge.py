"""A real bridge process with an echo engine (the bridge and its rings are under test, not the model; the
real model runs in test_bridge_process.py). Loads in well under a second, so a test can kill and restart it.

Usage: python _echo_bridge.py OSC_OUT_PORT INPUT_NAME OUTPUT_NAME [--checksum]
"""

import logging
import sys

from td_bridge.bridge import Bridge, BridgeConfig


class Echo:
    """An engine that returns its input: width, height, __call__, update, update_seed, status."""

    def __init__(self, width=16, height=16):
        self.width, self.height, self.calls = width, height, 0

    def __call__(self, rgb):
        self.calls += 1
        return rgb.copy()

    def update(self, **kw):
        pass

    def update_seed(self, seed):
        pass

    def status(self):
        return {}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    port, input_name, output_name = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    cfg = BridgeConfig(osc_in_port=0, osc_out_port=port, input_name=input_name, output_name=output_name,
                       checksum="--checksum" in sys.argv)
    sys.exit(Bridge(cfg, Echo).serve())
