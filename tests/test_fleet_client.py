"""The producer's client against a scripted fake broker (a ROUTER socket driven by the test, over inproc):
duplicates dropped, timeouts, retries, broker restart detection, BUSY back-off, typed errors."""

from __future__ import annotations

import time

import pytest
import zmq

from broker.protocol import Busy, Error, ErrorCode, Heartbeat, Result, Submit, decode_producer, encode
from producer.client import ClientConfig, FleetClient

pytestmark = pytest.mark.timeout(30)


class FakeBroker:
    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.peer: bytes | None = None

    def recv(self, timeout_s: float = 2.0):
        """Next message from the client (skipping heartbeats)."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(left * 1000):
                break
            ident, *frames = self.sock.recv_multipart()
            self.peer = ident
            msg = decode_producer(frames)
            if not isinstance(msg, Heartbeat):
                return msg
        return None

    def send(self, msg) -> None:
        self.sock.send_multipart([self.peer, *encode(msg)])


@pytest.fixture
def pair():
    ctx = zmq.Context()
    endpoint = "inproc://fake-broker"
    broker = FakeBroker(ctx, endpoint)
    clients: list[FleetClient] = []

    def make(**kw) -> FleetClient:
        kw.setdefault("heartbeat_interval_s", 0.05)
        c = FleetClient(ClientConfig(endpoint=endpoint, **kw), context=ctx)
        clients.append(c)
        return c

    yield broker, make
    for c in clients:
        c.close()
    broker.sock.close()
    ctx.term()


def recv_while_polling(broker: FakeBroker, client: FleetClient, timeout_s: float = 2.0):
    """The client only acts inside poll(): keep polling it until the fake broker receives something."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        client.poll(0.01)
        msg = broker.recv(0.01)
        if msg is not None:
            return msg
    return None


def poll_until(client: FleetClient, n: int, timeout_s: float = 3.0):
    out = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        out += client.poll(0.02)
    return out


def test_duplicate_replies_are_reported_once(pair):
    broker, make = pair
    client = make()
    client.submit(1, 7, (b"event",))
    sub = broker.recv()
    assert isinstance(sub, Submit) and sub.id == 1 and sub.payload == (b"event",)
    broker.send(Result(1, 7, worker="w", payload=(b"tracks",)))
    broker.send(Result(1, 7, worker="w", payload=(b"tracks",)))  # a late copy after a retry
    (r,) = poll_until(client, 1)
    assert r.ok and r.id == 1 and r.event_id == 7 and r.payload[0].bytes == b"tracks"
    assert poll_until(client, 1, 0.2) == [] and client.counters["duplicates"] == 1 and client.in_flight == 0


def test_silent_broker_timeouts_end_in_a_timeout_error(pair):
    broker, make = pair
    client = make(timeout_s=0.1, max_retries=2, broker_timeout_s=10.0)
    client.submit(1, 1, (b"e",))
    (r,) = poll_until(client, 1)
    assert not r.ok and r.code == ErrorCode.TIMEOUT and r.sends == 3
    assert [broker.recv(0.5).id for _ in range(3)] == [1, 1, 1]


def test_resends_are_free_while_the_broker_keeps_talking(pair):
    broker, make = pair
    client = make(timeout_s=0.1, max_retries=1, broker_timeout_s=10.0)
    client.submit(1, 1, (b"e",))
    seen = 0
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # a long event: the broker holds it and heartbeats
        if broker.recv(0.05) is not None:
            seen += 1
        broker.send(Heartbeat(epoch="A"))
        assert client.poll(0.01) == []
    assert seen >= 4  # resent several times, never failed
    broker.send(Result(1, 1, epoch="A"))
    (r,) = poll_until(client, 1)
    assert r.ok and 1 in client.retried_ids


def test_new_broker_epoch_triggers_resend(pair):
    broker, make = pair
    client = make(timeout_s=60.0)
    client.submit(0, 0, (b"e",))
    broker.recv()
    broker.send(Result(0, 0, epoch="first"))
    poll_until(client, 1)
    client.submit(1, 1, (b"e",))
    assert broker.recv().id == 1
    broker.send(Heartbeat(epoch="second"))  # the broker restarted and lost event 1
    again = recv_while_polling(broker, client)
    assert isinstance(again, Submit) and again.id == 1
    assert client.counters["broker_restarts"] == 1


def test_busy_backs_off_and_retries(pair):
    broker, make = pair
    client = make(busy_backoff_s=0.01, busy_backoff_max_s=0.05)
    client.submit(3, 3, (b"e",))
    broker.recv()
    broker.send(Busy(3, queue_depth=10, retry_after_s=0.01))
    assert recv_while_polling(broker, client).id == 3
    broker.send(Result(3, 3))
    (r,) = poll_until(client, 1)
    assert r.ok and r.busy == 1 and client.busy_ids == {3}


def test_max_busy_and_typed_errors(pair):
    broker, make = pair
    client = make(max_busy=1, busy_backoff_max_s=0.05)
    client.submit(1, 1, (b"e",))
    client.submit(2, 2, (b"e",))
    client.submit(3, 3, (b"e",))
    for _ in range(3):
        broker.recv()
    broker.send(Busy(1))
    broker.send(Error(2, ErrorCode.BAD_EVENT, "cannot unpack"))
    broker.send(Error(3, ErrorCode.SHUTTING_DOWN, "bye", retryable=True))
    out = {r.id: r for r in poll_until(client, 2)}
    assert out[1].code == "busy" and out[2].code == ErrorCode.BAD_EVENT and out[2].message == "cannot unpack"
    assert recv_while_polling(broker, client).id == 3  # retryable: sent again
    broker.send(Result(3, 3))
    assert poll_until(client, 1)[0].ok


def test_requests_wait_while_no_broker_is_connected():
    ctx = zmq.Context()
    endpoint = "inproc://late-broker"
    client = FleetClient(ClientConfig(endpoint=endpoint, heartbeat_interval_s=0.05), context=ctx)
    try:
        client.submit(1, 1, (b"e",))  # nothing listens yet: kept in the client, not in ZeroMQ
        assert client.poll(0.05) == [] and client.in_flight == 1
        broker = FakeBroker(ctx, endpoint)
        deadline = time.monotonic() + 2
        msg = None
        while msg is None and time.monotonic() < deadline:
            client.poll(0.02)
            msg = broker.recv(0.02)
        assert isinstance(msg, Submit) and msg.id == 1
        broker.sock.close()
    finally:
        client.close()
        ctx.term()
