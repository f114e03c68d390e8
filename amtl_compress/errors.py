"""Exceptions raised by amtl-compress.

Every error the user can cause derives from :class:`AmtlError`; its message is one line that names
the culprit (file, column, module) and says how to fix it. The CLI prints it as ``Error: ...`` and
exits with code 1.
"""

from __future__ import annotations


class AmtlError(Exception):
    """Root of all amtl-compress errors."""


class NoMatchingModuleError(AmtlError, ValueError):
    """A target name matched no embedding module of the model."""


class CheckpointError(AmtlError, ValueError):
    """A checkpoint is missing, unreadable, unsafe, or does not fit the model."""


class DataError(AmtlError, ValueError):
    """A data file is missing columns, has out-of-range ids, NaNs, bad labels, ..."""


class PackedFormatError(AmtlError, ValueError):
    """A packed table file or directory violates docs/format.md."""


class RunDirError(AmtlError, ValueError):
    """A run directory is missing, incomplete, or from an incompatible version."""


class KernelBuildError(AmtlError, RuntimeError):
    """The compiled lookup kernel could not be built (e.g. no C++ compiler)."""


class TrainingError(AmtlError, RuntimeError):
    """Training hit a numerical fault (NaN/inf loss) or a degenerate AMTL state."""


class ConfigError(AmtlError, ValueError):
    """A configuration (command-line options, a dataclass config) is invalid."""


class OutputExistsError(AmtlError, FileExistsError):
    """An output file or directory exists and ``overwrite`` was not asked for."""


class SurgeryError(AmtlError, ValueError):
    """A request to attach or detach AMTL layers that cannot be honoured as given."""
