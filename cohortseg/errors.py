"""Error types. Data problems are InputError: caught per subject, recorded, never fatal for the cohort."""
from __future__ import annotations


class CohortsegError(Exception):
    """Base class."""


class InputError(CohortsegError):
    """A problem with one subject's data (corrupt file, empty mask, ...).

    `reason` is a short human sentence; `path` the offending file when known. The workflow adds the
    participant/session when it records the failure.
    """

    def __init__(self, reason: str, path=None):
        self.reason = reason
        self.path = str(path) if path is not None else None
        super().__init__(f"{reason}" + (f" [{self.path}]" if self.path else ""))


class AnatomyError(InputError):
    """The image does not show the pipeline's anatomy (a brain scan given to a cord pipeline, a cord
    scan given to a brain pipeline, a field of view that misses the structure): recorded as
    ``refused``, not ``failed``. `reason` names the criterion that failed and its measured value."""


class ConfigError(CohortsegError):
    """Invalid configuration; raised before any job runs."""


class ModelError(CohortsegError):
    """A model card or model file is missing, corrupt or inconsistent."""
