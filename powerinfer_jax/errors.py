"""One small hierarchy for every error a user can cause: bad arguments, files or bundles.

Each is a `ValueError` (so older `except ValueError` code keeps working) and a `PowerInferError`,
which is what the CLIs catch to print one line and exit with status 2 (`powerinfer_jax.cli`).

    PowerInferError (ValueError)
      ArgumentError            a bad argument or flag value (type, range, choice, prompt too long)
      PathNotFoundError        a file or folder that does not exist (also a FileNotFoundError)
      CheckpointError          model files missing, corrupt, or contradicting config.json
        TensorFileError        a safetensors file that is truncated or has a corrupt header
      UnsupportedModelError    an architecture, activation or option the engine does not run
      NonFiniteError           NaN/Inf in the weights (load-time scan) or in the logits (each step)
      BundleError              a prepared bundle missing pieces or made for another model/version
      (offline: ProfileError, EvalError, CorpusError, BudgetTooSmallError)

Messages are one line that names the problem and the fix. The classes live here; the older
import places (`loading.CheckpointError`, `config.UnsupportedModelError`, ...) re-export them.
"""

from __future__ import annotations


class PowerInferError(ValueError):
    """Base of every error caused by the input (arguments, files, bundles), not by a bug."""


class ArgumentError(PowerInferError):
    """An argument (API) or flag (CLI) with a wrong type or value."""


class PathNotFoundError(PowerInferError, FileNotFoundError):
    """A model folder, bundle or input file that does not exist."""

    def __str__(self) -> str:  # OSError would print "[Errno None] ..." for some argument shapes
        return str(self.args[0]) if self.args else ""


class CheckpointError(PowerInferError):
    """A checkpoint that cannot be loaded: missing, truncated, or not matching its config."""


class TensorFileError(CheckpointError):
    """A safetensors file that is truncated, corrupt, or uses an unsupported dtype."""


class UnsupportedModelError(PowerInferError):
    """Raised for an architecture, activation or option this engine does not run."""


class NonFiniteError(PowerInferError):
    """NaN or Inf found in a weight (load-time scan) or in the logits of a step."""


class BundleError(PowerInferError):
    """A prepared folder that is missing pieces or does not match its model."""
