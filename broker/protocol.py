"""The trackfleet wire protocol, version 1 (specification: ``docs/protocol.md``).

Every message is one ZeroMQ multipart message of the form::

    [signature, command, header, *payload]

- ``signature``: ``b"TFP1"`` on the producer side (producer <-> broker frontend) or ``b"TFW1"`` on the
  worker side (worker <-> broker backend): three letters naming the side, then the version number.
- ``command``: one byte, a :class:`PCmd` or :class:`WCmd` value.
- ``header``: a msgpack map, at most :data:`MAX_HEADER_BYTES`.
- ``payload``: zero or more opaque frames. For events they are the packed event (its msgpack header,
  then one frame per column); for results the packed tracks. The broker never looks inside them beyond
  counting frames and bytes, and forwards them without copying (``zmq.Frame`` objects pass through).

Messages are frozen dataclasses with ``encode() -> list[frame]``; :func:`decode_producer` and
:func:`decode_worker` turn received frames back into messages and raise :class:`~broker.errors.DecodeError`,
:class:`~broker.errors.VersionError` or :class:`~broker.errors.OversizedError` (never ``assert``, never
anything else) so that the receiver can answer with a typed :class:`Error`.

This module imports nothing from :mod:`kernels`: the broker stays ignorant of the event format.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any, TypeAlias

import msgpack
import zmq

from broker.errors import DecodeError, OversizedError, VersionError

VERSION = 1
PRODUCER_PREFIX = b"TFP"
WORKER_PREFIX = b"TFW"
PRODUCER_SIGNATURE = PRODUCER_PREFIX + str(VERSION).encode()
WORKER_SIGNATURE = WORKER_PREFIX + str(VERSION).encode()

#: Largest msgpack header accepted [bytes].
MAX_HEADER_BYTES = 64 * 1024
#: Default largest payload (all payload frames together) of one message [bytes].
DEFAULT_MAX_PAYLOAD_BYTES = 256 * 1024 * 1024
#: Default largest number of payload frames of one message.
DEFAULT_MAX_FRAMES = 64
#: Largest request id / event id / job id (ids are non-negative 63-bit integers).
MAX_ID = 2**63 - 1
#: Largest capacity a worker may announce [events].
MAX_CAPACITY = 4096
_MAX_STR = 256
_MAX_MAP_ENTRIES = 128

Frame: TypeAlias = "zmq.Frame | bytes | memoryview | Any"  # anything with the buffer protocol


class PCmd(IntEnum):
    """Producer-side commands (frame 1 of a ``TFP1`` message)."""

    SUBMIT = 1  #: producer -> broker: one event
    RESULT = 2  #: broker -> producer: tracks of one event
    ERROR = 3  #: broker -> producer: typed error, for one event or for an undecodable message
    BUSY = 4  #: broker -> producer: queue full, retry later
    HEARTBEAT = 5  #: both ways
    STATS_REQUEST = 6  #: producer/operator -> broker
    STATS = 7  #: broker -> producer: queue depth, workers, counters


class WCmd(IntEnum):
    """Worker-side commands (frame 1 of a ``TFW1`` message)."""

    READY = 1  #: worker -> broker: registered, with capacity; "I hold none of your events"
    JOB = 2  #: broker -> worker: one event to reconstruct (a lease)
    RESULT = 3  #: worker -> broker: tracks of one job
    FAILED = 4  #: worker -> broker: typed error for one job
    HEARTBEAT = 5  #: both ways; from the worker it lists the jobs being computed
    DISCONNECT = 6  #: either way: worker leaving (returns unstarted jobs) / broker forgetting a worker


class ErrorCode(StrEnum):
    """Error codes carried by :class:`Error` and :class:`WorkFailed` (open set: peers may send others)."""

    MALFORMED = "malformed"  #: frames or header could not be decoded
    VERSION = "version"  #: unsupported protocol version
    OVERSIZED = "oversized"  #: message above the size or frame-count limit
    UNKNOWN_COMMAND = "unknown_command"  #: command byte not valid on this side
    BAD_EVENT = "bad_event"  #: the packed event is malformed, or a cell's charge or time is not finite
    DETECTOR_MISMATCH = "detector_mismatch"  #: event made for another detector, or cells outside it
    RECONSTRUCTION_FAILED = "reconstruction_failed"  #: the chain raised on this event
    WORKER_LOST = "worker_lost"  #: the event was in flight on workers that died or stalled, too often
    TIMEOUT = "timeout"  #: no reply in time (set by the producer after its retries)
    SHUTTING_DOWN = "shutting_down"  #: the broker is stopping; retry (another broker may take over)
    INTERNAL = "internal"  #: unexpected failure in the broker or worker


# --- frame helpers ----------------------------------------------------------------------------------


def frame_nbytes(frame: Frame) -> int:
    """Size of one frame [bytes] without copying it."""
    if isinstance(frame, zmq.Frame):
        return len(frame)
    if isinstance(frame, bytes | bytearray):
        return len(frame)
    return memoryview(frame).nbytes


def frame_bytes(frame: Frame) -> bytes:
    """Contents of a (small) frame as bytes; copies, so use it for signatures and headers only."""
    if isinstance(frame, bytes):
        return frame
    if isinstance(frame, zmq.Frame):
        return frame.bytes
    return bytes(memoryview(frame))


def payload_nbytes(frames: Sequence[Frame]) -> int:
    """Total size of payload frames [bytes]."""
    return sum(frame_nbytes(f) for f in frames)


def _pack(header: Mapping[str, Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


# --- header field validation ------------------------------------------------------------------------


def _get_int(h: Mapping[str, Any], key: str, lo: int = 0, hi: int = MAX_ID, default: Any = ...) -> int:
    v = h.get(key, default)
    if v is ...:
        raise DecodeError(f"header lacks {key!r}")
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise DecodeError(f"header field {key!r} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _get_opt_int(h: Mapping[str, Any], key: str) -> int | None:
    if h.get(key) is None:
        return None
    return _get_int(h, key)


def _get_float(h: Mapping[str, Any], key: str, default: Any = ...) -> float:
    v = h.get(key, default)
    if v is ...:
        raise DecodeError(f"header lacks {key!r}")
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise DecodeError(f"header field {key!r} must be a finite number, got {v!r}")
    return float(v)


def _get_str(h: Mapping[str, Any], key: str, default: Any = ..., max_len: int = _MAX_STR) -> str:
    v = h.get(key, default)
    if v is ...:
        raise DecodeError(f"header lacks {key!r}")
    if not isinstance(v, str) or len(v) > max_len:
        raise DecodeError(f"header field {key!r} must be a string of at most {max_len} characters")
    return v


def _get_bool(h: Mapping[str, Any], key: str, default: bool) -> bool:
    v = h.get(key, default)
    if not isinstance(v, bool):
        raise DecodeError(f"header field {key!r} must be a boolean, got {v!r}")
    return v


def _get_timings(h: Mapping[str, Any], key: str) -> dict[str, float]:
    v = h.get(key, {})
    if not isinstance(v, dict) or len(v) > _MAX_MAP_ENTRIES:
        raise DecodeError(f"header field {key!r} must be a map of at most {_MAX_MAP_ENTRIES} entries")
    out: dict[str, float] = {}
    for k, x in v.items():
        if not isinstance(k, str) or len(k) > _MAX_STR:
            raise DecodeError(f"header field {key!r} has a bad key {k!r}")
        if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
            raise DecodeError(f"header field {key!r}[{k!r}] must be a finite number")
        out[k] = float(x)
    return out


def _get_map(h: Mapping[str, Any], key: str) -> dict[str, Any]:
    v = h.get(key, {})
    if not isinstance(v, dict) or len(v) > _MAX_MAP_ENTRIES or not all(isinstance(k, str) for k in v):
        raise DecodeError(f"header field {key!r} must be a map with string keys")
    return v


def _get_ids(h: Mapping[str, Any], key: str, max_len: int = MAX_CAPACITY) -> tuple[int, ...]:
    v = h.get(key, [])
    if not isinstance(v, list) or len(v) > max_len:
        raise DecodeError(f"header field {key!r} must be a list of at most {max_len} ids")
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x <= MAX_ID:
            raise DecodeError(f"header field {key!r} holds a bad id {x!r}")
    return tuple(v)


# --- producer side ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Submit:
    """Producer -> broker: one event.

    Attributes:
        id: request id, unique per producer (the producer's routing id); replies carry it back.
        event_id: the event number (informational; the packed event carries its own).
        payload: the packed event frames (at least one).
    """

    id: int
    event_id: int
    payload: tuple[Frame, ...] = ()
    cmd = PCmd.SUBMIT

    def header(self) -> dict[str, Any]:
        return {"id": self.id, "event_id": self.event_id}


@dataclass(frozen=True)
class Result:
    """Broker -> producer: tracks of one event.

    Attributes:
        id: the request id of the :class:`Submit`.
        event_id: the event number.
        worker: the worker that reconstructed it.
        timings: worker-side stage times [s] (``unpack``, the chain stages, ``pack``, ``total`` ...).
        queue_s: time the event waited in the broker before its last dispatch [s].
        attempts: how many times the event was dispatched.
        epoch: the broker instance that answers.
        payload: the packed tracks frames.
    """

    id: int
    event_id: int
    worker: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    queue_s: float = 0.0
    attempts: int = 1
    epoch: str = ""
    payload: tuple[Frame, ...] = ()
    cmd = PCmd.RESULT

    def header(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "event_id": self.event_id,
            "worker": self.worker,
            "timings": self.timings,
            "queue_s": self.queue_s,
            "attempts": self.attempts,
            "epoch": self.epoch,
        }


@dataclass(frozen=True)
class Error:
    """Typed error; ``id`` is None when the request could not be decoded far enough to know it.

    Attributes:
        id: request id or None.
        code: an :class:`ErrorCode` value.
        message: human-readable detail.
        retryable: True when resending the same request may succeed.
    """

    id: int | None
    code: str
    message: str = ""
    retryable: bool = False
    cmd = PCmd.ERROR
    payload: tuple[Frame, ...] = ()

    def header(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "code": str(self.code),
            "message": self.message[:4096],
            "retryable": self.retryable,
        }


@dataclass(frozen=True)
class Busy:
    """Broker -> producer: the queue is full; resend after ``retry_after_s`` seconds.

    Attributes:
        id: request id of the refused :class:`Submit`.
        queue_depth: events queued at the broker when it refused [events].
        retry_after_s: suggested back-off [s].
        epoch: the broker instance that answers.
    """

    id: int
    queue_depth: int = 0
    retry_after_s: float = 0.05
    epoch: str = ""
    cmd = PCmd.BUSY
    payload: tuple[Frame, ...] = ()

    def header(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "queue_depth": self.queue_depth,
            "retry_after_s": self.retry_after_s,
            "epoch": self.epoch,
        }


@dataclass(frozen=True)
class Heartbeat:
    """Producer <-> broker liveness. From the broker it carries the broker's ``epoch`` (instance id): a
    producer that sees the epoch change knows the broker restarted and resends what it had outstanding."""

    epoch: str = ""
    cmd = PCmd.HEARTBEAT
    payload: tuple[Frame, ...] = ()

    def header(self) -> dict[str, Any]:
        return {"epoch": self.epoch} if self.epoch else {}


@dataclass(frozen=True)
class StatsRequest:
    """Ask the broker for its :class:`Stats`."""

    cmd = PCmd.STATS_REQUEST
    payload: tuple[Frame, ...] = ()

    def header(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class Stats:
    """Broker -> producer: a snapshot of queue, workers and counters (see ``docs/protocol.md``)."""

    stats: dict[str, Any]
    cmd = PCmd.STATS
    payload: tuple[Frame, ...] = ()

    def header(self) -> dict[str, Any]:
        return {"stats": self.stats}


ProducerMessage: TypeAlias = Submit | Result | Error | Busy | Heartbeat | StatsRequest | Stats


# --- worker side ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """Worker -> broker: register with ``capacity`` events of credit; the worker holds no earlier jobs.

    Attributes:
        capacity: events the worker can hold at once (computing + prefetched) [events].
        info: description (backend, device, host, pid, detector fingerprint, batch size ...).
    """

    capacity: int
    info: dict[str, Any] = field(default_factory=dict)
    cmd = WCmd.READY
    payload: tuple[Frame, ...] = ()

    def header(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "info": self.info}


@dataclass(frozen=True)
class Job:
    """Broker -> worker: one event under lease.

    Attributes:
        job: the broker's job id (unique within one broker ``epoch``).
        epoch: the broker instance; results quoting another epoch are stale and ignored.
        attempt: 1 for the first dispatch, then 2, 3 ...
        payload: the packed event frames, as the producer sent them.
    """

    job: int
    epoch: str
    attempt: int = 1
    payload: tuple[Frame, ...] = ()
    cmd = WCmd.JOB

    def header(self) -> dict[str, Any]:
        return {"job": self.job, "epoch": self.epoch, "attempt": self.attempt}


@dataclass(frozen=True)
class WorkResult:
    """Worker -> broker: tracks of one job, with the worker-side stage times [s]."""

    job: int
    epoch: str
    timings: dict[str, float] = field(default_factory=dict)
    payload: tuple[Frame, ...] = ()
    cmd = WCmd.RESULT

    def header(self) -> dict[str, Any]:
        return {"job": self.job, "epoch": self.epoch, "timings": self.timings}


@dataclass(frozen=True)
class WorkFailed:
    """Worker -> broker: the job failed with an :class:`ErrorCode`; ``retryable`` lets another worker try."""

    job: int
    epoch: str
    code: str
    message: str = ""
    retryable: bool = False
    cmd = WCmd.FAILED
    payload: tuple[Frame, ...] = ()

    def header(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "epoch": self.epoch,
            "code": str(self.code),
            "message": self.message[:4096],
            "retryable": self.retryable,
        }


@dataclass(frozen=True)
class WorkerHeartbeat:
    """Liveness, both ways. From a worker, ``active`` lists the jobs its compute thread has started."""

    active: tuple[int, ...] = ()
    cmd = WCmd.HEARTBEAT
    payload: tuple[Frame, ...] = ()

    def header(self) -> dict[str, Any]:
        return {"active": list(self.active)} if self.active else {}


@dataclass(frozen=True)
class Disconnect:
    """Worker -> broker: leaving; ``returned`` are jobs it never started (requeued without penalty).
    Broker -> worker: you are not (or no longer) registered; drop queued jobs and send READY again."""

    reason: str = ""
    returned: tuple[int, ...] = ()
    cmd = WCmd.DISCONNECT
    payload: tuple[Frame, ...] = ()

    def header(self) -> dict[str, Any]:
        return {"reason": self.reason, "returned": list(self.returned)}


WorkerMessage: TypeAlias = Ready | Job | WorkResult | WorkFailed | WorkerHeartbeat | Disconnect
Message: TypeAlias = ProducerMessage | WorkerMessage


# --- encoding ---------------------------------------------------------------------------------------


def encode(msg: Message) -> list[Frame]:
    """Frames of a message: signature, command, msgpack header, then the payload frames untouched."""
    sig = WORKER_SIGNATURE if isinstance(msg.cmd, WCmd) else PRODUCER_SIGNATURE
    return [sig, bytes((int(msg.cmd),)), _pack(msg.header()), *msg.payload]


@dataclass(frozen=True)
class Limits:
    """Size limits applied while decoding.

    Attributes:
        max_payload_bytes: largest total payload of one message [bytes].
        max_frames: largest number of payload frames of one message.
    """

    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    max_frames: int = DEFAULT_MAX_FRAMES


def _split(
    frames: Sequence[Frame], prefix: bytes, limits: Limits
) -> tuple[int, dict[str, Any], tuple[Frame, ...]]:
    if len(frames) < 3:
        raise DecodeError(f"message has {len(frames)} frames; need signature, command and header")
    if frame_nbytes(frames[0]) > 16:
        raise DecodeError("signature frame too long")
    sig = frame_bytes(frames[0])
    expected = prefix + str(VERSION).encode()
    if sig != expected:
        side = sig[:3]
        if side == prefix:
            raise VersionError(
                f"protocol version {sig[3:].decode('ascii', 'replace')!r} is not supported; "
                f"this end speaks {expected.decode()}"
            )
        if side in (PRODUCER_PREFIX, WORKER_PREFIX):
            raise DecodeError(
                f"signature {sig!r} belongs to the other side of the broker; expected {expected!r}"
            )
        raise DecodeError(f"bad signature {sig[:16]!r}; expected {expected!r}")
    if frame_nbytes(frames[1]) != 1:
        raise DecodeError("command frame must be exactly one byte")
    cmd = frame_bytes(frames[1])[0]
    if frame_nbytes(frames[2]) > MAX_HEADER_BYTES:
        raise OversizedError(f"header of {frame_nbytes(frames[2])} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(frame_bytes(frames[2]), raw=False, strict_map_key=True)
    except Exception as exc:
        raise DecodeError(f"header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise DecodeError("header must be a msgpack map")
    payload = tuple(frames[3:])
    if len(payload) > limits.max_frames:
        raise OversizedError(f"{len(payload)} payload frames exceed the limit of {limits.max_frames}")
    nbytes = payload_nbytes(payload)
    if nbytes > limits.max_payload_bytes:
        raise OversizedError(f"payload of {nbytes} bytes exceeds the limit of {limits.max_payload_bytes}")
    return cmd, header, payload


def request_id_of(frames: Sequence[Frame]) -> int | None:
    """Best-effort request id of an undecodable producer message, so its error reply can name it."""
    try:
        if len(frames) >= 3 and frame_nbytes(frames[2]) <= MAX_HEADER_BYTES:
            h = msgpack.unpackb(frame_bytes(frames[2]), raw=False, strict_map_key=True)
            v = h.get("id") if isinstance(h, dict) else None
            if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_ID:
                return v
    except Exception:
        return None
    return None


def decode_producer(frames: Sequence[Frame], limits: Limits | None = None) -> ProducerMessage:
    """Decode a producer-side message (either direction).

    Raises:
        DecodeError: malformed frames or header, or an unknown command.
        VersionError: a ``TFP`` signature with another version.
        OversizedError: header, payload or frame count above the limits.
    """
    lim = limits or Limits()
    cmd, h, payload = _split(frames, PRODUCER_PREFIX, lim)
    try:
        pcmd = PCmd(cmd)
    except ValueError:
        raise DecodeError(f"unknown producer command {cmd}", code=ErrorCode.UNKNOWN_COMMAND) from None
    if pcmd is PCmd.SUBMIT:
        if not payload:
            raise DecodeError("SUBMIT carries no event frames")
        return Submit(id=_get_int(h, "id"), event_id=_get_int(h, "event_id", default=0), payload=payload)
    if pcmd is PCmd.RESULT:
        return Result(
            id=_get_int(h, "id"),
            event_id=_get_int(h, "event_id", default=0),
            worker=_get_str(h, "worker", default=""),
            timings=_get_timings(h, "timings"),
            queue_s=_get_float(h, "queue_s", default=0.0),
            attempts=_get_int(h, "attempts", 0, 1_000_000, default=1),
            epoch=_get_str(h, "epoch", default="", max_len=64),
            payload=payload,
        )
    if pcmd is PCmd.ERROR:
        return Error(
            id=_get_opt_int(h, "id"),
            code=_get_str(h, "code", max_len=64),
            message=_get_str(h, "message", default="", max_len=4096),
            retryable=_get_bool(h, "retryable", False),
        )
    if pcmd is PCmd.BUSY:
        return Busy(
            id=_get_int(h, "id"),
            queue_depth=_get_int(h, "queue_depth", default=0),
            retry_after_s=_get_float(h, "retry_after_s", default=0.05),
            epoch=_get_str(h, "epoch", default="", max_len=64),
        )
    if pcmd is PCmd.HEARTBEAT:
        return Heartbeat(epoch=_get_str(h, "epoch", default="", max_len=64))
    if pcmd is PCmd.STATS_REQUEST:
        return StatsRequest()
    stats = h.get("stats")
    if not isinstance(stats, dict):
        raise DecodeError("STATS carries no stats map")
    return Stats(stats=stats)


def decode_worker(frames: Sequence[Frame], limits: Limits | None = None) -> WorkerMessage:
    """Decode a worker-side message (either direction).

    Raises:
        DecodeError: malformed frames or header, or an unknown command.
        VersionError: a ``TFW`` signature with another version.
        OversizedError: header, payload or frame count above the limits.
    """
    lim = limits or Limits()
    cmd, h, payload = _split(frames, WORKER_PREFIX, lim)
    try:
        wcmd = WCmd(cmd)
    except ValueError:
        raise DecodeError(f"unknown worker command {cmd}", code=ErrorCode.UNKNOWN_COMMAND) from None
    if wcmd is WCmd.READY:
        return Ready(capacity=_get_int(h, "capacity", 1, MAX_CAPACITY), info=_get_map(h, "info"))
    if wcmd is WCmd.JOB:
        if not payload:
            raise DecodeError("JOB carries no event frames")
        return Job(
            job=_get_int(h, "job"),
            epoch=_get_str(h, "epoch", max_len=64),
            attempt=_get_int(h, "attempt", 1, 1_000_000, default=1),
            payload=payload,
        )
    if wcmd is WCmd.RESULT:
        return WorkResult(
            job=_get_int(h, "job"),
            epoch=_get_str(h, "epoch", max_len=64),
            timings=_get_timings(h, "timings"),
            payload=payload,
        )
    if wcmd is WCmd.FAILED:
        return WorkFailed(
            job=_get_int(h, "job"),
            epoch=_get_str(h, "epoch", max_len=64),
            code=_get_str(h, "code", max_len=64),
            message=_get_str(h, "message", default="", max_len=4096),
            retryable=_get_bool(h, "retryable", False),
        )
    if wcmd is WCmd.HEARTBEAT:
        return WorkerHeartbeat(active=_get_ids(h, "active"))
    return Disconnect(reason=_get_str(h, "reason", default=""), returned=_get_ids(h, "returned"))
