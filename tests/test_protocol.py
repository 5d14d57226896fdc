"""Wire protocol v1: every message round-trips, and every kind of bad input raises a typed ProtocolError."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zmq

from broker.errors import DecodeError, OversizedError, ProtocolError, VersionError
from broker.protocol import (
    PRODUCER_SIGNATURE,
    WORKER_SIGNATURE,
    Busy,
    Disconnect,
    Error,
    ErrorCode,
    Heartbeat,
    Job,
    Limits,
    PCmd,
    Ready,
    Result,
    Stats,
    StatsRequest,
    Submit,
    WCmd,
    WorkerHeartbeat,
    WorkFailed,
    WorkResult,
    decode_producer,
    decode_worker,
    encode,
    frame_nbytes,
    request_id_of,
)

PAYLOAD = (b"event-header", np.arange(1000, dtype=np.float32), zmq.Frame(b"x" * 70_000))

PRODUCER_MESSAGES = [
    Submit(id=7, event_id=3, payload=PAYLOAD),
    Result(
        id=7, event_id=3, worker="w1", timings={"chain_s": 0.5}, queue_s=0.01, attempts=2, payload=PAYLOAD
    ),
    Error(id=7, code=ErrorCode.BAD_EVENT, message="bad", retryable=False),
    Error(id=None, code=ErrorCode.MALFORMED, message="no id"),
    Busy(id=7, queue_depth=10, retry_after_s=0.1),
    Heartbeat(),
    StatsRequest(),
    Stats(stats={"queue_depth": 3, "workers": [{"name": "a"}]}),
]
WORKER_MESSAGES = [
    Ready(capacity=4, info={"backend": "numpy", "pid": 12}),
    Job(job=11, epoch="abc", attempt=2, payload=PAYLOAD),
    WorkResult(job=11, epoch="abc", timings={"x_s": 1.0}, payload=PAYLOAD),
    WorkFailed(job=11, epoch="abc", code=ErrorCode.RECONSTRUCTION_FAILED, message="boom", retryable=True),
    WorkerHeartbeat(active=(1, 2)),
    WorkerHeartbeat(),
    Disconnect(reason="bye", returned=(3, 4)),
]


def wire(frames):
    """What the receiver sees: every frame as bytes (as after a trip through ZeroMQ)."""
    return [f.bytes if isinstance(f, zmq.Frame) else bytes(memoryview(f)) for f in frames]


def same_payload(a, b) -> bool:
    return [bytes(memoryview(x)) if not isinstance(x, zmq.Frame) else x.bytes for x in a] == list(b)


@pytest.mark.parametrize("msg", PRODUCER_MESSAGES, ids=lambda m: type(m).__name__)
def test_producer_messages_round_trip(msg):
    frames = encode(msg)
    assert frames[0] == PRODUCER_SIGNATURE and frames[1] == bytes([msg.cmd])
    out = decode_producer(wire(frames))
    assert type(out) is type(msg)
    assert out.header() == msgpack.unpackb(msgpack.packb(msg.header()))
    assert same_payload(msg.payload, out.payload)


@pytest.mark.parametrize("msg", WORKER_MESSAGES, ids=lambda m: type(m).__name__)
def test_worker_messages_round_trip(msg):
    frames = encode(msg)
    assert frames[0] == WORKER_SIGNATURE and frames[1] == bytes([msg.cmd])
    out = decode_worker(wire(frames))
    assert type(out) is type(msg)
    assert out.header() == msgpack.unpackb(msgpack.packb(msg.header()))
    assert same_payload(msg.payload, out.payload)


def test_payload_frames_are_passed_through_untouched():
    frame = zmq.Frame(b"y" * 100_000)
    frames = encode(Submit(id=1, event_id=1, payload=(b"h", frame)))
    assert frames[-1] is frame  # no copy on encode
    out = decode_producer([*frames[:3], b"h", frame])
    assert out.payload[-1] is frame  # no copy on decode
    assert frame_nbytes(frame) == 100_000


def _submit_frames(**header):
    return [
        PRODUCER_SIGNATURE,
        bytes([PCmd.SUBMIT]),
        msgpack.packb({"id": 1, "event_id": 2, **header}),
        b"ev",
    ]


@pytest.mark.parametrize(
    ("frames", "error", "code"),
    [
        ([], DecodeError, "malformed"),
        ([PRODUCER_SIGNATURE, bytes([PCmd.SUBMIT])], DecodeError, "malformed"),
        ([b"GARBAGE", b"\x01", b"\x80"], DecodeError, "malformed"),
        ([b"TFP2", b"\x01", b"\x80"], VersionError, "version"),
        ([b"TFP0", b"\x01", b"\x80"], VersionError, "version"),
        ([WORKER_SIGNATURE, b"\x01", b"\x80"], DecodeError, "malformed"),
        ([PRODUCER_SIGNATURE, b"\x01\x02", b"\x80"], DecodeError, "malformed"),
        ([PRODUCER_SIGNATURE, b"\x63", b"\x80"], DecodeError, "unknown_command"),
        ([PRODUCER_SIGNATURE, bytes([PCmd.SUBMIT]), b"\xc1\xc1"], DecodeError, "malformed"),
        ([PRODUCER_SIGNATURE, bytes([PCmd.SUBMIT]), msgpack.packb([1, 2])], DecodeError, "malformed"),
        ([PRODUCER_SIGNATURE, bytes([PCmd.SUBMIT]), msgpack.packb({"id": 1})], DecodeError, "malformed"),
        (_submit_frames(id=-1), DecodeError, "malformed"),
        (_submit_frames(id="seven"), DecodeError, "malformed"),
        (_submit_frames(id=True), DecodeError, "malformed"),
        (_submit_frames(id=2**63), DecodeError, "malformed"),
        ([PRODUCER_SIGNATURE, bytes([PCmd.SUBMIT]), b"\x80" * (65 * 1024)], OversizedError, "oversized"),
        ([b"x" * 100, b"\x01", b"\x80"], DecodeError, "malformed"),
    ],
)
def test_bad_producer_frames_raise_typed_errors(frames, error, code):
    with pytest.raises(error) as info:
        decode_producer(frames)
    assert isinstance(info.value, ProtocolError)
    assert info.value.code == code


def test_payload_limits():
    frames = encode(Submit(id=1, event_id=1, payload=(b"a" * 600, b"b" * 600)))
    with pytest.raises(OversizedError, match="exceeds"):
        decode_producer(frames, Limits(max_payload_bytes=1000))
    with pytest.raises(OversizedError, match="frames"):
        decode_producer(frames, Limits(max_frames=1))
    assert decode_producer(frames, Limits(max_payload_bytes=1200, max_frames=2)).id == 1


@pytest.mark.parametrize(
    "header",
    [
        {"capacity": 0},
        {"capacity": 10**9},
        {"capacity": 2, "info": [1]},
        {"capacity": 2, "info": {1: 2}},
    ],
)
def test_bad_ready_headers(header):
    with pytest.raises(DecodeError):
        decode_worker([WORKER_SIGNATURE, bytes([WCmd.READY]), msgpack.packb(header, strict_types=False)])


def test_bad_worker_fields():
    bad = [
        [WORKER_SIGNATURE, bytes([WCmd.JOB]), msgpack.packb({"job": 1, "epoch": "e"})],  # no payload
        [WORKER_SIGNATURE, bytes([WCmd.RESULT]), msgpack.packb({"job": 1, "epoch": 3})],
        [
            WORKER_SIGNATURE,
            bytes([WCmd.RESULT]),
            msgpack.packb({"job": 1, "epoch": "e", "timings": {"a": "x"}}),
        ],
        [WORKER_SIGNATURE, bytes([WCmd.HEARTBEAT]), msgpack.packb({"active": ["x"]})],
        [WORKER_SIGNATURE, bytes([WCmd.DISCONNECT]), msgpack.packb({"returned": 5})],
        [
            WORKER_SIGNATURE,
            bytes([WCmd.FAILED]),
            msgpack.packb({"job": 1, "epoch": "e", "code": "x", "retryable": 1}),
        ],
        [WORKER_SIGNATURE, bytes([77]), msgpack.packb({})],
    ]
    for frames in bad:
        with pytest.raises(DecodeError):
            decode_worker(frames)


def test_request_id_of_best_effort():
    assert request_id_of(_submit_frames(id=42)) == 42
    assert request_id_of([PRODUCER_SIGNATURE, b"\x01", b"\xc1"]) is None
    assert request_id_of([b"a"]) is None
    assert request_id_of(_submit_frames(id="x")) is None


def test_unknown_error_codes_are_accepted_for_forward_compatibility():
    msg = decode_producer(encode(Error(id=1, code="brand_new_code", message="m")))
    assert isinstance(msg, Error) and msg.code == "brand_new_code"
