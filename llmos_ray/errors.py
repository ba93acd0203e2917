"""The exceptions llmos-ray raises on purpose. Each message says what to change."""


class LlmosError(Exception):
    """Base class of every error llmos-ray raises for a user to act on."""


class ConfigError(LlmosError, ValueError):
    """A config file, key or value is wrong."""


class DataError(LlmosError):
    """A corpus or dataset cannot be read, or has too many bad records."""


class ModelError(LlmosError):
    """A model preset, directory or hub id cannot be resolved or loaded."""


class CheckpointError(LlmosError):
    """A checkpoint is missing, incomplete or does not match the run."""


class ClusterError(LlmosError):
    """A local cluster could not be started or found, or a submitted job did not succeed."""
