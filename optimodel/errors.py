"""Errors that the command line turns into one clear line and an exit code.

Library code raises these instead of printing; the CLI maps `exit_code` to the
process status (1 work failed, 2 bad usage, 3 a gate failed; see the README).
"""

from __future__ import annotations


class OptimodelError(Exception):
    """The work failed: a bad model, a pass error, a verification mismatch."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(OptimodelError):
    """The command line itself is wrong (a malformed option value)."""

    exit_code = 2


class ModelLoadError(OptimodelError):
    """The model file cannot be read, parsed or trusted."""


class DataError(OptimodelError):
    """An input / calibration / evaluation data file is unusable for this model."""


class VerificationError(OptimodelError):
    """A result differs from its reference beyond the tolerance."""


class GateFailed(OptimodelError):
    """A CI gate (accuracy drop, latency budget) was exceeded."""

    exit_code = 3
