"""The gateway's pure parts, without servers or the ``triton`` extra: tensor checks, cells, outputs,
statistics, metrics text and perf_analyzer input data."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import replace

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
    t = model.decode_inputs(request(VALUE=(np.array([0, 1, np.nan, 0, 0], np.float32), "FP32")))
    with pytest.raises(InferError, match="not finite"):
        model.cells_from_inputs(t)
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


def test_cells_are_checked_against_the_detector(detector):
    g0 = int(np.asarray(detector.geometry_id)[0])
    bins = np.asarray(detector.seg_bins)[0]
    ok = request(
        3, GEOMETRY_ID=(np.full(3, g0, np.uint64), "UINT64"), CHANNEL0=(np.arange(3, dtype=np.int32), "INT32")
    )
    assert model.cells_from_inputs(model.decode_inputs(ok), detector).size == 3
    far = request(
        3,
        GEOMETRY_ID=(np.full(3, g0, np.uint64), "UINT64"),
        CHANNEL0=(np.array([0, int(bins[0]), 1], np.int32), "INT32"),
    )
    with pytest.raises(InferError, match=f"outside the module's {int(bins[0])} bins"):
        model.cells_from_inputs(model.decode_inputs(far), detector)
    unknown = request(3, GEOMETRY_ID=(np.array([g0, g0, 12345], np.uint64), "UINT64"))
    with pytest.raises(InferError, match="GEOMETRY_ID 12345 is not a sensitive module"):
        model.cells_from_inputs(model.decode_inputs(unknown), detector)
