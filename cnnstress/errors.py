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


class FaithfulnessError(CnnstressError, ValueError):
    """A deletion/insertion request with inconsistent shapes, dtypes or options."""


class GradCAMError(CnnstressError, ValueError):
    """A Grad-CAM(++) request that cannot be served: wrong layer, targets, inputs."""


class ResultFormatError(CnnstressError, ValueError):
    """A saved result (cache, metrics.json) whose structure does not fit its Record type."""


class OutputInUse(CnnstressError):
    """Another process is writing to the same output folder."""


class SanityError(CnnstressError, ValueError):
    """A sanity-check request with bad maps, options or steps."""


def show_errors_briefly() -> bool:
    """In IPython/Jupyter, show a CnnstressError as one line `error: ...`, as
    the command line does, instead of a traceback (the message names the
    problem and the fix; the stack adds nothing). Returns whether installed."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None:
        return False

    def one_line(_shell, _etype, value, _tb, tb_offset=None):
        import sys
        print(f"error: {value}", file=sys.stderr)   # the cell still fails, so Run All stops there
        return []
    shell.set_custom_exc((CnnstressError,), one_line)
    return True
