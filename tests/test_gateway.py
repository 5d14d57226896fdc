"""The KServe gateway end to end: tritonclient (HTTP and gRPC) -> gateway -> broker -> numpy workers.

The fleet runs as subprocesses (as in test_fleet.py), the gateway in-process on free loopback ports.
Tracks must be identical, bit for bit, to an in-process ``Chain.reconstruct`` of the same event, and
their CSV identical to what ``trackfleet reconstruct`` writes. Every wait is bounded; fixtures always
stop what they started. Skipped when the ``triton`` extra (tritonclient, grpcio) is not installed.
"""

from __future__ import annotations

import filecmp
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
tritonclient_http = pytest.importorskip("tritonclient.http")

from tritonclient.utils import InferenceServerException  # noqa: E402

from kernels.pipeline import Chain  # noqa: E402
from producer.gateway.app import GatewayApp, Ports  # noqa: E402
from producer.gateway.gpu_metrics import GpuSample  # noqa: E402
from producer.gateway.model import tracks_from_outputs  # noqa: E402
from producer.gateway.service import GatewayConfig  # noqa: E402
from producer.launch import LocalFleet  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "data" / "generic-mu20"
FAST = ["--heartbeat-ms", "200"]
MAX_REQUEST = 3 * 2**20  # a bundled mu=20 event is ~1 MB of tensors
MAX_CELLS = 60_000

pytestmark = pytest.mark.timeout(90)

CELL_INPUTS = (
    ("GEOMETRY_ID", "geometry_id", "UINT64"),
    ("CHANNEL0", "channel0", "INT32"),
    ("CHANNEL1", "channel1", "INT32"),
    ("VALUE", "value", "FP32"),
    ("TIMESTAMP", "timestamp", "FP32"),
    ("TRUTH_ID", "measurement_id", "INT64"),
)


class FakeGpus:
    """Two GPUs with values prometheus_client would print with exponents."""

    def sample(self) -> list[GpuSample]:
        return [
            GpuSample("GPU-aaaa", 0.41, 81_559_000_000, 12_345_678_912, 312.25, 1.5e7),
            GpuSample("GPU-bbbb", 1.0, 150_000_000_000, 0, 70.0, None),
        ]


@pytest.fixture(scope="module")
def detector_cache(tmp_path_factory):
    from producer.io.detector import load_detector

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRACKFLEET_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        load_detector(BUNDLED)
        yield


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, detector_cache):
    fleet = LocalFleet(
        tmp_path_factory.mktemp("gateway-fleet"), broker_args=FAST, worker_args=FAST, detector=BUNDLED
    )
    try:
        fleet.start_broker()
        fleet.start_workers(2)
        fleet.wait_ready(2, timeout_s=60)
        yield fleet
    finally:
        fleet.stop(timeout_s=10)


def wait_ready(app: GatewayApp, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not app.gateway.ready:
        assert time.monotonic() < deadline, "gateway never became ready"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def app(fleet):
    config = GatewayConfig(
        broker=fleet.frontend,
        detector=BUNDLED,
        max_request_bytes=MAX_REQUEST,
        max_cells=MAX_CELLS,
        request_timeout_s=60.0,
    )
    app = GatewayApp(config, Ports("127.0.0.1", 0, 0, 0), grpc_threads=8, sampler=FakeGpus())
    try:
        app.start()
        wait_ready(app)
        yield app
    finally:
        app.stop(grace_s=1.0)


@pytest.fixture(scope="module")
def event():
    """Event 0 of the bundled data: raw CSV rows in file order, and the cells ``trackfleet reconstruct`` reads."""
    from producer.io.cells import read_cells_table
    from producer.io.detector import load_detector
    from producer.io.events import discover, load_cells

    source = discover(BUNDLED)[0]
    det = load_detector(BUNDLED)
    return read_cells_table(source.cells, det), load_cells(source, det)


@pytest.fixture(scope="module")
def reference(event, detector_cache, tmp_path_factory):
    """Tracks of event 0 from Chain.reconstruct, and the directory `trackfleet reconstruct` wrote."""
    from producer.cli import main as trackfleet
    from producer.io.detector import load_detector

    _, cells = event
    tracks, _ = Chain(np, load_detector(BUNDLED)).reconstruct(cells)
    out = tmp_path_factory.mktemp("reconstruct")
    rc = trackfleet(
        ["reconstruct", "--input", str(BUNDLED), "--output", str(out), "--events", "1", "--warmup", "0"]
    )
    assert rc == 0
    return tracks, out


def table_inputs(module, table: dict[str, np.ndarray], **kw) -> list:
    """tritonclient inputs from a cells table (raw CSV columns); ``kw``: set_data_from_numpy options."""
    out = []
    for name, column, datatype in CELL_INPUTS:
        arr = np.ascontiguousarray(table[column], dtype=_np_dtype(datatype))
        t = module.InferInput(name, list(arr.shape), datatype)
        t.set_data_from_numpy(arr, **kw)
        out.append(t)
    return out


def cells_table(cells) -> dict[str, np.ndarray]:
    """Cells as the columns of a cells table."""
    return {
        "geometry_id": cells.geometry_id,
        "channel0": cells.channel0,
        "channel1": cells.channel1,
        "value": cells.activation,
        "timestamp": cells.time,
        "measurement_id": cells.measurement_id,
    }


def cells_inputs(module, cells, **kw) -> list:
    return table_inputs(module, cells_table(cells), **kw)


def _np_dtype(datatype: str) -> np.dtype:
    from tritonclient.utils import triton_to_np_dtype

    return np.dtype(triton_to_np_dtype(datatype))


def assert_identical(outputs: dict[str, np.ndarray], reference_tracks, out_dir: Path, ref_dir: Path) -> None:
    from producer.io.tracks_csv import write_tracks

    got = tracks_from_outputs(outputs, event_id=reference_tracks.event_id)
    for name in (
        "params",
        "cov",
        "chi2",
        "ndf",
        "n_holes",
        "meas_offsets",
        "meas_geometry_id",
        "meas_local0",
        "meas_local1",
        "meas_dimension",
        "meas_truth_id",
    ):
        a, b = getattr(got, name), np.asarray(getattr(reference_tracks, name))
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert a.tobytes() == b.tobytes(), f"{name} differs"
    assert got.size > 100
    names = [p.name for p in write_tracks(out_dir, got)]
    _, mismatch, errors = filecmp.cmpfiles(out_dir, ref_dir, names, shallow=False)
    assert not mismatch and not errors, f"differ from `trackfleet reconstruct`: {mismatch} {errors}"


def http_client(app):
    return tritonclient_http.InferenceServerClient(f"127.0.0.1:{app.bound['http']}", network_timeout=60.0)


def grpc_client(app):
    return tritonclient_grpc.InferenceServerClient(f"127.0.0.1:{app.bound['grpc']}")


# --- inference --------------------------------------------------------------------------------------


def test_http_infer_matches_trackfleet_reconstruct(app, event, reference, tmp_path):
    # Given the raw CSV rows in file order (unsorted, as a client reading the file would send them)
    table, _ = event
    tracks, ref_dir = reference
    # When tritonclient sends them over HTTP with the binary extension
    result = http_client(app).infer("trackfleet", table_inputs(tritonclient_http, table), request_id="ev0")
    # Then the tracks are those of `trackfleet reconstruct`
    outputs = {o["name"]: result.as_numpy(o["name"]) for o in result.get_response()["outputs"]}
    assert result.get_response()["id"] == "ev0"
    assert_identical(outputs, tracks, tmp_path, ref_dir)


def test_grpc_infer_matches_trackfleet_reconstruct(app, event, reference, tmp_path):
    _, cells = event
    tracks, ref_dir = reference
    result = grpc_client(app).infer("trackfleet", cells_inputs(tritonclient_grpc, cells))
    outputs = {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}
    assert_identical(outputs, tracks, tmp_path, ref_dir)


def test_requested_outputs_and_json_data(app, event):
    # JSON (non-binary) inputs and outputs, a subset of outputs in the order asked for
    _, cells = event
    client = http_client(app)
    inputs = cells_inputs(tritonclient_http, cells, binary_data=False)
    outputs = [
        tritonclient_http.InferRequestedOutput("TRACK_LENGTH", binary_data=False),
        tritonclient_http.InferRequestedOutput("TRACK_CHI2", binary_data=True),
    ]
    result = client.infer("trackfleet", inputs, outputs=outputs)
    names = [o["name"] for o in result.get_response()["outputs"]]
    assert names == ["TRACK_LENGTH", "TRACK_CHI2"]
    assert "data" in result.get_response()["outputs"][0]
    assert result.as_numpy("TRACK_LENGTH").sum() > 0 and result.as_numpy("TRACK_CHI2").dtype == np.float64


def test_grpc_model_infer_reads_tensors_without_protobuf():
    # ModelInfer takes the message's bytes: the raw contents are cut out as views, the rest parsed
    from tritonclient.grpc import service_pb2 as pb

    from producer.gateway.grpc_server import encode_infer_response, split_infer_request
    from producer.gateway.model import InferError

    raw_field = pb.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number
    req = pb.ModelInferRequest(model_name="trackfleet", model_version="1", id="r7")
    req.parameters["priority"].int64_param = 3
    blobs = [np.arange(n, dtype=np.uint8).tobytes() for n in (0, 5, 300, 70_000)]
    for i, b in enumerate(blobs):
        req.inputs.add(name=f"I{i}", datatype="UINT8", shape=[len(b)])
        req.raw_input_contents.append(b)
    req.outputs.add(name="TRACK_PARAMS")
    wire = req.SerializeToString()
    rest, raw = split_infer_request(wire, raw_field)
    assert [bytes(r) for r in raw] == blobs
    assert all(r.obj is wire for r in raw)  # views, not copies
    plain = pb.ModelInferRequest()
    plain.CopyFrom(req)
    del plain.raw_input_contents[:]
    assert pb.ModelInferRequest.FromString(rest) == plain
    # the raw contents may come anywhere (protobuf merges concatenated messages)
    tail = pb.ModelInferRequest(raw_input_contents=[b"xyz"], id="r8").SerializeToString()
    rest, raw = split_infer_request(tail + wire, raw_field)
    assert [bytes(r) for r in raw] == [b"xyz", *blobs] and pb.ModelInferRequest.FromString(rest).id == "r7"
    for bad in (wire[:-1], b"\x0b", b"\x3a\xff", b"\x08\x80", b"\x00\x01"):
        with pytest.raises(InferError, match="malformed"):
            split_infer_request(bad, raw_field)
    # the response: protobuf's own message, raw outputs appended as the repeated field
    resp = pb.ModelInferResponse(model_name="trackfleet", model_version="1", id="r7")
    resp.outputs.add(name="A", datatype="FP64", shape=[2, 5])
    resp.outputs.add(name="B", datatype="INT8", shape=[0])
    arrays = [np.arange(10, dtype=np.float64).reshape(2, 5), np.zeros(0, np.int8)]
    out_field = pb.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number
    back = pb.ModelInferResponse.FromString(encode_infer_response(resp, out_field, arrays))
    assert list(back.raw_output_contents) == [a.tobytes() for a in arrays]
    assert back.id == "r7" and [o.name for o in back.outputs] == ["A", "B"]


def test_grpc_malformed_message_is_invalid_argument(app):
    channel = grpc.insecure_channel(f"127.0.0.1:{app.bound['grpc']}")
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
    with pytest.raises(grpc.RpcError) as err:
        call(b"\x3a\xff\xff\x03")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in err.value.details()
    channel.close()


# --- metadata, health, statistics --------------------------------------------------------------------


def test_metadata_config_health_and_statistics(app):
    h, g = http_client(app), grpc_client(app)
    for client in (h, g):
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("trackfleet")
    assert not h.is_model_ready("nope")
    with pytest.raises(InferenceServerException):
        g.is_model_ready("nope")
    assert "statistics" in h.get_server_metadata()["extensions"]
    meta = h.get_model_metadata("trackfleet")
    assert meta["versions"] == ["1"]
    assert {i["name"]: i["datatype"] for i in meta["inputs"]}["GEOMETRY_ID"] == "UINT64"
    config = h.get_model_config("trackfleet")
    assert config["max_batch_size"] == 0 and config["input"][0]["dims"] == [-1]
    gconfig = g.get_model_config("trackfleet", as_json=True)["config"]
    assert gconfig.get("max_batch_size", 0) == 0  # proto3 JSON leaves zeros out
    assert [i["name"] for i in gconfig["input"]] == [i["name"] for i in config["input"]]
    assert "statistics" in g.get_server_metadata(as_json=True)["extensions"]
    assert g.get_model_metadata("trackfleet", as_json=True)["outputs"][0]["name"] == "TRACK_PARAMS"
    # statistics: one of each duration per successful request, so the compute counts always agree
    for stats in (
        h.get_inference_statistics("trackfleet"),
        g.get_inference_statistics("trackfleet", as_json=True),
    ):
        (m,) = stats["model_stats"]
        s = m["inference_stats"]
        n = int(s["success"]["count"])
        assert n >= 1 and int(m["inference_count"]) == n and int(m["execution_count"]) == n
        for key in ("queue", "compute_input", "compute_infer", "compute_output"):
            assert int(s[key]["count"]) == n, key
        assert int(s["compute_infer"]["ns"]) > 0 and int(s["success"]["ns"]) >= int(s["compute_infer"]["ns"])
    assert h.get_inference_statistics()["model_stats"][0]["name"] == "trackfleet"


def test_metrics_port_serves_gpu_gauges_in_perf_analyzer_form(app):
    import re

    conn = http.client.HTTPConnection("127.0.0.1", app.bound["metrics"], timeout=10)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    text = resp.read().decode()
    assert resp.status == 200 and "e+" not in text and "e-" not in text
    # perf_analyzer's own regular expression (triton_client_backend.h)
    found = {}
    for name in (
        "nv_gpu_utilization",
        "nv_gpu_power_usage",
        "nv_gpu_memory_used_bytes",
        "nv_gpu_memory_total_bytes",
    ):
        found[name] = dict(re.findall(r"\n" + name + r"\{gpu_uuid=\"([^\"]+)\"\} (\d+\.?\d*)", text))
    assert found["nv_gpu_utilization"] == {"GPU-aaaa": "0.410000", "GPU-bbbb": "1"}
    assert found["nv_gpu_memory_total_bytes"]["GPU-aaaa"] == "81559000000"
    assert found["nv_gpu_memory_used_bytes"]["GPU-aaaa"] == "12345678912"
    assert found["nv_gpu_power_usage"]["GPU-aaaa"] == "312.250000"
    assert 'nv_inference_request_success{model="trackfleet",version="1"}' in text


# --- errors -----------------------------------------------------------------------------------------


def _small_inputs(module, n: int = 10, **override):
    g = np.full(n, 936748859932016651, np.uint64)  # overridden where a test needs it
    cols = {
        "GEOMETRY_ID": g,
        "CHANNEL0": np.arange(n, dtype=np.int32),
        "CHANNEL1": np.zeros(n, np.int32),
        "VALUE": np.ones(n, np.float32),
    }
    cols.update(override)
    out = []
    for name, arr in cols.items():
        datatype = {
            np.dtype(np.uint64): "UINT64",
            np.dtype(np.int32): "INT32",
            np.dtype(np.float32): "FP32",
            np.dtype(np.int64): "INT64",
            np.dtype(np.float64): "FP64",
        }[arr.dtype]
        t = module.InferInput(name, list(arr.shape), datatype)
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


@pytest.mark.parametrize("module", [tritonclient_http, tritonclient_grpc], ids=["http", "grpc"])
def test_kserve_errors_and_the_gateway_keeps_serving(app, event, module):
    client = http_client(app) if module is tritonclient_http else grpc_client(app)
    http = module is tritonclient_http
    _, cells = event
    good = cells_inputs(module, cells)

    def fails(call, status_http: str, status_grpc: str, text: str) -> None:
        with pytest.raises(InferenceServerException) as err:
            call()
        assert err.value.status() == (status_http if http else status_grpc), err.value
        assert text in err.value.message(), err.value.message()

    # unknown model and version
    fails(lambda: client.infer("nope", good), "404", "StatusCode.NOT_FOUND", "unknown model")
    fails(
        lambda: client.infer("trackfleet", good, model_version="7"),
        "404",
        "StatusCode.NOT_FOUND",
        "version 7",
    )
    fails(lambda: client.get_model_metadata("nope"), "404", "StatusCode.NOT_FOUND", "unknown model")
    # wrong dtype, wrong shape, missing input, unknown input, inconsistent lengths
    fails(
        lambda: client.infer("trackfleet", _small_inputs(module, CHANNEL0=np.arange(10, dtype=np.int64))),
        "400",
        "StatusCode.INVALID_ARGUMENT",
        "datatype 'INT64' does not match",
    )
    bad_shape = _small_inputs(module)
    bad_shape[1] = module.InferInput("CHANNEL0", [10, 1], "INT32")
    bad_shape[1].set_data_from_numpy(np.zeros((10, 1), np.int32))
    fails(
        lambda: client.infer("trackfleet", bad_shape), "400", "StatusCode.INVALID_ARGUMENT", "shape [10, 1]"
    )
    fails(
        lambda: client.infer("trackfleet", _small_inputs(module)[:3]),
        "400",
        "StatusCode.INVALID_ARGUMENT",
        "VALUE",
    )
    extra = module.InferInput("COLOUR", [1], "INT32")
    extra.set_data_from_numpy(np.zeros(1, np.int32))
    fails(
        lambda: client.infer("trackfleet", [*_small_inputs(module), extra]),
        "400",
        "StatusCode.INVALID_ARGUMENT",
        "unexpected inference input 'COLOUR'",
    )
    fails(
        lambda: client.infer("trackfleet", _small_inputs(module, VALUE=np.ones(9, np.float32))),
        "400",
        "StatusCode.INVALID_ARGUMENT",
        "differ in length",
    )
    # bad values: negative channel, a module the detector does not have and a non-finite charge (both
    # refused by the worker, which holds the detector), an event id >= 2^63
    fails(
        lambda: client.infer("trackfleet", _small_inputs(module, CHANNEL1=np.full(10, -1, np.int32))),
        "400",
        "StatusCode.INVALID_ARGUMENT",
        "negative channel",
    )
    fails(
        lambda: client.infer("trackfleet", _small_inputs(module, GEOMETRY_ID=np.full(10, 12345, np.uint64))),
        "400",
        "StatusCode.INVALID_ARGUMENT",
        "does not fit detector",
    )
    fails(
        lambda: client.infer(
            "trackfleet",
            _small_inputs(
                module,
                GEOMETRY_ID=np.asarray(cells.geometry_id[:10], np.uint64),
                CHANNEL0=np.asarray(cells.channel0[:10], np.int32),
                CHANNEL1=np.asarray(cells.channel1[:10], np.int32),
                VALUE=np.r_[np.float32(np.nan), np.ones(9, np.float32)],
            ),
        ),
        "400",
        "StatusCode.INVALID_ARGUMENT",
        "not finite",
    )
    big_id = module.InferInput("EVENT_ID", [1], "UINT64")
    big_id.set_data_from_numpy(np.array([2**63], np.uint64))
    fails(lambda: client.infer("trackfleet", [*good, big_id]), "400", "StatusCode.INVALID_ARGUMENT", "2^63")
    # oversized: more cells than allowed, and a request above the byte limit
    n = MAX_CELLS + 1
    fails(
        lambda: client.infer("trackfleet", _small_inputs(module, n, CHANNEL0=np.zeros(n, np.int32))),
        "413",
        "StatusCode.RESOURCE_EXHAUSTED",
        "exceed the limit",
    )
    n = MAX_REQUEST // 8
    fails(
        lambda: client.infer("trackfleet", _small_inputs(module, n, CHANNEL0=np.zeros(n, np.int32))),
        "413",
        "StatusCode.RESOURCE_EXHAUSTED",
        "exceeds" if http else "",
    )
    # and the gateway still answers
    result = client.infer("trackfleet", good)
    assert result.as_numpy("TRACK_PARAMS").shape[0] > 100


# --- system shared memory ---------------------------------------------------------------------------

SLOT = 2**20  # bytes of shared memory per output (a bundled event's largest output is ~100 kB)


@pytest.fixture
def shm_regions():
    """Creates system shared memory regions (keys unique to this process) and always destroys them."""
    import tritonclient.utils.shared_memory as shm

    handles = []

    def create(name: str, byte_size: int):
        handle = shm.create_shared_memory_region(name, f"/trackfleet-test-{os.getpid()}-{name}", byte_size)
        handles.append(handle)
        return handle

    yield create
    for handle in handles:
        shm.destroy_shared_memory_region(handle)


def _shm_infer(module, client, table, create, tag: str, in_shm: list[str]) -> dict[str, np.ndarray]:
    """The cells table's inputs and the outputs ``in_shm`` through shared memory (the other outputs as
    binary data); returns all outputs."""
    import tritonclient.utils.shared_memory as shm

    from producer.gateway.model import OUTPUTS

    inputs = table_inputs(module, table)
    arrays = [np.ascontiguousarray(table[column], dtype=_np_dtype(dt)) for _, column, dt in CELL_INPUTS]
    sizes = [a.nbytes for a in arrays]
    region_in = create(f"{tag}-in", sum(sizes))
    region_out = create(f"{tag}-out", SLOT * len(OUTPUTS))
    client.register_system_shared_memory(f"{tag}-in", region_in._shm_key, sum(sizes))
    client.register_system_shared_memory(f"{tag}-out", region_out._shm_key, SLOT * len(OUTPUTS))
    try:
        offset = 0
        for t, a in zip(inputs, arrays, strict=True):
            shm.set_shared_memory_region(region_in, [a], offset=offset)
            t.set_shared_memory(f"{tag}-in", a.nbytes, offset=offset)
            offset += a.nbytes
        outputs = []
        for i, spec in enumerate(OUTPUTS):
            o = module.InferRequestedOutput(
                spec.name, **({"binary_data": True} if module is tritonclient_http else {})
            )
            if spec.name in in_shm:
                o.set_shared_memory(f"{tag}-out", SLOT, offset=i * SLOT)
            outputs.append(o)
        result = client.infer("trackfleet", inputs, outputs=outputs)
        got = {}
        for i, spec in enumerate(OUTPUTS):
            meta = result.get_output(spec.name)
            if spec.name in in_shm:
                if isinstance(meta, dict):  # HTTP: Triton's C++ client reads output parameters as binary data
                    assert "parameters" not in meta, meta
                shape = list(meta["shape"] if isinstance(meta, dict) else meta.shape)
                got[spec.name] = shm.get_contents_as_numpy(
                    region_out, _np_dtype(spec.datatype), shape, offset=i * SLOT
                ).copy()
            else:
                got[spec.name] = result.as_numpy(spec.name)
        return got
    finally:
        client.unregister_system_shared_memory(f"{tag}-in")
        client.unregister_system_shared_memory(f"{tag}-out")


@pytest.mark.parametrize("module", [tritonclient_http, tritonclient_grpc], ids=["http", "grpc"])
def test_tensors_in_system_shared_memory_give_the_same_tracks(
    app, event, reference, tmp_path, shm_regions, module
):
    # Given the server advertises the extension
    client = http_client(app) if module is tritonclient_http else grpc_client(app)
    meta = (
        client.get_server_metadata()
        if module is tritonclient_http
        else client.get_server_metadata(as_json=True)
    )
    assert "system_shared_memory" in meta["extensions"]
    table, cells = event
    tracks, ref_dir = reference
    # When every input and half of the outputs go through shared memory (the rest as binary data,
    # so that gRPC's raw_output_contents must stay in output order); HTTP sends the CSV rows in file
    # order (sorted and merged in the gateway), gRPC the sorted cells
    in_shm = ["TRACK_PARAMS", "TRACK_COV", "TRACK_NDF", "MEASUREMENTS", "MEASUREMENT_TRUTH_ID"]
    columns = table if module is tritonclient_http else cells_table(cells)
    outputs = _shm_infer(module, client, columns, shm_regions, module.__name__.split(".")[-1], in_shm)
    # Then the tracks are those of `trackfleet reconstruct`, and nothing stays registered
    assert_identical(outputs, tracks, tmp_path, ref_dir)
    status = client.get_system_shared_memory_status()
    assert (status if module is tritonclient_http else list(status.regions)) == []


@pytest.mark.parametrize("module", [tritonclient_http, tritonclient_grpc], ids=["http", "grpc"])
def test_cuda_shared_memory_holds_nothing_and_is_refused(app, module):
    """perf_analyzer unregisters CUDA regions too when it starts and stops: that must succeed."""
    http = module is tritonclient_http
    client = http_client(app) if http else grpc_client(app)
    status = client.get_cuda_shared_memory_status()
    assert (status if http else list(status.regions)) == []
    client.unregister_cuda_shared_memory()
    client.unregister_cuda_shared_memory("any")
    if http:
        with pytest.raises(InferenceServerException) as err:
            client.register_cuda_shared_memory("r", b"handle", 0, 16)
        assert err.value.status() == "400" and "not supported" in err.value.message()


@pytest.mark.parametrize("module", [tritonclient_http, tritonclient_grpc], ids=["http", "grpc"])
def test_system_shared_memory_errors(app, event, shm_regions, module):
    http = module is tritonclient_http
    client = http_client(app) if http else grpc_client(app)
    tag = "err-http" if http else "err-grpc"

    def fails(call, status_http: str, status_grpc: str, text: str) -> None:
        with pytest.raises(InferenceServerException) as err:
            call()
        assert err.value.status() == (status_http if http else status_grpc), err.value
        assert text in err.value.message(), err.value.message()

    bad = ("400", "StatusCode.INVALID_ARGUMENT")
    unknown = ("404", "StatusCode.NOT_FOUND")
    region = shm_regions(tag, 4096)
    key = region._shm_key
    # registration: a key that is no file, one that is not a plain name, beyond the file, a taken name
    fails(lambda: client.register_system_shared_memory(tag, key + "-gone", 16), *bad, "cannot open")
    fails(lambda: client.register_system_shared_memory(tag, "../etc/passwd", 16), *bad, "plain name")
    fails(lambda: client.register_system_shared_memory(tag, key, 4000, offset=100), *bad, "exceed the 4096")
    client.register_system_shared_memory(tag, key, 4000, offset=96)
    try:
        taken = ("400", "StatusCode.ALREADY_EXISTS")
        fails(lambda: client.register_system_shared_memory(tag, key, 16), *taken, "already registered")
        status = client.get_system_shared_memory_status(tag)
        if http:
            assert status == [{"name": tag, "key": key, "offset": 96, "byte_size": 4000}]
        else:
            assert status.regions[tag].byte_size == 4000 and status.regions[tag].key == key
        # inference: an unknown region, a slice beyond the region, a byte size that is not the tensor's
        inputs = _small_inputs(module)
        inputs[3].set_shared_memory("nowhere", 40)
        fails(lambda: client.infer("trackfleet", inputs), *bad, "no shared memory region 'nowhere'")
        inputs[3].set_shared_memory(tag, 40, offset=3990)
        fails(lambda: client.infer("trackfleet", inputs), *bad, "exceed the 4000 bytes")
        inputs = _small_inputs(module)  # tritonclient keeps an old offset when the new one is 0
        inputs[3].set_shared_memory(tag, 36)
        fails(lambda: client.infer("trackfleet", inputs), *bad, "36 bytes of data")
        # an output region too small for the output: named, with the bytes needed and given
        _, cells = event
        out = module.InferRequestedOutput("TRACK_COV")
        out.set_shared_memory(tag, 64)
        fails(
            lambda: client.infer("trackfleet", cells_inputs(module, cells), outputs=[out]),
            *bad,
            "output 'TRACK_COV' needs",
        )
    finally:
        client.unregister_system_shared_memory(tag)
    # unregistering or asking for a name that is not registered
    fails(lambda: client.unregister_system_shared_memory(tag), *unknown, f"no shared memory region '{tag}'")
    fails(lambda: client.get_system_shared_memory_status(tag), *unknown, "is registered")
    # and the gateway still answers
    assert client.is_server_ready()


def _raw_http(app, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", app.bound["http"], timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data) if data else None


def test_http_protocol_errors_are_kserve_errors(app):
    infer = "/v2/models/trackfleet/infer"
    cases = [
        ("GET", "/v2/nothing", b"", {}, 404),
        ("POST", infer, b"{not json", {}, 400),
        ("POST", infer, b"[1, 2]", {}, 400),
        ("POST", infer, b'{"inputs": []}', {}, 400),
        ("POST", infer, b'{"inputs": [{"name": "VALUE"}]}', {}, 400),
        (
            "POST",
            infer,
            b'{"inputs": [{"name": "VALUE", "datatype": "FP32", "shape": [4], "parameters": {"binary_data_size": 16}}]}',
            {"Inference-Header-Content-Length": "999"},
            400,
        ),
        ("POST", infer, b"{}" + b"\0" * 8, {"Inference-Header-Content-Length": "2"}, 400),
        ("POST", infer, b"{}", {"Content-Encoding": "br"}, 400),
        ("POST", "/v2/models/nope/infer", b"{}", {}, 404),
    ]
    for method, path, body, headers, status in cases:
        got, payload = _raw_http(app, method, path, body, headers)
        assert got == status, (path, body, got, payload)
        assert isinstance(payload["error"], str) and payload["error"]
    # an announced body above the limit is refused before it is sent
    conn = http.client.HTTPConnection("127.0.0.1", app.bound["http"], timeout=30)
    conn.putrequest("POST", infer)
    conn.putheader("Content-Length", str(MAX_REQUEST + 1))
    conn.putheader("Expect", "100-continue")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "exceeds" in json.loads(resp.read())["error"]
    conn.close()
    assert _raw_http(app, "GET", "/v2/health/live")[0] == 200


# --- never losing an accepted request ----------------------------------------------------------------


def test_requests_pending_at_shutdown_get_an_error_reply(tmp_path):
    # A gateway whose broker never answers: requests wait in the fleet's queue...
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = GatewayConfig(broker=f"tcp://127.0.0.1:{port}", max_in_flight=1, request_timeout_s=60.0)
    app = GatewayApp(config, Ports("127.0.0.1", 0, -1, -1))
    app.start()
    try:
        assert not app.gateway.ready
        client = tritonclient_http.InferenceServerClient(f"127.0.0.1:{app.bound['http']}", network_timeout=30)
        assert not client.is_server_ready()
        results: list = []

        def send() -> None:  # geventhttpclient clients belong to the thread that made them
            c = tritonclient_http.InferenceServerClient(f"127.0.0.1:{app.bound['http']}", network_timeout=30)
            try:
                results.append(c.infer("trackfleet", _small_inputs(tritonclient_http)))
            except InferenceServerException as exc:
                results.append(exc)

        first = threading.Thread(target=send)
        first.start()
        deadline = time.monotonic() + 10
        while app.gateway.bridge.in_flight < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # ... a request beyond the in-flight bound is refused at once ...
        client2 = tritonclient_http.InferenceServerClient(
            f"127.0.0.1:{app.bound['http']}", network_timeout=30
        )
        with pytest.raises(InferenceServerException) as err:
            client2.infer("trackfleet", _small_inputs(tritonclient_http))
        assert err.value.status() == "503"
    finally:
        # ... and stopping the gateway answers the accepted one instead of dropping it
        app.stop(grace_s=0.5)
    first.join(15)
    assert len(results) == 1 and isinstance(results[0], InferenceServerException)
    assert results[0].status() == "503" and "stopped" in results[0].message()


def test_cli_serves_until_sigterm(fleet, tmp_path):
    ep = tmp_path / "endpoints.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "producer.gateway",
            "--broker",
            fleet.frontend,
            "--http-port",
            "0",
            "--grpc-port",
            "0",
            "--metrics-port",
            "0",
            "--endpoints-file",
            str(ep),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while not ep.exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.05)
        ports = json.loads(ep.read_text())
        client = tritonclient_grpc.InferenceServerClient(f"127.0.0.1:{ports['grpc']}")
        assert client.is_server_live()
        deadline = time.monotonic() + 15
        while not client.is_server_ready():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
