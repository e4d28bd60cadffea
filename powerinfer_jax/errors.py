"""One small hierarchy for every error a user can cause: bad arguments, files or bundles.

Each is a `ValueError` (so older `except ValueError` code keeps working) and a `PowerInferError`,
which is what the CLIs catch to print one line and exit with status 2.
"""

from __future__ import annotations


class PowerInferError(ValueError):
    """Base of every error caused by the input (arguments, files, bundles), not by a bug."""


class BundleError(PowerInferError):
    """A prepared folder that is missing pieces or does not match its model."""
