"""User-facing errors: the CLI prints their message on one line, no traceback."""


class CnnstressError(Exception):
    """A problem the user can fix; the message names it and the fix."""


class ConfigError(CnnstressError, ValueError):
    """An invalid profile, preset or hyperparameter."""


class DataError(CnnstressError):
    """CIFAR-10 files missing, truncated or not what they claim to be."""


class CheckpointError(CnnstressError):
    """A checkpoint that does not fit this run (config, architecture, corrupt)."""


class TrainingDiverged(CnnstressError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class DeviceError(CnnstressError):
    """A device that this machine does not have."""
