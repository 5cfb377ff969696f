"""Exceptions and warnings raised by cmda_data.

Every error derives from :class:`CMDAError` *and* from the builtin type a user would
expect (``ValueError``, ``TypeError``, ...), so ``except ValueError`` keeps working.
Messages follow one template, built by :func:`cmda_data.core._validation.fail`::

    "<argument>: expected <what was expected>, got <what was given>"
"""

from __future__ import annotations

__all__ = [
    "BankFormatError",
    "CMDAError",
    "CMDAWarning",
    "ConvergenceWarning",
    "DeviceError",
    "FieldError",
    "MissingDependencyError",
    "NotFittedError",
    "ShapeError",
    "SkippedSamplesWarning",
    "ValidationError",
]


class CMDAError(Exception):
    """Base class of every error raised by cmda_data."""


class ValidationError(CMDAError, ValueError):
    """An argument has a bad value (unknown option, NaN, negative count, ...)."""


class BankFormatError(ValidationError):
    """A saved bank is damaged, tampered with or not a bank (the message names the file)."""


class ShapeError(CMDAError, ValueError):
    """A tensor has the wrong rank or its sizes do not match another argument."""


class FieldError(CMDAError, KeyError, TypeError):
    """A sample field is missing or of the wrong type.

    Derives from ``KeyError`` (missing field) and ``TypeError`` (wrong type) so either
    ``except`` clause catches it. ``str()`` returns the plain message (not ``repr`` as
    ``KeyError`` would).
    """

    def __str__(self) -> str:  # KeyError.__str__ quotes its argument; keep it readable
        return str(self.args[0]) if self.args else ""


class NotFittedError(CMDAError, ValueError, AttributeError):
    """An estimator was used before ``fit`` (scikit-learn's contract)."""


class DeviceError(CMDAError, RuntimeError):
    """A tensor or model is on a device the operation cannot use (e.g. CUDA in a worker)."""


class MissingDependencyError(CMDAError, ImportError):
    """An optional dependency is not installed; the message names the pip extra."""


class CMDAWarning(UserWarning):
    """Something works but probably not as meant (e.g. the GMM chose M = 1: DCA weights inert)."""


class ConvergenceWarning(CMDAWarning):
    """EM stopped at ``max_iter`` before the lower bound changed by less than ``tol``, or found fewer
    distinct clusters than ``n_components`` (scikit-learn's message)."""


class SkippedSamplesWarning(CMDAWarning):
    """A stream skipped corrupt or unsafe members (the message says how many and why)."""
