"""Errors raised at the engine's boundaries. Each message names what was expected."""


class RtDiffusionError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(RtDiffusionError, ValueError):
    """A setting is out of range or of the wrong kind; the engine's state is unchanged."""


class FrameError(RtDiffusionError, ValueError):
    """A frame has the wrong shape, dtype, size or device; the engine's state is unchanged."""


class ModelNotFoundError(RtDiffusionError, FileNotFoundError):
    """A model id or folder could not be found locally and could not be downloaded."""
