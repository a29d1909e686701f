"""TouchDesigner / OSC bridge: shared-memory frame rings, OSC control and status, async readback."""
