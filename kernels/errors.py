"""Errors raised on the host side of the kernels package (device code reports status codes)."""

from __future__ import annotations


class KernelsError(Exception):
    """Root of the errors raised by :mod:`kernels`."""


class EventFormatError(KernelsError, ValueError):
    """A packed event is malformed: wrong magic, version, lengths or dtypes."""


class DetectorMismatchError(KernelsError, ValueError):
    """An event was made for another detector (fingerprints differ) or names unknown modules."""


class ConfigError(KernelsError, ValueError):
    """A stage configuration holds an invalid value."""
