"""Typed exceptions raised by the library; the CLI turns them into one line and an exit code."""


class MMFusionError(Exception):
    """Base class for every error mmfusion raises on purpose."""


class ConfigError(MMFusionError):
    """A configuration value is unknown, of the wrong type or out of range."""


class DataError(MMFusionError):
    """A sample or data source cannot be read or does not have the expected shape."""


class CheckpointError(MMFusionError):
    """A checkpoint is missing, damaged or incompatible."""
