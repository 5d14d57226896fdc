"""What the KServe gateway adds to one request's latency, on loopback, with a worker that answers at once.

A broker (subprocess), a stand-in worker that answers every job at once with the same packed tracks (no
reconstruction: the fleet's own time is only the broker hops) and ``trackfleet gateway`` (subprocess, the
tree ``--tree``, by default this one). The request is one mu=200-sized event: ``--cells`` cells (330k)
drawn on the modules the bundled mu=20 events hit (weighted by their occupancy) with valid channels,
sorted and duplicate-free as perf_analyzer's data is, with TIMESTAMP, EVENT_ID and TRUTH_ID (10.6 MB of
tensors); the answer is 2600 tracks with ~28k measurements (10 x a bundled mu=20 event's, 1.6 MB).

One request at a time, paths taking turns in ``--rounds`` rounds after a warm-up:

- ``direct``: the packed event straight into the broker with the producer client (``FleetClient``);
- ``http_raw`` / ``grpc_raw``: through the gateway, the request encoded once (the binary tensor
  extension / ``raw_input_contents``), all outputs binary: what a C++ client such as perf_analyzer
  costs, nearly;
- ``http`` / ``grpc``: through the gateway with ``tritonclient``, which encodes every request (in
  Python, it costs the client 5-15 ms more here);
- ``http_shm`` / ``grpc_shm``: ``tritonclient`` with every input and output in system shared memory,
  registered and written once (``perf_analyzer --shared-memory system``): no tensor crosses the
  socket (skipped for a ``--baseline`` gateway without the extension).

``added = median(path) - median(direct)`` is what a client pays for the gateway. The gateway process
also times its part of every request (wrappers installed by this script, nothing in the product), as
medians [ms]: ``before_handler`` (client send to handler start: the request's transfer, for gRPC also
grpc's own receive), ``read`` (HTTP: the body), ``parse`` (KServe JSON header / message -> inputs),
``decode`` (names, datatypes, shapes, sizes), ``pack`` (value checks, order check, a detector check in trees before the workers took it over,
packing for the broker), ``fleet`` (submit to reply: the broker round trip, ``direct`` plus the hop
into the gateway's broker thread; within it ``to_reply``, the request handed to that thread until the thread
holds the reply, and ``wake``, until the request's thread goes on), ``output`` (tracks -> output tensors),
``write_shm`` (outputs into the client's shared memory), ``respond`` (response encoding
and writing), ``handler`` (all of the handler), ``after_handler`` (handler end to the client holding the
answer). ``grpc_protobuf_parse_ms`` is protobuf's own parse of the request, timed apart (what a handler
on the parsed message pays before it starts). ``--baseline DIR`` times a second tree's gateway in the
same rounds (paths ``...@baseline``).

``--worker-delay-ms`` has the stand-in worker answer as late as a GPU worker would (~30 ms at mu=200), so
that the gateway's threads idle between requests as they do in a real run. ``bench/gateway_perf.py
--gateway-timings`` runs this script's gateway (``--serve``) under perf_analyzer and a real fleet.

On a small machine placement decides how fast 10 MB cross loopback, so ``--cpus`` pins the client and
the worker to one core and the gateway and the broker to another (on a 2-core VM a gRPC request whose
sender and receiver share a core takes ~25 ms instead of ~10). That placement also makes ``fleet``
exceed ``direct`` by ~3-4 ms: the gateway's send of the event to the broker shares the broker's core,
where ``direct`` sends from the other one; with ``--cpus ''`` or ``--cpus 0:1:0`` the two are equal
(the hop into the gateway's broker thread itself costs no measurable time).

A gateway pinned to one core packs each request in one thread. Give it several (``--cpus 0:1-4:5`` on a
larger host) and it packs a lone request in pieces on up to 3 threads (``--pack-threads`` sets the
number for the gateways of both trees where they have the setting).

    .venv/bin/python bench/gateway_latency.py [--requests 40] [--baseline DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BUNDLED = ROOT / "data" / "generic-mu20"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=330_000, help="cells in the request (default %(default)s)")
    p.add_argument("--tracks", type=int, default=2600, help="tracks in the answer (default %(default)s)")
    p.add_argument("--requests", type=int, default=40, help="timed requests per path (default %(default)s)")
    p.add_argument(
        "--rounds", type=int, default=5, help="paths take turns this many times (default %(default)s)"
    )
    p.add_argument("--warmup", type=int, default=5, help="untimed requests per path (default %(default)s)")
    p.add_argument(
        "--paths",
        default="direct,http_raw,grpc_raw,http,grpc",
        help="what to time, comma-separated: direct, http_raw, grpc_raw (requests encoded once), "
        "http, grpc (tritonclient), http_shm, grpc_shm (tritonclient, tensors in system shared memory)",
    )
    p.add_argument(
        "--cpus",
        default="0:1" if len(os.sched_getaffinity(0)) >= 2 else "",
        help="CLIENT:SERVER[:BROKER] cores: the client and the stand-in worker on one, the gateway and "
        "(unless BROKER names another) the broker on the other; each a core or a list such as 1-4 or "
        "1,3 (a gateway on several cores packs a lone request with several threads) ('' leaves "
        "placement to the OS; default %(default)r)",
    )
    p.add_argument(
        "--pack-threads",
        type=int,
        help="the gateways' pack_threads (default theirs: by the cores they may use; a baseline "
        "without the setting ignores it)",
    )
    p.add_argument(
        "--tree",
        type=Path,
        default=ROOT,
        help="the trackfleet tree whose gateway is timed (default this one)",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        help="another trackfleet source tree (e.g. a `git worktree` of the commit before a change): its "
        "gateway is timed too, in the same rounds, as PATH@baseline",
    )
    p.add_argument(
        "--worker-delay-ms",
        type=float,
        default=0.0,
        help="the stand-in worker answers each job this long after it arrives, as a GPU worker busy with "
        "the chain (its CPU idle) would: with a fleet's ~30 ms the gateway's threads wait as long "
        "between requests as in a real run (default %(default)s)",
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    # internal: the gateway process
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--broker", help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--endpoints-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--timings-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--detector", type=Path, default=BUNDLED, help=argparse.SUPPRESS)
    p.add_argument("--ports", default="0,0,-1", help=argparse.SUPPRESS)  # HTTP, gRPC, metrics
    p.add_argument("--grpc-threads", type=int, default=8, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def cpu_list(text: str) -> set[int]:
    """Cores from ``2``, ``1-4`` or ``1,3,5-6``."""
    cores: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cores.update(range(int(lo), int(hi or lo) + 1))
    return cores


# --- the event and the answer ----------------------------------------------------------------------


def synth_event(n_cells: int, seed: int = 1) -> dict[str, np.ndarray]:
    """Sorted, duplicate-free cells on the bundled detector's modules, as the request's tensors."""
    from kernels.edm.cells import merge_duplicate_cells
    from producer.io.detector import load_detector
    from producer.io.events import discover, load_cells

    det = load_detector(BUNDLED)
    hit = np.concatenate([load_cells(s, det).geometry_id for s in discover(BUNDLED)])
    modules, occupancy = np.unique(hit, return_counts=True)
    bins = np.asarray(det.seg_bins)[np.asarray(det.module_index(np, modules))]
    rng = np.random.default_rng(seed)
    # draw more than needed (some cells collide and merge), then keep the first n of the sorted cells
    m = rng.choice(modules.shape[0], size=int(n_cells * 1.05) + 1000, p=occupancy / occupancy.sum())
    from kernels.edm.cells import Cells

    cells = Cells(
        geometry_id=modules[m].astype(np.uint64),
        channel0=(rng.random(m.shape[0]) * bins[m, 0]).astype(np.int32),
        channel1=(rng.random(m.shape[0]) * bins[m, 1]).astype(np.int32),
        activation=rng.random(m.shape[0]).astype(np.float32),
        time=rng.random(m.shape[0]).astype(np.float32) * 25,
        measurement_id=rng.integers(0, 2**20, m.shape[0]).astype(np.int64),
        event_id=7,
    )
    cells, _ = merge_duplicate_cells(cells)
    n = min(n_cells, cells.size)
    return {
        "GEOMETRY_ID": np.ascontiguousarray(cells.geometry_id[:n], "<u8"),
        "CHANNEL0": np.ascontiguousarray(cells.channel0[:n], "<i4"),
        "CHANNEL1": np.ascontiguousarray(cells.channel1[:n], "<i4"),
        "VALUE": np.ascontiguousarray(cells.activation[:n], "<f4"),
        "TIMESTAMP": np.ascontiguousarray(cells.time[:n], "<f4"),
        "EVENT_ID": np.array([7], "<u8"),
        "TRUTH_ID": np.ascontiguousarray(cells.measurement_id[:n], "<i8"),
    }


def synth_tracks(n_tracks: int, seed: int = 2) -> Any:
    from kernels.edm.tracks import Tracks

    rng = np.random.default_rng(seed)
    length = rng.integers(7, 15, n_tracks)
    offsets = np.zeros(n_tracks + 1, np.int64)
    np.cumsum(length, out=offsets[1:])
    m = int(offsets[-1])
    return Tracks(
        params=rng.random((n_tracks, 5)),
        cov=rng.random((n_tracks, 5, 5)),
        chi2=rng.random(n_tracks),
        ndf=rng.integers(5, 20, n_tracks).astype(np.int32),
        n_holes=np.zeros(n_tracks, np.int32),
        meas_offsets=offsets,
        meas_geometry_id=rng.integers(1, 2**60, m).astype(np.uint64),
        meas_local0=rng.random(m),
        meas_local1=rng.random(m),
        meas_dimension=rng.integers(1, 3, m).astype(np.int8),
        meas_truth_id=rng.integers(0, 2**20, m).astype(np.int64),
        event_id=7,
    )


# --- the stand-in worker ---------------------------------------------------------------------------


class InstantWorker(threading.Thread):
    """Registers with the broker and answers every job at once with the same packed tracks."""

    def __init__(self, endpoint: str, tracks_payload: tuple[Any, ...], delay_s: float = 0.0) -> None:
        super().__init__(name="instant-worker", daemon=True)
        self.endpoint = endpoint
        self.payload = tracks_payload
        self.delay_s = delay_s
        self.stop = threading.Event()

    def run(self) -> None:
        import zmq

        from broker.protocol import (
            Disconnect,
            Job,
            Ready,
            WorkerHeartbeat,
            WorkResult,
            decode_worker,
            encode,
        )

        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        ready = encode(Ready(capacity=4, info={"backend": "instant", "name": "instant"}))
        sock.send_multipart(ready)
        next_hb = time.monotonic() + 0.5
        while not self.stop.is_set():
            if sock.poll(100):
                msg = decode_worker(sock.recv_multipart(copy=False))
                if isinstance(msg, Job):
                    if self.delay_s > 0:
                        time.sleep(self.delay_s)
                    timings = {"decode_s": 0.0, "chain_s": 0.0, "pack_s": 0.0, "worker_queue_s": 0.0}
                    result = WorkResult(msg.job, msg.epoch, timings, self.payload)
                    sock.send_multipart(encode(result), copy=False)
                elif isinstance(msg, Disconnect):
                    sock.send_multipart(ready)
            if time.monotonic() >= next_hb:
                sock.send_multipart(encode(WorkerHeartbeat()))
                next_hb = time.monotonic() + 0.5
        sock.close(0)


# --- the gateway process ---------------------------------------------------------------------------


def serve(args: argparse.Namespace) -> int:
    """Run the gateway with timing wrappers until SIGTERM; then write what they timed."""
    sys.path.insert(0, str(args.root or ROOT))  # the trackfleet tree under test
    import producer.gateway.grpc_server as gs
    import producer.gateway.http_server as hs
    import producer.gateway.service as svc
    from producer.gateway.app import GatewayApp, Ports
    from producer.gateway.service import GatewayConfig

    local = threading.local()
    records: list[dict[str, float]] = []

    def add(phase: str, dt: float) -> None:
        t = getattr(local, "t", None)
        if t is not None:
            t[phase] = t.get(phase, 0.0) + dt

    def timed(phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                add(phase, time.perf_counter() - t0)

        return wrapper

    def request_scope(proto: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **kw: Any) -> Any:
            local.t = {"minflt": resource.getrusage(resource.RUSAGE_SELF).ru_minflt}
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                t, local.t = local.t, None
                t["total"] = time.perf_counter() - t0
                t["t0"], t["t1"] = t0, t0 + t["total"]  # perf_counter is system-wide on Linux
                t["proto"] = proto  # type: ignore[assignment]
                records.append(t)

        return wrapper

    # the phases inside Gateway.infer, by the names the service module uses (whichever exist)
    for name, phase in (
        ("decode_inputs", "decode"),
        ("cells_from_inputs", "pack"),
        ("pack_event", "pack"),
        ("pack_inputs", "pack"),
        ("unpack_tracks", "output"),
        ("outputs_from_tracks", "output"),
    ):
        if hasattr(svc, name):
            setattr(svc, name, timed(phase, getattr(svc, name)))
    if hasattr(svc, "write_outputs"):
        svc.write_outputs = timed("write_shm", svc.write_outputs)
    # the broker round trip as the gateway sees it: ``to_reply`` from the request's hand-over to the
    # bridge until its thread holds the reply, ``wake`` from then until the request's thread goes on
    bridge_submit = svc.BrokerBridge.submit

    def submit(self: Any, *a: Any, **kw: Any) -> Any:
        t = getattr(local, "t", None)
        t_sub = time.perf_counter()
        fut = bridge_submit(self, *a, **kw)
        if t is not None:

            def done(_f: Any) -> None:
                t["to_reply"] = time.perf_counter() - t_sub
                t["_done"] = time.perf_counter()

            fut.add_done_callback(done)
        return fut

    svc.BrokerBridge.submit = submit  # type: ignore[method-assign]
    unpack = getattr(svc, "unpack_tracks", None)
    if unpack is not None:

        def unpack_tracks(*a: Any, **kw: Any) -> Any:
            t = getattr(local, "t", None)
            if t is not None and "_done" in t:
                t["wake"] = time.perf_counter() - t.pop("_done")
            return unpack(*a, **kw)

        svc.unpack_tracks = unpack_tracks
    infer = timed("infer", svc.Gateway.infer)

    def infer_with_id(*a: Any, **kw: Any) -> Any:
        t = getattr(local, "t", None)
        if t is not None:
            t["id"] = kw.get("request_id", "")
        return infer(*a, **kw)

    svc.Gateway.infer = infer_with_id  # type: ignore[method-assign]
    # HTTP: the whole POST (body read included), the KServe parsing, the response
    for name in ("_split_body", "_parse_request"):
        setattr(hs, name, timed("parse", getattr(hs, name)))
    hs._Handler._respond = timed("respond", hs._Handler._respond)  # type: ignore[method-assign]
    original_infer = hs._Handler._infer
    hs._Handler._infer = request_scope("http", original_infer)  # type: ignore[method-assign]
    original_dispatch = hs._Handler._dispatch

    def dispatch(self: Any, method: str) -> Any:
        t0 = time.perf_counter()
        out = original_dispatch(self, method)
        if records and records[-1].get("proto") == "http" and "handler" not in records[-1]:
            records[-1]["handler"] = time.perf_counter() - t0
            records[-1]["t0_http"] = t0
        return out

    hs._Handler._dispatch = dispatch  # type: ignore[method-assign]
    # gRPC: the handler (after grpc parsed the message), the conversion to inputs
    for name in ("_inputs", "split_infer_request"):
        if hasattr(gs, name):
            setattr(gs, name, timed("parse", getattr(gs, name)))
    build = gs.build_servicer

    def build_servicer(gateway: Any) -> Any:
        servicer = build(gateway)
        cls = type(servicer)
        cls.ModelInfer = request_scope("grpc", cls.ModelInfer)
        if hasattr(servicer, "model_infer_bytes"):  # ModelInfer on the message's bytes
            servicer.model_infer_bytes = request_scope("grpc", servicer.model_infer_bytes)
        return servicer

    gs.build_servicer = build_servicer  # type: ignore[assignment]

    settings: dict[str, Any] = {}
    if args.pack_threads and "pack_threads" in {f.name for f in dataclasses.fields(GatewayConfig)}:
        settings["pack_threads"] = args.pack_threads
    config = GatewayConfig(broker=args.broker, detector=args.detector, request_timeout_s=60.0, **settings)
    http_port, grpc_port, metrics_port = (int(x) for x in args.ports.split(","))
    app = GatewayApp(
        config, Ports("127.0.0.1", http_port, grpc_port, metrics_port), grpc_threads=args.grpc_threads
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    app.start()
    app.write_endpoints(args.endpoints_file)
    stop.wait()
    app.stop(grace_s=1.0)
    args.timings_file.write_text(json.dumps(records))
    return 0


# --- the client side --------------------------------------------------------------------------------

DATATYPE = {"<u8": "UINT64", "<i4": "INT32", "<f4": "FP32", "<i8": "INT64"}
Call = Callable[[str], Any]  # one request, with this request id


def tritonclient_http(port: int, tensors: dict[str, np.ndarray], outputs: list[str]) -> Call:
    import tritonclient.http as mod

    client = mod.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=120.0)

    def call(request_id: str) -> Any:
        inputs = []
        for name, arr in tensors.items():
            t = mod.InferInput(name, list(arr.shape), DATATYPE[arr.dtype.str])
            t.set_data_from_numpy(arr, binary_data=True)
            inputs.append(t)
        wanted = [mod.InferRequestedOutput(o, binary_data=True) for o in outputs]
        return client.infer("trackfleet", inputs, outputs=wanted, request_id=request_id)

    return call


def tritonclient_grpc(port: int, tensors: dict[str, np.ndarray], outputs: list[str]) -> Call:
    import tritonclient.grpc as mod

    client = mod.InferenceServerClient(f"127.0.0.1:{port}")

    def call(request_id: str) -> Any:
        inputs = []
        for name, arr in tensors.items():
            t = mod.InferInput(name, list(arr.shape), DATATYPE[arr.dtype.str])
            t.set_data_from_numpy(arr)
            inputs.append(t)
        return client.infer("trackfleet", inputs, request_id=request_id)

    return call


def raw_grpc(port: int, tensors: dict[str, np.ndarray], outputs: list[str]) -> Call:
    """ModelInfer with the request serialized once per id, as a C++ client (perf_analyzer) nearly does."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb

    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}",
        options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)],
    )
    rpc = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=None,
        response_deserializer=pb.ModelInferResponse.FromString,
    )
    wire: dict[str, bytes] = {}

    def call(request_id: str) -> Any:
        if request_id not in wire:
            req = pb.ModelInferRequest(model_name="trackfleet", id=request_id)
            for name, arr in tensors.items():
                req.inputs.add(name=name, datatype=DATATYPE[arr.dtype.str], shape=list(arr.shape))
                req.raw_input_contents.append(arr.tobytes())
            wire[request_id] = req.SerializeToString()
        r = rpc(wire[request_id])
        assert len(r.raw_output_contents) == len(outputs)
        return r

    return call


def raw_http(port: int, tensors: dict[str, np.ndarray], outputs: list[str]) -> Call:
    """POST .../infer with the binary-extension body built once per id, over one keep-alive connection."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    bodies: dict[str, tuple[bytes, int]] = {}

    def call(request_id: str) -> bytes:
        if request_id not in bodies:
            header = {
                "id": request_id,
                "inputs": [
                    {
                        "name": name,
                        "shape": list(arr.shape),
                        "datatype": DATATYPE[arr.dtype.str],
                        "parameters": {"binary_data_size": arr.nbytes},
                    }
                    for name, arr in tensors.items()
                ],
                "outputs": [{"name": o, "parameters": {"binary_data": True}} for o in outputs],
            }
            head = json.dumps(header).encode()
            bodies[request_id] = (b"".join([head, *(a.tobytes() for a in tensors.values())]), len(head))
        body, head_len = bodies[request_id]
        headers = {
            "Inference-Header-Content-Length": str(head_len),
            "Content-Type": "application/octet-stream",
        }
        conn.request("POST", "/v2/models/trackfleet/infer", body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        assert r.status == 200, data[:200]
        return data

    return call


def direct_client(endpoint: str, payload: tuple[Any, ...]) -> tuple[Call, Callable[[], None]]:
    """The packed event straight into the broker (what the gateway's own hop costs at least)."""
    from producer.client import ClientConfig, FleetClient

    client = FleetClient(ClientConfig(endpoint=endpoint, timeout_s=30.0))
    seq = iter(range(10**9))

    def call(request_id: str) -> Any:
        client.submit(next(seq), 7, payload)
        while not (replies := client.poll(1.0)):
            pass
        assert replies[0].ok, replies[0]
        return replies[0]

    return call, client.close


def median_ms(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1e3, 2) if xs else float("nan")


def gateway_phases(rs: list[dict[str, Any]], spans: list[tuple[float, float]]) -> dict[str, float]:
    """Median time of each phase inside the gateway [ms], and around its handler."""
    phases = {key: median_ms([r.get(key, 0.0) for r in rs]) for key in ("parse", "decode", "pack")}
    phases["fleet"] = median_ms(
        [r["infer"] - r.get("decode", 0) - r.get("pack", 0) - r.get("output", 0) for r in rs]
    )
    phases["output"] = median_ms([r.get("output", 0.0) for r in rs])
    for key in ("to_reply", "wake", "write_shm"):  # trees whose gateway has these steps
        if any(key in r for r in rs):
            phases[key] = median_ms([r.get(key, 0.0) for r in rs])
    # what is left of the handler: response encoding and writing (+ routing)
    phases["respond"] = median_ms([r["total"] - r["infer"] - r.get("parse", 0) for r in rs])
    phases["handler"] = median_ms([r["total"] for r in rs])
    if rs and "handler" in rs[0]:  # HTTP: from the request's headers to the response written
        phases["read"] = median_ms([r["handler"] - r["total"] for r in rs])
        phases["handler"] = median_ms([r["handler"] for r in rs])
    # page faults of the gateway process from one request's handler start to the next's
    faults = [b["minflt"] - a["minflt"] for a, b in itertools.pairwise(rs) if "minflt" in a]
    if faults:
        phases["page_faults"] = float(statistics.median(faults))
    # client send -> handler start (transport, gRPC's parse), handler end -> client holds the answer
    t0 = [r.get("t0_http", r["t0"]) for r in rs]
    phases["before_handler"] = median_ms([a - c0 for a, (c0, _) in zip(t0, spans, strict=True)])
    phases["after_handler"] = median_ms([c1 - r["t1"] for r, (_, c1) in zip(rs, spans, strict=True)])
    return phases


def grpc_codec_times(tensors: dict[str, np.ndarray], n: int = 10) -> float:
    """Protobuf's own parse of the request [ms] (gRPC does it before the handler runs)."""
    from tritonclient.grpc import service_pb2 as pb

    req = pb.ModelInferRequest(model_name="trackfleet")
    for name, arr in tensors.items():
        req.inputs.add(name=name, datatype=DATATYPE[arr.dtype.str], shape=list(arr.shape))
        req.raw_input_contents.append(arr.tobytes())
    wire = req.SerializeToString()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        pb.ModelInferRequest.FromString(wire)
        out.append(time.perf_counter() - t0)
    return median_ms(out)


class Unsupported(Exception):
    """The gateway under test lacks what a path needs (a baseline from before a feature)."""


#: run at the end, whatever happens (shared memory regions to unlink)
CLEANUP: list[Callable[[], None]] = []
SHM_SLOT = 4 * 2**20  # shared memory per output [bytes] (the default answer's largest is ~0.5 MB)


def shm_client(module_name: str) -> Callable[[int, dict[str, np.ndarray], list[str]], Call]:
    """tritonclient with every input and output in system shared memory, registered and written once
    (as perf_analyzer --shared-memory system does): only the requests' JSON / protobuf crosses the socket."""

    def make(port: int, tensors: dict[str, np.ndarray], outputs: list[str]) -> Call:
        import importlib

        import tritonclient.utils.shared_memory as shm

        mod = importlib.import_module(module_name)
        http = module_name.endswith("http")
        client = mod.InferenceServerClient(
            f"127.0.0.1:{port}", **({"network_timeout": 120.0} if http else {})
        )
        meta = client.get_server_metadata() if http else client.get_server_metadata(as_json=True)
        if "system_shared_memory" not in meta.get("extensions", []):
            raise Unsupported("the gateway has no system_shared_memory extension")
        tag = f"gateway-latency-{os.getpid()}-{port}"
        sizes = {f"{tag}-in": sum(a.nbytes for a in tensors.values()), f"{tag}-out": SHM_SLOT * len(outputs)}
        regions = {}
        for name, size in sizes.items():
            regions[name] = shm.create_shared_memory_region(name, "/" + name, size)
            CLEANUP.append(lambda h=regions[name]: shm.destroy_shared_memory_region(h))
            client.register_system_shared_memory(name, "/" + name, size)
        inputs, offset = [], 0
        for name, arr in tensors.items():
            shm.set_shared_memory_region(regions[f"{tag}-in"], [arr], offset=offset)
            t = mod.InferInput(name, list(arr.shape), DATATYPE[arr.dtype.str])
            t.set_shared_memory(f"{tag}-in", arr.nbytes, offset=offset)
            inputs.append(t)
            offset += arr.nbytes
        wanted = []
        for i, o in enumerate(outputs):
            r = mod.InferRequestedOutput(o)
            r.set_shared_memory(f"{tag}-out", SHM_SLOT, offset=i * SHM_SLOT)
            wanted.append(r)

        def call(request_id: str) -> Any:
            return client.infer("trackfleet", inputs, outputs=wanted, request_id=request_id)

        return call

    return make


CLIENTS: dict[str, tuple[str, Callable[[int, dict[str, np.ndarray], list[str]], Call]]] = {
    "http_raw": ("http", raw_http),
    "grpc_raw": ("grpc", raw_grpc),
    "http": ("http", tritonclient_http),
    "grpc": ("grpc", tritonclient_grpc),
    "http_shm": ("http", shm_client("tritonclient.http")),
    "grpc_shm": ("grpc", shm_client("tritonclient.grpc")),
}


def _git_head(root: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True, text=True
        )
        return out.stdout.strip()
    except OSError:
        return ""


def start_gateway(
    broker: str, run: Path, tag: str, root: Path, pack_threads: int | None = None
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """A gateway (this script's ``--serve``) importing trackfleet from ``root``; its endpoints and timings files."""
    ep, timings = run / f"gateway{tag}.json", run / f"timings{tag}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", "--root", str(root), "--broker", broker]
    cmd += ["--endpoints-file", str(ep), "--timings-file", str(timings)]
    if pack_threads:
        cmd += ["--pack-threads", str(pack_threads)]
    log = (run / f"gateway{tag}.log").open("wb")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc, ep, timings


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        return serve(args)
    from kernels.edm.cells import Cells
    from kernels.edm.packed import pack_event
    from kernels.edm.packed_tracks import pack_tracks
    from producer.gateway.model import OUTPUTS
    from producer.io.detector import load_detector
    from producer.launch import LocalFleet

    outputs = [o.name for o in OUTPUTS]
    clients = [p for p in args.paths.split(",") if p != "direct"]
    trees = {"": args.tree.resolve()}
    if args.baseline is not None:
        trees["@baseline"] = args.baseline.resolve()
    paths = (["direct"] if "direct" in args.paths.split(",") else []) + [
        p + tag for p in clients for tag in trees
    ]
    tensors = synth_event(args.cells)
    n = tensors["GEOMETRY_ID"].shape[0]
    size_mb = sum(a.nbytes for a in tensors.values()) / 1e6
    header, bufs = pack_tracks(synth_tracks(args.tracks))
    cells = Cells(
        geometry_id=tensors["GEOMETRY_ID"].astype(np.uint64),
        channel0=tensors["CHANNEL0"].astype(np.int32),
        channel1=tensors["CHANNEL1"].astype(np.int32),
        activation=tensors["VALUE"].astype(np.float32),
        time=tensors["TIMESTAMP"].astype(np.float32),
        measurement_id=tensors["TRUTH_ID"].astype(np.int64),
        event_id=7,
    )
    ev_header, ev_bufs = pack_event(cells, load_detector(BUNDLED).fingerprint())
    print(f"request: {n} cells, {size_mb:.1f} MB of tensors; answer: {args.tracks} tracks", flush=True)

    run = Path(tempfile.mkdtemp(prefix="gateway-latency-"))
    fleet = LocalFleet(run / "fleet", detector=BUNDLED)
    worker = None
    gateways: dict[str, tuple[subprocess.Popen[bytes], Path, Path]] = {}
    closers: list[Callable[[], None]] = []
    spans: dict[str, list[tuple[float, float]]] = {p: [] for p in paths}
    results: dict[str, Any] = {
        "cells": n,
        "request_mb": round(size_mb, 2),
        "tracks": args.tracks,
        "cpus": args.cpus,
        "pack_threads": args.pack_threads,
        "trees": {tag or "current": f"{root} ({_git_head(root)})" for tag, root in trees.items()},
    }
    # On a small machine placement decides how fast 10 MB cross loopback: a sender and a receiver that share
    # a core take turns (on this 2-core VM, ~25 ms for a gRPC request instead of ~10). Pinning makes runs
    # comparable; the broker shares the gateway's core, which if anything overstates the gateway's cost.
    cpus = [cpu_list(c) for c in args.cpus.split(":")] if args.cpus else []
    client_cpus, server_cpus = (cpus[0], cpus[1]) if cpus else (None, None)
    broker_cpus = cpus[2] if len(cpus) > 2 else server_cpus
    try:
        if broker_cpus:
            os.sched_setaffinity(0, broker_cpus)  # inherited by the broker
        fleet.start_broker()
        if server_cpus:
            os.sched_setaffinity(0, server_cpus)  # inherited by the gateways
        for tag, root in trees.items():
            gateways[tag] = start_gateway(fleet.frontend, run, tag, root, args.pack_threads)
        if client_cpus:
            os.sched_setaffinity(0, client_cpus)  # before this process starts any thread
        worker = InstantWorker(fleet.backend, (header, *bufs), args.worker_delay_ms / 1e3)
        worker.start()
        fleet.wait_ready(1, timeout_s=20)
        calls: dict[str, Call] = {}
        if "direct" in paths:
            calls["direct"], close = direct_client(fleet.frontend, (ev_header, *ev_bufs))
            closers.append(close)
        for tag, (proc, ep, _) in gateways.items():
            deadline = time.monotonic() + 60
            while not ep.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"gateway{tag} did not start; see {run}/gateway{tag}.log")
                time.sleep(0.1)
            ports = json.loads(ep.read_text())
            for path in clients:
                proto, make = CLIENTS[path]
                try:
                    calls[path + tag] = make(ports[proto], tensors, outputs)
                except Unsupported as exc:
                    print(f"{path + tag}: skipped ({exc})", flush=True)
                    paths.remove(path + tag)
            deadline = time.monotonic() + 30
            while True:  # the first answer also proves the gateway ready
                try:
                    next(calls[p + tag] for p in clients if p + tag in calls)("warmup")
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        for path in paths:
            for _ in range(args.warmup):
                calls[path]("warmup")
        # interleaved rounds, so that a slow spell of this shared machine hits every path alike
        per_round = max(1, args.requests // args.rounds)
        for _ in range(args.rounds):
            for path in paths:
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    calls[path](path)
                    spans[path].append((t0, time.perf_counter()))
        if any(p.startswith("grpc") for p in clients):
            results["grpc_protobuf_parse_ms"] = grpc_codec_times(tensors)
    finally:
        for close in closers + CLEANUP:
            close()
        if worker is not None:
            worker.stop.set()
        for proc, _, _ in gateways.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        fleet.stop(timeout_s=10)
    records = []
    for _, _, timings in gateways.values():
        records += json.loads(timings.read_text()) if timings.exists() else []
    direct = median_ms([b - a for a, b in spans.get("direct", [])])
    for path in paths:
        e2e = median_ms([b - a for a, b in spans[path]])
        entry: dict[str, Any] = {"median_ms": e2e}
        if path != "direct":
            if "direct" in paths:
                entry["added_ms"] = round(e2e - direct, 2)
            rs = [r for r in records if r.get("id") == path]
            if len(rs) == len(spans[path]):
                entry["gateway_ms"] = gateway_phases(rs, spans[path])
        results[path] = entry
    print(json.dumps(results, indent=1))
    print(f"{'path':18s} {'median ms':>9s} {'added ms':>9s}   gateway phases [ms]")
    for path in paths:
        e = results[path]
        phases = " ".join(f"{k} {v}" for k, v in e.get("gateway_ms", {}).items())
        print(f"{path:18s} {e['median_ms']:9.2f} {e.get('added_ms', '-'):>9}   {phases}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
