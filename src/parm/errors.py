"""The one exception tree of ParM.

Every error the library raises on purpose is a :class:`ParmError`. Each carries structured
fields (so callers and the HTTP edge can act on them) and a message that says what was wrong
and what to do about it.

::

    ParmError
     ├── ConfigError          (also ValueError)  a configuration value is invalid: field, value
     ├── ShapeError           (also ValueError)  a tensor has the wrong shape/dtype: expected, got
     ├── DataError                               a dataset file is missing or unreadable: path
     │    └── ChecksumError                      a file's checksum differs: path, expected, actual
     ├── CheckpointError                         a checkpoint is missing, partial or unreadable: path
     │    └── CheckpointMismatchError            a checkpoint does not fit its use: field, expected, got
     ├── TrainingError                           training cannot go on
     │    └── NonFiniteLossError                 loss became NaN/inf: epoch, step, last_good
     └── ServingError                            a query could not be served
          ├── BadQueryError       (also ValueError)  the query is malformed: field          -> HTTP 400/422
          ├── OverloadedError                    queue or body limit reached: limit         -> HTTP 429/503
          ├── DeadlineExceededError              no answer within the deadline: deadline_s  -> HTTP 504
          └── InstanceFailedError                an instance died or stopped answering: instance
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class ParmError(Exception):
    """Base class of every error ParM raises on purpose."""


class ConfigError(ParmError, ValueError):
    """A configuration value is invalid."""

    def __init__(self, message: str, *, field: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.field = field
        self.value = value


class ShapeError(ParmError, ValueError):
    """A tensor has the wrong shape or dtype for the operation."""

    def __init__(self, message: str, *, expected: Any = None, got: Any = None) -> None:
        super().__init__(message)
        self.expected = expected
        self.got = got


class DataError(ParmError):
    """A dataset file is missing, truncated or not in the expected format."""

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)


class ChecksumError(DataError):
    """A file's checksum differs from the expected one."""

    def __init__(
        self, message: str, *, path: str | Path, expected: str, actual: str
    ) -> None:
        super().__init__(message, path=path)
        self.expected = expected
        self.actual = actual


class CheckpointError(ParmError):
    """A checkpoint is missing, incomplete or unreadable."""

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)


class CheckpointMismatchError(CheckpointError):
    """A checkpoint does not match what it is used with (field names the mismatch)."""

    def __init__(
        self, message: str, *, field: str, expected: Any, got: Any, path: str | Path | None = None
    ) -> None:
        super().__init__(message, path=path)
        self.field = field
        self.expected = expected
        self.got = got


class TrainingError(ParmError):
    """Training cannot go on."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    def __init__(
        self, message: str, *, epoch: int, step: int, last_good: str | Path | None
    ) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.step = step
        self.last_good = None if last_good is None else Path(last_good)


class ServingError(ParmError):
    """A query could not be served."""


class BadQueryError(ServingError, ValueError):
    """The query is malformed (shape, dtype, values, encoding); ``status`` is 400 or 422."""

    def __init__(self, message: str, *, field: str | None = None, status: int = 422) -> None:
        super().__init__(message)
        self.field = field
        self.status = status


class OverloadedError(ServingError):
    """The server refuses work it could not finish in time (queue or size limit reached)."""

    def __init__(self, message: str, *, limit: str, status: int = 503) -> None:
        super().__init__(message)
        self.limit = limit
        self.status = status


class ModelFailedError(ServingError):
    """The model could not answer this query: it raised (``status`` 500, ``kind`` ``model_error``), or
    its scores were not finite (422, ``non_finite_output``: the query's values are far outside what
    the model was trained on)."""

    def __init__(self, message: str, *, status: int = 500, kind: str = "model_error") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


class DeadlineExceededError(ServingError):
    """No answer (original, reconstructed or retried) arrived within the query's deadline."""

    def __init__(self, message: str, *, deadline_s: float) -> None:
        super().__init__(message)
        self.deadline_s = deadline_s


class InstanceFailedError(ServingError):
    """A model instance died or stopped answering."""

    def __init__(self, message: str, *, instance: int) -> None:
        super().__init__(message)
        self.instance = instance
