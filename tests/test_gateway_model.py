"""The gateway's pure parts, without servers or the ``triton`` extra: tensor checks, cells, outputs,
statistics, metrics text and perf_analyzer input data."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import replace

import msgpack
import numpy as np
import pytest

from kernels.edm.cells import Cells, merge_duplicate_cells
from producer.gateway import model
from producer.gateway.gpu_metrics import GpuSample, NvmlSampler, plain, render
from producer.gateway.model import InferError, RawInput, Status
from producer.gateway.stats import ModelStats, RequestTimes


def raw(name: str, arr: np.ndarray, datatype: str, **kw) -> RawInput:
    return RawInput(name, datatype, tuple(arr.shape), data=np.ascontiguousarray(arr).tobytes(), **kw)


def request(n: int = 5, rng=None, **override) -> list[RawInput]:
    rng = rng or np.random.default_rng(0)
    cols = {
        "GEOMETRY_ID": (rng.integers(1, 4, n).astype(np.uint64), "UINT64"),
        "CHANNEL0": (rng.integers(0, 3, n).astype(np.int32), "INT32"),
        "CHANNEL1": (rng.integers(0, 3, n).astype(np.int32), "INT32"),
        "VALUE": (rng.random(n).astype(np.float32), "FP32"),
        "TIMESTAMP": (rng.random(n).astype(np.float32), "FP32"),
    }
    cols.update(override)
    return [raw(k, a, t) for k, (a, t) in cols.items()]


def test_decode_checks_names_types_shapes_and_sizes():
    ok = model.decode_inputs(request())
    assert ok["GEOMETRY_ID"].dtype == np.dtype("<u8") and ok["VALUE"].shape == (5,)
    cases = {
        "datatype 'INT64'": request(CHANNEL0=(np.zeros(5, np.int64), "INT64")),
        "shape [5, 1]": request(CHANNEL0=(np.zeros((5, 1), np.int32), "INT32")),
        "differ in length": request(VALUE=(np.zeros(4, np.float32), "FP32")),
        "missing required": request()[:3],
        "unexpected inference input 'X'": [*request(), raw("X", np.zeros(1, np.int32), "INT32")],
        "more than once": [*request(), request()[0]],
    }
    for text, req in cases.items():
        with pytest.raises(InferError, match=re.escape(text)) as err:
            model.decode_inputs(req)
        assert err.value.status is Status.INVALID_ARGUMENT
    short = RawInput("VALUE", "FP32", (5,), data=b"\0" * 19)
    with pytest.raises(InferError, match="19 bytes"):
        model.decode_input(short)
    values = RawInput("CHANNEL0", "INT32", (2,), values=[[1], [2]])
    assert model.decode_input(values).tolist() == [1, 2]
    with pytest.raises(InferError, match="not INT32"):
        model.decode_input(RawInput("CHANNEL0", "INT32", (2,), values=["a", "b"]))
    with pytest.raises(InferError, match="not UINT64"):
        model.decode_input(RawInput("GEOMETRY_ID", "UINT64", (1,), values=[-1]))


def test_cells_are_sorted_and_merged_like_the_reader(rng):
    # duplicates and random order: the gateway must give what merge_duplicate_cells gives
    tensors = model.decode_inputs(request(200, rng))
    cells = model.cells_from_inputs(tensors)
    ref, n_dup = merge_duplicate_cells(
        Cells(
            geometry_id=tensors["GEOMETRY_ID"].astype(np.uint64),
            channel0=tensors["CHANNEL0"].astype(np.int32),
            channel1=tensors["CHANNEL1"].astype(np.int32),
            activation=tensors["VALUE"].astype(np.float32),
            time=tensors["TIMESTAMP"].astype(np.float32),
        )
    )
    assert n_dup > 0
    for name in ("geometry_id", "channel0", "channel1", "activation", "time"):
        assert np.array_equal(getattr(cells, name), getattr(ref, name)), name
    # already sorted and unique: passed through unchanged (no sort)
    again = model.cells_from_inputs(
        {
            "GEOMETRY_ID": ref.geometry_id,
            "CHANNEL0": ref.channel0,
            "CHANNEL1": ref.channel1,
            "VALUE": ref.activation,
        }
    )
    assert again.geometry_id is ref.geometry_id or np.shares_memory(again.geometry_id, ref.geometry_id)
    assert not again.time.any()  # TIMESTAMP left out: zeros, as the CSV reader does


def test_sorted_unique_detects_every_order_violation():
    g = np.array([1, 1, 2, 2], np.uint64)
    c1 = np.array([0, 1, 0, 0], np.int32)
    c0 = np.array([5, 0, 1, 2], np.int32)
    assert model._sorted_unique(g, c1, c0)
    assert not model._sorted_unique(g[::-1].copy(), c1, c0)
    assert not model._sorted_unique(g, np.array([1, 0, 0, 0], np.int32), c0)
    assert not model._sorted_unique(g, c1, np.array([5, 0, 2, 2], np.int32))  # duplicate cell


def test_bad_values_are_refused():
    t = model.decode_inputs(request(CHANNEL0=(np.array([0, 1, -2, 0, 0], np.int32), "INT32")))
    with pytest.raises(InferError, match="negative channel"):
        model.cells_from_inputs(t)
    # values the chain cannot use are the worker's to refuse (it holds the detector): the gateway packs them
    t = model.decode_inputs(request(VALUE=(np.array([0, 1, np.nan, 0, 0], np.float32), "FP32")))
    assert np.isnan(model.cells_from_inputs(t).activation).sum() == 1
    t = model.decode_inputs([*request(), raw("EVENT_ID", np.array([2**63], np.uint64), "UINT64")])
    with pytest.raises(InferError, match="2\\^63"):
        model.cells_from_inputs(t)
    with pytest.raises(InferError, match="exceed") as err:
        model.cells_from_inputs(model.decode_inputs(request()), max_cells=4)
    assert err.value.status is Status.TOO_LARGE


def test_outputs_round_trip_tracks():
    from kernels.edm.tracks import Tracks

    rng = np.random.default_rng(3)
    tracks = Tracks(
        params=rng.random((3, 5)),
        cov=rng.random((3, 5, 5)),
        chi2=rng.random(3),
        ndf=np.array([4, 5, 6], np.int32),
        n_holes=np.array([0, 1, 0], np.int32),
        meas_offsets=np.array([0, 2, 2, 5]),
        meas_geometry_id=np.arange(5, dtype=np.uint64),
        meas_local0=rng.random(5),
        meas_local1=rng.random(5),
        meas_dimension=np.array([2, 2, 1, 2, 2], np.int8),
        meas_truth_id=np.array([-1, 3, 4, 5, 6], np.int64),
        event_id=9,
    )
    outs = model.outputs_from_tracks(tracks)
    assert [s.name for s, _ in outs] == [o.name for o in model.OUTPUTS]
    for spec, arr in outs:
        assert arr.dtype == spec.dtype and len(arr.shape) == len(spec.shape), spec.name
    back = model.tracks_from_outputs({s.name: a for s, a in outs}, event_id=9)
    for name in ("params", "cov", "chi2", "ndf", "meas_offsets", "meas_local1", "meas_truth_id"):
        assert np.array_equal(getattr(back, name), getattr(tracks, name)), name
    # narrower chain dtypes are widened exactly
    f32 = replace(tracks, params=tracks.params.astype(np.float32))
    (spec, arr), *_ = model.outputs_from_tracks(f32, ["TRACK_PARAMS"])
    assert arr.dtype == np.float64 and np.array_equal(arr, tracks.params.astype(np.float32))
    with pytest.raises(InferError, match="NOPE"):
        model.outputs_from_tracks(tracks, ["NOPE"])


def test_model_config_is_valid_triton_config():
    cfg = model.model_config("m", {"broker": "tcp://x"})
    assert cfg["max_batch_size"] == 0 and [i["name"] for i in cfg["input"]][:3] == [
        "GEOMETRY_ID",
        "CHANNEL0",
        "CHANNEL1",
    ]
    assert {i["name"] for i in cfg["input"] if i.get("optional")} == {"TIMESTAMP", "EVENT_ID", "TRUTH_ID"}
    pytest.importorskip("tritonclient.grpc")
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2

    proto = json_format.ParseDict(cfg, model_config_pb2.ModelConfig())
    assert proto.input[0].data_type == model_config_pb2.TYPE_UINT64 and list(proto.output[1].dims) == [
        -1,
        5,
        5,
    ]


def test_statistics_counts_always_agree():
    stats = ModelStats("m", "1", clock_ms=lambda: 1234)
    t = RequestTimes.from_fleet(
        total_s=0.5,
        gateway_in_s=0.01,
        gateway_out_s=0.002,
        broker_queue_s=0.1,
        timings={"worker_queue_s": 0.05, "decode_s": 0.02, "chain_s": 0.3, "pack_s": 0.01, "bogus": "x"},
    )
    assert t.queue_s == pytest.approx(0.15) and t.compute_input_s == pytest.approx(0.03)
    assert t.compute_infer_s == pytest.approx(0.3) and t.compute_output_s == pytest.approx(0.012)
    stats.record_success(t)
    stats.record_success(t)
    stats.record_failure(0.2)
    snap = stats.snapshot()
    s = snap["inference_stats"]
    assert snap["inference_count"] == snap["execution_count"] == 2 and snap["last_inference"] == 1234
    assert {
        s[k]["count"] for k in ("success", "queue", "compute_input", "compute_infer", "compute_output")
    } == {2}
    assert s["compute_infer"]["ns"] == 600_000_000 and s["fail"] == {"count": 1, "ns": 200_000_000}
    assert s["cache_hit"] == s["cache_miss"] == {"count": 0, "ns": 0}
    # a worker that reports no chain_s: what remains of its own time
    old = RequestTimes.from_fleet(1.0, 0.0, 0.0, 0.0, {"worker_s": 0.5, "decode_s": 0.1, "pack_s": 0.1})
    assert old.compute_infer_s == pytest.approx(0.3)


def test_metrics_text_has_no_exponents():
    assert plain(81_559_000_000) == "81559000000" and plain(0.41) == "0.410000" and plain(1e-9) == "0.000000"
    assert plain(1.5e20) == "150000000000000000000"
    text = render(
        [GpuSample("GPU-1", 0.5, 8 * 10**10, 10**10, 123.456, None)],
        [ModelStats("m", "1").snapshot()],
    )
    assert "e+" not in text and "e-" not in text
    assert '\nnv_gpu_memory_total_bytes{gpu_uuid="GPU-1"} 80000000000\n' in text
    assert "nv_energy_consumption" not in text  # not reported: left out, not zero
    assert 'nv_inference_count{model="m",version="1"} 0' in text
    assert render([], []) == "\n"
    # no NVML here (or no GPU): no samples, no exception
    assert isinstance(NvmlSampler().sample(), list)


def test_export_perf_data(bundled, tmp_path):
    from producer.cli import main as trackfleet
    from producer.io.detector import load_detector
    from producer.io.events import discover, load_cells

    out = tmp_path / "pa.json"
    assert trackfleet(["gateway", "--export-perf-data", str(bundled), str(out), "--events", "2"]) == 0
    data = json.loads(out.read_text())
    assert list(data) == ["data"] and len(data["data"]) == 2
    cells = load_cells(discover(bundled)[1], load_detector(bundled))
    step = data["data"][1]
    assert step["EVENT_ID"] == {"content": [1], "shape": [1]}
    g = np.frombuffer(base64.b64decode(step["GEOMETRY_ID"]["b64"]), "<u8")
    assert step["GEOMETRY_ID"]["shape"] == [cells.size] and np.array_equal(g, cells.geometry_id)
    v = np.frombuffer(base64.b64decode(step["VALUE"]["b64"]), "<f4")
    assert np.array_equal(v, cells.activation)
    truth = np.frombuffer(base64.b64decode(step["TRUTH_ID"]["b64"]), "<i8")
    assert np.array_equal(truth, cells.measurement_id)
    # and the gateway takes them as they are (sorted, no duplicates)
    tensors = model.decode_inputs(
        [
            RawInput(
                name, model.INPUT_BY_NAME[name].datatype, tuple(t["shape"]), data=base64.b64decode(t["b64"])
            )
            for name, t in step.items()
            if "b64" in t
        ]
    )
    assert model._sorted_unique(tensors["GEOMETRY_ID"], tensors["CHANNEL1"], tensors["CHANNEL0"])


def test_cells_outside_the_detector_are_left_to_the_fleet(detector):
    g0 = int(np.asarray(detector.geometry_id)[0])
    bins = np.asarray(detector.seg_bins)[0]
    far = request(
        3,
        GEOMETRY_ID=(np.array([g0, g0, 12345], np.uint64), "UINT64"),
        CHANNEL0=(np.array([0, int(bins[0]), 1], np.int32), "INT32"),
    )
    packed = model.pack_inputs(model.decode_inputs(far), "fp")
    assert packed.n_cells == 3 and msgpack.unpackb(packed.header)["detector"] == "fp"


# --- packing a request for the broker ----------------------------------------------------------------


def sorted_tensors(
    n: int,
    rng,
    channel_max: int = 500,
    truth=None,
    timestamp: bool = True,
    modules=None,
    channel1_max: int | None = None,
) -> dict[str, np.ndarray]:
    """Decoded tensors of ``n`` distinct cells in the reader's order (geometry id, channel1, channel0)."""
    modules = np.arange(10, 60, dtype=np.uint64) if modules is None else modules
    g = rng.choice(modules, 3 * n)
    c0 = rng.integers(0, channel_max, 3 * n).astype(np.int32)
    c1 = rng.integers(0, channel1_max or channel_max, 3 * n).astype(np.int32)
    order = np.lexsort((c0, c1, g))
    keep = np.r_[True, (np.diff(g[order]) != 0) | (np.diff(c1[order]) != 0) | (np.diff(c0[order]) != 0)]
    idx = order[keep][:n]
    out = {
        "GEOMETRY_ID": g[idx].astype("<u8"),
        "CHANNEL0": c0[idx].astype("<i4"),
        "CHANNEL1": c1[idx].astype("<i4"),
        "VALUE": rng.random(idx.size).astype("<f4"),
        "EVENT_ID": np.array([42], "<u8"),
    }
    if timestamp:
        out["TIMESTAMP"] = rng.random(idx.size).astype("<f4")
    if truth is not None:
        out["TRUTH_ID"] = truth(idx.size).astype("<i8")
    return out


def assert_packed_like_pack_event(tensors, fingerprint: str = "") -> model.PackedRequest:
    from kernels.edm.packed import pack_event, unpack_event

    got = model.pack_inputs(tensors, fingerprint)
    cells = model.cells_from_inputs(tensors)
    header, buffers = pack_event(cells, fingerprint)
    assert got.header == header
    assert [b.dtype.str for b in got.buffers] == [b.dtype.str for b in buffers]
    assert [b.tobytes() for b in got.buffers] == [b.tobytes() for b in buffers]
    assert (got.event_id, got.n_cells) == (cells.event_id, cells.size)
    back = unpack_event(got.frames[0], got.frames[1:]).to_cells(np)
    for name in ("geometry_id", "channel0", "channel1", "measurement_id"):
        assert np.array_equal(getattr(back, name), getattr(cells, name)), name
    for name in ("activation", "time"):  # NaN: the gateway leaves refusing it to the worker
        assert np.array_equal(getattr(back, name), getattr(cells, name), equal_nan=True), name
    return got


def test_pack_inputs_gives_pack_event_bytes(rng):
    # sorted and unique (the fast path), in every dtype the packed format narrows to or keeps
    big_truth = lambda m: rng.integers(-1, 2**40, m)  # noqa: E731 - -1 and > 2^32: int64 on the wire
    cases = {
        "narrow": sorted_tensors(400, rng, truth=lambda m: rng.integers(0, 2**32, m)),
        "wide channels, wide truth": sorted_tensors(400, rng, channel_max=100_000, truth=big_truth),
        "no timestamp, no truth": sorted_tensors(400, rng, timestamp=False),
        "one module": sorted_tensors(50, rng, modules=np.array([7], np.uint64)),
    }
    zero_times = sorted_tensors(400, rng)
    zero_times["TIMESTAMP"] = np.zeros_like(zero_times["TIMESTAMP"])  # as simulated events: not sent
    cases["zero timestamps"] = zero_times
    for name, tensors in cases.items():
        got = assert_packed_like_pack_event(tensors)
        assert model._sorted_runs(tensors["GEOMETRY_ID"], tensors["CHANNEL0"], tensors["CHANNEL1"]), name
        if "TIMESTAMP" in tensors and tensors["TIMESTAMP"].any():  # the float columns travel as views
            assert np.shares_memory(got.buffers[4], tensors["VALUE"]), name
            assert np.shares_memory(got.buffers[5], tensors["TIMESTAMP"]), name
    assert_packed_like_pack_event(sorted_tensors(400, rng, channel_max=100_000, channel1_max=3))  # one wide
    # any other order, duplicates, and tiny events take the reader's path: the same bytes
    assert_packed_like_pack_event(model.decode_inputs(request(200, rng)))
    dup = sorted_tensors(100, rng)
    dup = {k: (np.r_[v[:10], v[9:]] if v.shape[0] == 100 else v) for k, v in dup.items()}
    assert model._sorted_runs(dup["GEOMETRY_ID"], dup["CHANNEL0"], dup["CHANNEL1"]) is None
    assert assert_packed_like_pack_event(dup).n_cells == 100
    one = sorted_tensors(1, rng)
    assert assert_packed_like_pack_event(one).n_cells == 1
    assert assert_packed_like_pack_event({k: v[:0] for k, v in one.items() if k != "EVENT_ID"}).n_cells == 0


def test_pack_inputs_reads_unaligned_request_data(rng):
    # tensors at odd offsets of a request body (HTTP after its JSON header, gRPC inside the message)
    tensors = sorted_tensors(300, rng, truth=lambda m: rng.integers(0, 1000, m))
    blob = b"\0" * 3 + b"".join(a.tobytes() for a in tensors.values())
    raws, pos = [], 3
    for name, a in tensors.items():
        raws.append(
            RawInput(
                name, model.INPUT_BY_NAME[name].datatype, a.shape, data=memoryview(blob)[pos : pos + a.nbytes]
            )
        )
        pos += a.nbytes
    decoded = model.decode_inputs(raws)
    assert not decoded["GEOMETRY_ID"].flags.aligned
    assert model.pack_inputs(decoded).header == model.pack_inputs(tensors).header
    assert_packed_like_pack_event(decoded)


def test_sorted_runs_detects_every_order_violation():
    g = np.array([1, 1, 2, 2], np.uint64)
    c1 = np.array([0, 1, 0, 0], np.int32)
    c0 = np.array([5, 0, 1, 2], np.int32)
    starts, ch0, _ = model._sorted_runs(g, c0, c1)
    assert starts.tolist() == [0, 2] and ch0.dtype == np.dtype("<u2")
    assert model._sorted_runs(g[::-1].copy(), c0, c1) is None
    assert model._sorted_runs(g, c0, np.array([1, 0, 0, 0], np.int32)) is None
    assert model._sorted_runs(g, np.array([5, 0, 2, 2], np.int32), c1) is None  # duplicate cell
    for wide in (2**16, 2**31 - 1):  # the same checks on the 64-bit key
        assert model._sorted_runs(g, np.array([5, wide, 1, 2], np.int32), c1) is not None
        assert model._sorted_runs(g, np.array([wide, 0, 2, 2], np.int32), c1[[0, 0, 2, 3]]) is None
        assert model._sorted_runs(g, c0, np.array([wide, 0, 0, 0], np.int32)) is None


def test_pack_inputs_checks_like_cells_from_inputs(rng):
    tensors = sorted_tensors(300, rng)
    got = assert_packed_like_pack_event(tensors, "fp")
    assert msgpack.unpackb(got.header)["detector"] == "fp"
    bad = {
        "negative channel": dict(CHANNEL0=np.r_[-1, tensors["CHANNEL0"][1:]].astype(np.int32)),
        "2^63": dict(EVENT_ID=np.array([2**63], np.uint64)),
    }
    for text, change in bad.items():
        t = {**tensors, **change}
        with pytest.raises(InferError, match=re.escape(text)) as fast:
            model.pack_inputs(t)
        with pytest.raises(InferError) as slow:
            model.cells_from_inputs(t)
        assert str(fast.value) == str(slow.value)
    # a non-finite value is packed as it came (both paths): the worker refuses it
    t = {**tensors, "TIMESTAMP": np.r_[np.float32("inf"), tensors["TIMESTAMP"][1:]].astype(np.float32)}
    got = assert_packed_like_pack_event(t)
    names = [c[0] for c in msgpack.unpackb(got.header)["columns"]]
    assert np.isinf(got.buffers[names.index("time")][0])
    with pytest.raises(InferError, match="exceed") as err:
        model.pack_inputs(tensors, max_cells=10)
    assert err.value.status is Status.TOO_LARGE


# --- packing in pieces on a thread pool ---------------------------------------------------------------


def pack_outcome(tensors, **kw):
    """What pack_inputs makes of a request: its header and column bytes, or its error."""
    try:
        got = model.pack_inputs(tensors, "fp", **kw)
    except InferError as exc:
        return ("error", exc.status, str(exc))
    return (
        "packed",
        got.event_id,
        got.n_cells,
        got.header,
        [(b.dtype.str, b.tobytes()) for b in got.buffers],
    )


@pytest.fixture
def pieces(monkeypatch):
    """A pool, pieces of a few cells, the ranges _scan_piece was given and the requests the one-sweep
    path left to _pack_checked (both cleared by the tests)."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(model, "MIN_PIECE_CELLS", 8)
    ranges: list[tuple[int, int]] = []
    checked: list[int] = []
    scan, pack_checked = model._scan_piece, model._pack_checked

    def spy(tensors, out, a, b):
        ranges.append((a, b))
        return scan(tensors, out, a, b)

    def spy_checked(tensors, *a):
        checked.append(tensors["GEOMETRY_ID"].shape[0])
        return pack_checked(tensors, *a)

    monkeypatch.setattr(model, "_scan_piece", spy)
    monkeypatch.setattr(model, "_pack_checked", spy_checked)
    with ThreadPoolExecutor(3) as pool:
        yield pool, ranges, checked


def test_pack_inputs_in_pieces_gives_the_serial_bytes(pieces, rng):
    pool, ranges, checked = pieces
    cases = {
        "narrow": sorted_tensors(400, rng, truth=lambda m: rng.integers(0, 2**32, m)),
        "truth in int64": sorted_tensors(400, rng, truth=lambda m: rng.integers(-1, 2**40, m)),
        "one piece's truth in int64": sorted_tensors(
            400, rng, truth=lambda m: np.r_[rng.integers(0, 9, m - 1), -1]
        ),
        "wide channels": sorted_tensors(400, rng, channel_max=100_000),
        "no timestamp, no truth": sorted_tensors(400, rng, timestamp=False),
        "one module": sorted_tensors(60, rng, modules=np.array([7], np.uint64)),
        "two modules": sorted_tensors(60, rng, channel_max=6, modules=np.array([7, 9], np.uint64)),
    }
    for name, tensors in cases.items():
        serial = pack_outcome(tensors)
        assert serial[0] == "packed", name
        for k in (2, 3, 4, 7):
            ranges.clear()
            checked.clear()
            assert pack_outcome(tensors, pool=pool, pieces=k) == serial, (name, k)
            assert checked == ([] if name != "wide channels" else [400]), (name, k)  # the one sweep
            n = tensors["GEOMETRY_ID"].shape[0]
            starts = sorted(a for a, _ in ranges)
            assert starts[0] == 0 and sorted(b for _, b in ranges)[-1] == n, (name, k)
            g = tensors["GEOMETRY_ID"]
            assert all(g[a] != g[a - 1] for a in starts[1:]), (name, k)  # whole modules in each piece
            if name not in ("one module", "wide channels"):
                assert len(ranges) > 1, (name, k)
    assert_packed_like_pack_event(cases["narrow"], "fp")


def test_pack_inputs_in_pieces_refuses_like_the_serial_path(pieces, detector, rng):
    # every bad value and order, and cells the worker will refuse, in the first piece, at a boundary
    # between pieces and in the last piece: the same KServe error as serially (or the same event where
    # the gateway lets it through)
    pool, ranges, _ = pieces
    ids = np.asarray(detector.geometry_id)
    bins = np.asarray(detector.seg_bins)
    pick = np.sort(rng.choice(ids.shape[0], 30, replace=False))
    good = sorted_tensors(
        300, rng, channel_max=int(bins[pick].min()), modules=ids[pick], truth=lambda m: rng.integers(0, 99, m)
    )
    n = good["GEOMETRY_ID"].shape[0]
    model.pack_inputs(good, pool=pool, pieces=3)
    bounds = sorted(a for a, _ in ranges)
    assert len(bounds) == 3
    spots = sorted({0, 1, bounds[1] - 1, bounds[1], bounds[2], n - 1})

    def changed(name, k, value):
        arr = good[name].copy()
        arr[k] = value
        return {**good, name: arr}

    def swapped(k):  # cells k - 1 and k change places (out of order)
        return {
            name: (arr[np.r_[: k - 1, k, k - 1, k + 1 : n]] if arr.shape[0] == n else arr)
            for name, arr in good.items()
        }

    def duplicated(k):  # cell k repeats cell k - 1 (same module and channels)
        return {
            name: (
                np.r_[arr[:k], arr[k - 1 : k], arr[k + 1 :]]
                if name in ("GEOMETRY_ID", "CHANNEL0", "CHANNEL1")
                else arr
            )
            for name, arr in good.items()
        }

    order = rng.permutation(n)
    requests = {
        "too many cells": (good, {"max_cells": n - 1}),
        "event id": ({**good, "EVENT_ID": np.array([2**63], "<u8")}, {}),
        "shuffled": ({k: (v[order] if v.shape[0] == n else v) for k, v in good.items()}, {}),
        "reversed": ({k: (v[::-1].copy() if v.shape[0] == n else v) for k, v in good.items()}, {}),
    }
    for k in spots:
        m = int(np.searchsorted(ids, good["GEOMETRY_ID"][k]))
        requests |= {
            f"negative channel0 at {k}": (changed("CHANNEL0", k, -1), {}),
            f"negative channel1 at {k}": (changed("CHANNEL1", k, -3), {}),
            f"channel0 of 2^16 at {k}": (changed("CHANNEL0", k, 2**16), {}),
            f"channel0 outside at {k}": (changed("CHANNEL0", k, bins[m, 0]), {}),
            f"channel1 outside at {k}": (changed("CHANNEL1", k, bins[m, 1]), {}),
            f"NaN value at {k}": (changed("VALUE", k, np.nan), {}),
            f"inf timestamp at {k}": (changed("TIMESTAMP", k, -np.inf), {}),
            f"unknown module at {k}": (changed("GEOMETRY_ID", k, ids.max() + 1), {}),
            f"truth -1 at {k}": (changed("TRUTH_ID", k, -1), {}),
        }
        if k:
            requests[f"out of order at {k}"] = (swapped(k), {})
            requests[f"duplicate at {k}"] = (duplicated(k), {})
    errors = 0
    for name, (tensors, kw) in requests.items():
        serial = pack_outcome(tensors, **kw)
        errors += serial[0] == "error"
        for k in (2, 3):
            assert pack_outcome(tensors, pool=pool, pieces=k, **kw) == serial, (name, k)
        if (
            serial[0] == "packed"
        ):  # valid for the gateway (unsorted, wide, left to the worker): the reader's bytes
            assert_packed_like_pack_event(tensors, "fp")
    assert errors == 2 + 2 * len(spots)  # too many cells, the event id, the negative channels


def test_gateway_packs_a_lone_request_on_its_pack_threads(detector, monkeypatch, rng):
    from producer.gateway.service import Gateway, GatewayConfig, default_pack_threads

    assert 1 <= default_pack_threads() <= 3
    with pytest.raises(ValueError, match="pack_threads"):
        GatewayConfig(pack_threads=0)
    monkeypatch.setattr(model, "MIN_PIECE_CELLS", 8)
    calls: list[tuple[bool, int]] = []
    pack = model.pack_inputs

    def spy(*a, pool=None, pieces=1, **kw):
        calls.append((pool is not None, pieces))
        return pack(*a, pool=pool, pieces=pieces, **kw)

    monkeypatch.setattr("producer.gateway.service.pack_inputs", spy)
    tensors = sorted_tensors(400, rng, truth=lambda m: rng.integers(0, 9, m))
    serial = model.pack_inputs(tensors)
    for threads, expected in ((3, (True, 3)), (1, (False, 1))):
        gw = Gateway(GatewayConfig(broker="tcp://127.0.0.1:1", pack_threads=threads))
        try:
            got = gw._pack(tensors)
            assert calls.pop() == expected
            assert got.header == serial.header
            assert [b.tobytes() for b in got.buffers] == [b.tobytes() for b in serial.buffers]
            gw._packing = 1  # another request is being packed: this one takes one thread
            gw._pack(tensors)
            assert calls.pop() == (False, 1)
            gw._packing = 0
        finally:
            gw.stop()
        assert model.pack_inputs(tensors, pool=gw._pack_pool or None, pieces=threads).header == serial.header


def test_scan_piece_gives_up_on_a_range_that_begins_inside_a_module(detector):
    # (boundaries found by bisecting unsorted ids can fall anywhere; the serial path then decides)
    g0 = np.asarray(detector.geometry_id)[:2].astype("<u8")
    tensors = sorted_tensors(40, np.random.default_rng(3), channel_max=5, modules=g0)
    n = tensors["GEOMETRY_ID"].shape[0]
    out = {"channel0": np.empty(n, "<u2"), "channel1": np.empty(n, "<u2"), "measurement_id": None}
    assert model._scan_piece(tensors, out, 0, n).ok
    inside = int(np.flatnonzero(tensors["GEOMETRY_ID"] == g0[0])[-1])  # last cell of the first module
    assert not model._scan_piece(tensors, out, inside, n).ok
    assert not model._scan_piece(tensors, out, 1, inside).ok  # no module begins in it
