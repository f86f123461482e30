"""The one error type for mistakes a user can fix: bad params, unusable data, a missing source, a failed gate.

`tgm <stage>` prints a `UserError` as one line (`tgm <stage>: error: ...`) and exits non-zero, with no traceback;
the Prefect flow reads that line and does not retry the stage, since the same inputs would fail the same way.
Anything else is a bug or a crash, and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the inputs (params, data, environment) that the message names and the user can fix."""

    exit_code = 1


class SourceMissing(UserError, FileNotFoundError):
    """A data source, folder or file the params point to does not exist."""


class DeviceUnavailable(UserError):
    """The params ask for a device this machine does not have."""


class TrainingDiverged(UserError, FloatingPointError):
    """The loss became NaN or infinite; a smaller learning rate or gradient clipping usually cures it."""


class EmptySplit(UserError):
    """A split a stage needs has no images."""


class SourceChanged(UserError):
    """A file ingest listed is gone or holds other bytes now: the data changed after `ingest` ran."""


class BaseMismatch(UserError):
    """A pretrained base (base.path) that does not fit the task: another architecture, image size, palette or
    colour mode."""
