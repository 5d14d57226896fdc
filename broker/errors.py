"""Errors of the fleet's host side: a small rooted hierarchy (style guide pattern 12).

``FleetError > {ProtocolError > {DecodeError, VersionError, OversizedError}, BrokerError > WorkerLost,
ConfigError}``. A :class:`ProtocolError` carries the wire :class:`~broker.protocol.ErrorCode` that the
receiver puts in its error reply, so that validation and the reply share one source of truth.
"""

from __future__ import annotations


class FleetError(Exception):
    """Root of the errors raised by the broker, worker and producer service code."""


class ProtocolError(FleetError):
    """A message broke the wire protocol.

    Attributes:
        code: the wire error code (a :class:`broker.protocol.ErrorCode` value) for the error reply.
    """

    code = "malformed"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class DecodeError(ProtocolError):
    """Frames could not be decoded: missing frames, bad signature, bad header, wrong field types."""

    code = "malformed"


class VersionError(ProtocolError):
    """The peer speaks another version of the protocol."""

    code = "version"


class OversizedError(ProtocolError):
    """A message exceeds the configured size or frame-count limit."""

    code = "oversized"


class BrokerError(FleetError):
    """Failure inside the broker."""


class WorkerLost(BrokerError):
    """A worker died or stalled while holding events."""


class ConfigError(FleetError, ValueError):
    """A service configuration holds an invalid value."""
