"""The ``trackfleet`` model as KServe v2 sees it: tensor specification, metadata, config, conversions.

Nothing here does I/O. The HTTP and gRPC front ends turn their wire forms into :class:`RawInput` objects,
:func:`decode_inputs` checks them against :data:`INPUTS`, :func:`pack_inputs` checks what packing needs
(cell count, channel signs, order, event id) and packs the event for the broker (sorted and merged exactly
as ``trackfleet reconstruct`` reads a cells file; :func:`cells_from_inputs` gives the same event as
:class:`~kernels.edm.cells.Cells`); :func:`outputs_from_tracks` maps the tracks a worker returned to
:data:`OUTPUTS`. Whether the cells fit the detector and hold finite values is checked where the detector
is, by the worker (the fleet then fails the event with ``detector_mismatch`` / ``bad_event``, which the
gateway answers as INVALID_ARGUMENT).

Inputs (``max_batch_size: 0``: one request is one event; ``-1`` marks a variable dimension)

=============  ======  ======  ==========================================================================
name           type    shape   content
=============  ======  ======  ==========================================================================
GEOMETRY_ID    UINT64  [n]     ACTS geometry id of each cell's module
CHANNEL0       INT32   [n]     bin index along local u (>= 0)
CHANNEL1       INT32   [n]     bin index along local v (>= 0; 0 on strips)
VALUE          FP32    [n]     deposited charge (``value`` of the cells CSV)
TIMESTAMP      FP32    [n]     time [ns]; optional, zeros when absent (as the CSV reader does)
EVENT_ID       UINT64  [1]     optional event number (< 2^63), echoed in the logs; default 0
TRUTH_ID       INT64   [n]     optional truth measurement id per cell, carried to MEASUREMENT_TRUTH_ID
=============  ======  ======  ==========================================================================

Cells may come in any order and may repeat (same module and channels): they are sorted by (geometry_id,
channel1, channel0) and duplicates summed, as traccc's reader does; sorted, duplicate-free input skips
that step.

Outputs (T tracks, M measurements on tracks)

======================= ====== ========= ================================================================
name                    type   shape     content
======================= ====== ========= ================================================================
TRACK_PARAMS            FP64   [T, 5]    perigee d0 [mm], z0 [mm], phi [rad], theta [rad], q/p [e/GeV]
TRACK_COV               FP64   [T, 5, 5] covariance of TRACK_PARAMS
TRACK_CHI2              FP64   [T]       fit chi^2
TRACK_NDF               INT32  [T]       fit degrees of freedom
TRACK_N_HOLES           INT32  [T]       crossed sensitive surfaces without a measurement
TRACK_LENGTH            INT32  [T]       measurements per track: track t owns the next TRACK_LENGTH[t]
                                         rows of the MEASUREMENT* outputs
MEASUREMENTS            FP64   [M, 2]    local0, local1 [mm] of each measurement, inside out per track
MEASUREMENT_GEOMETRY_ID UINT64 [M]       module of each measurement
MEASUREMENT_DIMENSION   INT8   [M]       1 (strip) or 2 (pixel)
MEASUREMENT_TRUTH_ID    INT64  [M]       TRUTH_ID of the measurement's first cell; -1 when not given
======================= ====== ========= ================================================================
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from enum import Enum
from typing import Any

import msgpack
import numpy as np

from kernels.edm.cells import (
    CHANNEL_DTYPE,
    GEOMETRY_DTYPE,
    TRUTH_DTYPE,
    VALUE_DTYPE,
    Cells,
    merge_duplicate_cells,
)
from kernels.edm.packed import FORMAT_NAME, FORMAT_VERSION, MAX_CELLS, pack_event
from kernels.edm.tracks import Tracks

#: The only version of the model; KServe versions are strings of digits.
MODEL_VERSION = "1"
#: Largest event id (the fleet's ids are non-negative 63-bit integers).
MAX_EVENT_ID = 2**63 - 1


class Status(Enum):
    """Error classes of the KServe protocols: (HTTP status, gRPC status code name)."""

    INVALID_ARGUMENT = (400, "INVALID_ARGUMENT")
    NOT_FOUND = (404, "NOT_FOUND")
    ALREADY_EXISTS = (400, "ALREADY_EXISTS")  # as Triton: HTTP has no better code for it
    TOO_LARGE = (413, "RESOURCE_EXHAUSTED")
    INTERNAL = (500, "INTERNAL")
    UNIMPLEMENTED = (501, "UNIMPLEMENTED")
    UNAVAILABLE = (503, "UNAVAILABLE")
    DEADLINE_EXCEEDED = (504, "DEADLINE_EXCEEDED")

    @property
    def http(self) -> int:
        return self.value[0]

    @property
    def grpc(self) -> str:
        return self.value[1]


class InferError(Exception):
    """A request the gateway answers with a KServe error (HTTP ``{"error": message}``, gRPC status).

    Attributes:
        status: the error class.
    """

    def __init__(self, message: str, status: Status = Status.INVALID_ARGUMENT) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of the model.

    Attributes:
        name: tensor name. datatype: KServe datatype. shape: dimensions, -1 where variable.
        doc: what it holds (units). optional: inputs only: may be left out.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    doc: str
    optional: bool = False

    @property
    def dtype(self) -> np.dtype[Any]:
        return np.dtype(DATATYPES[self.datatype]).newbyteorder("<")

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def config(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "name": self.name,
            "data_type": f"TYPE_{self.datatype}",
            "dims": list(self.shape),
        }
        if self.optional:
            entry["optional"] = True
        return entry


#: KServe datatype -> numpy dtype (little endian on the wire).
DATATYPES: dict[str, str] = {
    "BOOL": "?",
    "UINT8": "u1",
    "UINT16": "u2",
    "UINT32": "u4",
    "UINT64": "u8",
    "INT8": "i1",
    "INT16": "i2",
    "INT32": "i4",
    "INT64": "i8",
    "FP16": "f2",
    "FP32": "f4",
    "FP64": "f8",
}

_N = -1  # a variable dimension

INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("GEOMETRY_ID", "UINT64", (_N,), "ACTS geometry id of each cell's module"),
    TensorSpec("CHANNEL0", "INT32", (_N,), "bin index along local u (>= 0)"),
    TensorSpec("CHANNEL1", "INT32", (_N,), "bin index along local v (>= 0; 0 on strip modules)"),
    TensorSpec("VALUE", "FP32", (_N,), "deposited charge per cell (the cells CSV's value)"),
    TensorSpec("TIMESTAMP", "FP32", (_N,), "time per cell [ns]; zeros when absent", optional=True),
    TensorSpec("EVENT_ID", "UINT64", (1,), "event number (< 2^63); 0 when absent", optional=True),
    TensorSpec(
        "TRUTH_ID", "INT64", (_N,), "truth measurement id per cell, carried to the output", optional=True
    ),
)
OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("TRACK_PARAMS", "FP64", (_N, 5), "perigee d0, z0 [mm], phi, theta [rad], q/p [e/GeV]"),
    TensorSpec("TRACK_COV", "FP64", (_N, 5, 5), "covariance of TRACK_PARAMS"),
    TensorSpec("TRACK_CHI2", "FP64", (_N,), "fit chi^2"),
    TensorSpec("TRACK_NDF", "INT32", (_N,), "fit degrees of freedom"),
    TensorSpec("TRACK_N_HOLES", "INT32", (_N,), "crossed sensitive surfaces without a measurement"),
    TensorSpec("TRACK_LENGTH", "INT32", (_N,), "measurements per track (rows of the MEASUREMENT* outputs)"),
    TensorSpec("MEASUREMENTS", "FP64", (_N, 2), "local0, local1 [mm] per measurement, inside out per track"),
    TensorSpec("MEASUREMENT_GEOMETRY_ID", "UINT64", (_N,), "module of each measurement"),
    TensorSpec("MEASUREMENT_DIMENSION", "INT8", (_N,), "1 (strip) or 2 (pixel)"),
    TensorSpec("MEASUREMENT_TRUTH_ID", "INT64", (_N,), "TRUTH_ID of the measurement; -1 when not given"),
)
INPUT_BY_NAME = {t.name: t for t in INPUTS}
OUTPUT_BY_NAME = {t.name: t for t in OUTPUTS}
_CELL_INPUTS = ("GEOMETRY_ID", "CHANNEL0", "CHANNEL1", "VALUE", "TIMESTAMP", "TRUTH_ID")


# --- metadata and configuration ---------------------------------------------------------------------


def model_metadata(name: str) -> dict[str, Any]:
    """KServe model metadata (``GET /v2/models/{name}``)."""
    return {
        "name": name,
        "versions": [MODEL_VERSION],
        "platform": "trackfleet",
        "inputs": [t.metadata() for t in INPUTS],
        "outputs": [t.metadata() for t in OUTPUTS],
    }


def model_config(name: str, parameters: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Triton's model configuration, as JSON with the protobuf field names (``GET .../config``).

    ``max_batch_size: 0`` with variable ``dims``: a request carries one event of any size, and clients
    such as perf_analyzer take each request's shapes from their input data.
    """
    return {
        "name": name,
        "platform": "trackfleet",
        "backend": "trackfleet",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": 0,
        "input": [t.config() for t in INPUTS],
        "output": [t.config() for t in OUTPUTS],
        "parameters": {k: {"string_value": v} for k, v in (parameters or {}).items()},
    }


# --- requests ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawInput:
    """One input tensor as a front end received it, not yet checked.

    Attributes:
        name / datatype / shape: as the client declared them.
        data: raw little-endian bytes (binary extension, gRPC raw contents), or
        values: a (possibly nested) list of numbers (JSON ``data``, gRPC typed contents).
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Any = None
    values: Any = None


def _check_shape(spec: TensorSpec, shape: Sequence[int]) -> None:
    if len(shape) != len(spec.shape) or any(
        (not isinstance(d, int)) or d < 0 or (s != _N and d != s)
        for d, s in zip(shape, spec.shape, strict=False)
    ):
        raise InferError(
            f"input '{spec.name}': shape {list(shape)} does not match the model's {list(spec.shape)}"
        )


def decode_input(raw: RawInput) -> np.ndarray:
    """Check one input against its spec and return it as a 1-D or shaped numpy array (zero-copy for raw data).

    Raises:
        InferError: unknown name, wrong datatype, wrong shape, wrong byte size or unconvertible values.
    """
    spec = INPUT_BY_NAME.get(raw.name)
    if spec is None:
        raise InferError(f"unexpected inference input '{raw.name}' for model; expected {list(INPUT_BY_NAME)}")
    if raw.datatype != spec.datatype:
        raise InferError(
            f"input '{spec.name}': datatype {raw.datatype!r} does not match the model's {spec.datatype!r}"
        )
    _check_shape(spec, raw.shape)
    count = math.prod(raw.shape)
    dt = spec.dtype
    if raw.data is not None:
        mv = memoryview(raw.data).cast("B")
        if mv.nbytes != count * dt.itemsize:
            raise InferError(
                f"input '{spec.name}': {mv.nbytes} bytes of data for shape {list(raw.shape)} of "
                f"{spec.datatype} (expected {count * dt.itemsize})"
            )
        arr = np.frombuffer(mv, dtype=dt)
    else:
        if raw.values is None:
            raise InferError(f"input '{spec.name}' carries no data")
        try:
            arr = np.asarray(raw.values, dtype=dt).reshape(-1)
        except (TypeError, ValueError, OverflowError) as exc:
            raise InferError(f"input '{spec.name}': values are not {spec.datatype}: {exc}") from None
        if arr.size != count:
            raise InferError(
                f"input '{spec.name}': {arr.size} values for shape {list(raw.shape)} (expected {count})"
            )
    return arr.reshape(raw.shape)


def decode_inputs(raws: Sequence[RawInput]) -> dict[str, np.ndarray]:
    """Check a request's inputs: every required input once, nothing unknown, consistent cell counts.

    Raises:
        InferError: naming the problem.
    """
    out: dict[str, np.ndarray] = {}
    for raw in raws:
        if raw.name in out:
            raise InferError(f"input '{raw.name}' is given more than once")
        out[raw.name] = decode_input(raw)
    missing = [t.name for t in INPUTS if not t.optional and t.name not in out]
    if missing:
        raise InferError(f"expected {len(INPUTS)} inputs; missing required input(s) {missing}")
    n = {name: out[name].shape[0] for name in _CELL_INPUTS if name in out}
    if len(set(n.values())) > 1:
        raise InferError(f"the per-cell inputs differ in length: {n}")
    return out


def _sorted_unique(g: np.ndarray, c1: np.ndarray, c0: np.ndarray) -> bool:
    """True when cells are strictly increasing in (geometry_id, channel1, channel0): no sort, no merge."""
    if g.shape[0] < 2:
        return True
    dg = g[1:] != g[:-1]
    if np.any(g[1:] < g[:-1]):
        return False
    same_g = ~dg
    d1 = c1[1:].astype(np.int64) - c1[:-1]
    if np.any(same_g & (d1 < 0)):
        return False
    d0 = c0[1:].astype(np.int64) - c0[:-1]
    return not np.any(same_g & (d1 == 0) & (d0 <= 0))


def _largest(a: np.ndarray) -> tuple[int, bool]:
    """(the largest value, whether none is negative) of a non-empty integer column, in one pass for
    int32 / int64: read as unsigned, negative values are the largest of all."""
    if a.dtype in (np.dtype(np.int32), np.dtype(np.int64)):
        top = int(a.view(a.dtype.str.replace("i", "u")).max())
        if top < 2 ** (8 * a.dtype.itemsize - 1):
            return top, True
    return int(a.max()), int(a.min()) >= 0


def _check_values(tensors: Mapping[str, np.ndarray], max_cells: int) -> tuple[int, tuple[int, int]]:
    """The checks on values every request gets (the worker checks the cells against its detector and for
    finite values).

    Returns:
        The event id, and the largest CHANNEL0 and CHANNEL1 (0 when there are no cells).

    Raises:
        InferError: too many cells, negative channels, an event id >= 2^63.
    """
    n = int(tensors["GEOMETRY_ID"].shape[0])
    if n > max_cells:
        raise InferError(f"{n} cells exceed the limit of {max_cells} per request", Status.TOO_LARGE)
    largest = [0, 0]
    for i, name in enumerate(("CHANNEL0", "CHANNEL1")):
        c = tensors[name]
        if n:
            largest[i], non_negative = _largest(c)
            if not non_negative:
                raise InferError(f"input '{name}' holds a negative channel ({int(c.min())})")
    event_id = 0
    if "EVENT_ID" in tensors:
        event_id = int(tensors["EVENT_ID"].reshape(-1)[0])
        if event_id > MAX_EVENT_ID:
            raise InferError(f"EVENT_ID {event_id} is not below 2^63")
    return event_id, (largest[0], largest[1])


def cells_from_inputs(tensors: Mapping[str, np.ndarray], max_cells: int = MAX_CELLS) -> Cells:
    """The event's cells, sorted and merged as ``trackfleet reconstruct`` reads a cells file.

    Args:
        tensors: checked inputs (:func:`decode_inputs`).
        max_cells: cells accepted in one request.

    Raises:
        InferError: negative channels, too many cells, an event id >= 2^63.
    """
    event_id, _ = _check_values(tensors, max_cells)
    g = tensors["GEOMETRY_ID"]
    n = int(g.shape[0])
    c0, c1 = tensors["CHANNEL0"], tensors["CHANNEL1"]
    value = tensors["VALUE"]
    ts = tensors.get("TIMESTAMP")
    truth = tensors.get("TRUTH_ID")
    cells = Cells(
        geometry_id=g.astype(GEOMETRY_DTYPE, copy=False),
        channel0=c0.astype(CHANNEL_DTYPE, copy=False),
        channel1=c1.astype(CHANNEL_DTYPE, copy=False),
        activation=value.astype(VALUE_DTYPE, copy=False),
        time=ts.astype(VALUE_DTYPE, copy=False) if ts is not None else np.zeros(n, VALUE_DTYPE),
        measurement_id=truth.astype(TRUTH_DTYPE, copy=False) if truth is not None else None,
        event_id=event_id,
    )
    if not _sorted_unique(cells.geometry_id, cells.channel1, cells.channel0):
        cells, _ = merge_duplicate_cells(cells)
    return cells


@dataclass(frozen=True)
class PackedRequest:
    """One request's event as the broker takes it: the packed event of :mod:`kernels.edm.packed`.

    Attributes:
        event_id: the event number. n_cells: cells after merging duplicates.
        header: the packed event's msgpack header. buffers: its columns (views of the request where the
            wire dtype is the request's, so the event reaches the broker without copying them).
    """

    event_id: int
    n_cells: int
    header: bytes
    buffers: tuple[np.ndarray, ...]

    @property
    def frames(self) -> tuple[Any, ...]:
        return (self.header, *self.buffers)


_U16_MAX = 2**16 - 1
_U32_MAX = 2**32 - 1


def pack_inputs(
    tensors: Mapping[str, np.ndarray],
    fingerprint: str = "",
    max_cells: int = MAX_CELLS,
    pool: Executor | None = None,
    pieces: int = 1,
) -> PackedRequest:
    """Check a request's values and pack its event: the same bytes as
    ``pack_event(cells_from_inputs(tensors, max_cells), fingerprint)``, in about half the time.

    Cells that come sorted and duplicate-free (perf_analyzer's data, a producer's events) with channels
    below 2^16 take :func:`_scan_cells`: every check and the packing in one sweep over each range of
    cells, optionally split into ``pieces`` ranges of whole modules scanned in parallel (numpy releases
    the GIL); VALUE / TIMESTAMP travel as views of the request. Anything that sweep does not accept (a bad
    value, another order, duplicates, wider channels) is checked and packed again by
    :func:`_pack_checked`, which raises the error or takes the reader's path (sort and merge): the sweep
    only decides how fast a request is packed, never what is accepted or which error it gets.

    Args:
        tensors: checked inputs (:func:`decode_inputs`).
        fingerprint: the detector's fingerprint, stamped on the event ("" for none): workers serving
            another detector refuse the event.
        max_cells: cells accepted in one request.
        pool: runs all ranges but the first (which the calling thread scans); None: one range.
        pieces: ranges to split a large event into (each at least :data:`MIN_PIECE_CELLS` cells).

    Raises:
        InferError: as :func:`cells_from_inputs`.
    """
    n = int(tensors["GEOMETRY_ID"].shape[0])
    if 2 <= n <= max_cells:
        cols = _scan_cells(tensors, pool if pieces > 1 else None, pieces)
        if cols is not None:
            event_id = _event_id(tensors)
            if event_id <= MAX_EVENT_ID:
                return _packed_request(event_id, n, fingerprint, cols)
    return _pack_checked(tensors, fingerprint, max_cells)


def _event_id(tensors: Mapping[str, np.ndarray]) -> int:
    return int(tensors["EVENT_ID"].reshape(-1)[0]) if "EVENT_ID" in tensors else 0


def _packed_request(event_id: int, n: int, fingerprint: str, cols: Mapping[str, np.ndarray]) -> PackedRequest:
    header = {  # as kernels.edm.packed.pack_event writes it (tests compare the bytes)
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "event_id": event_id,
        "n_cells": n,
        "detector": fingerprint,
        "columns": [[name, a.dtype.str, int(a.shape[0])] for name, a in cols.items()],
    }
    return PackedRequest(event_id, n, msgpack.packb(header), tuple(cols.values()))


def _pack_checked(tensors: Mapping[str, np.ndarray], fingerprint: str, max_cells: int) -> PackedRequest:
    """:func:`pack_inputs` one check at a time: raises the first error, handles any order and width.

    Sorted, duplicate-free cells are packed in vectorized passes over each column, using the module
    boundaries once for the order check and the run-length encoding; any other order takes
    :func:`cells_from_inputs` (sort and merge) and :func:`~kernels.edm.packed.pack_event`.
    """
    event_id, largest = _check_values(tensors, max_cells)
    g = tensors["GEOMETRY_ID"]
    n = int(g.shape[0])
    c0, c1 = tensors["CHANNEL0"], tensors["CHANNEL1"]
    sorted_run = _sorted_runs(g, c0, c1, largest) if n >= 2 else None
    if sorted_run is None:  # unsorted, duplicates, or too small to matter: the reader's own path
        cells = cells_from_inputs(tensors, max_cells)
        header, buffers = pack_event(cells, fingerprint)
        return PackedRequest(cells.event_id, cells.size, header, tuple(buffers))
    starts, ch0, ch1 = sorted_run
    module_ids = g[starts]
    counts = np.empty(starts.shape[0], "<u4")
    np.subtract(np.r_[starts[1:], n], starts, out=counts, casting="unsafe")
    ts = tensors.get("TIMESTAMP")
    cols: dict[str, np.ndarray] = {
        "module_ids": np.ascontiguousarray(module_ids, "<u8"),
        "module_counts": counts,
        "channel0": ch0,
        "channel1": ch1,
        "activation": np.ascontiguousarray(tensors["VALUE"], "<f4"),
    }
    if ts is not None and ts.any():  # zeros are not sent (kernels.edm.packed.pack_event)
        cols["time"] = np.ascontiguousarray(ts, "<f4")
    truth = tensors.get("TRUTH_ID")
    if truth is not None:
        top, non_negative = _largest(truth)
        fits = non_negative and top <= _U32_MAX
        cols["measurement_id"] = truth.astype("<u4") if fits else np.ascontiguousarray(truth, "<i8")
    return _packed_request(event_id, n, fingerprint, cols)


# --- the one-sweep path ------------------------------------------------------------------------------

#: Smallest range of cells :func:`pack_inputs` hands to a thread of its pool.
MIN_PIECE_CELLS = 32_768
_SHIFT16 = np.uint32(16)
_SCAN_DTYPES = {
    "GEOMETRY_ID": "<u8",
    "CHANNEL0": "<i4",
    "CHANNEL1": "<i4",
    "VALUE": "<f4",
    "TIMESTAMP": "<f4",
    "TRUTH_ID": "<i8",
}


@dataclass
class _Piece:
    """What scanning one range of cells found (:func:`_scan_piece`); ``ok`` False: the sweep gives up."""

    ok: bool
    starts: np.ndarray | None = None
    truth_fits: bool = True


def _scan_cells(
    tensors: Mapping[str, np.ndarray], pool: Executor | None, pieces: int
) -> dict[str, np.ndarray] | None:
    """The packed columns of a request whose cells all pass every check of :func:`_check_values`, are
    strictly increasing in (geometry_id, channel1, channel0) and have channels below 2^16 (the common
    case); None for any other request (:func:`_pack_checked` then decides).

    The cells are split into ranges that begin at a module's first cell; each range is checked and
    packed by :func:`_scan_piece` (the calling thread takes the first, ``pool`` the others), every
    check on the cell before the range too, so that the pieces together see every pair of neighbours.
    """
    if any(
        name in tensors and (tensors[name].dtype.str != dt or not tensors[name].flags.c_contiguous)
        for name, dt in _SCAN_DTYPES.items()
    ):
        return None
    g = tensors["GEOMETRY_ID"]
    n = int(g.shape[0])
    truth = tensors.get("TRUTH_ID")
    out = {
        "channel0": np.empty(n, "<u2"),
        "channel1": np.empty(n, "<u2"),
        "measurement_id": np.empty(n, "<u4") if truth is not None else None,
    }
    k = max(1, min(pieces, n // MIN_PIECE_CELLS)) if pool is not None else 1
    # range boundaries at the first cell of a module, that of the cell at i/k of the event or of the next
    # module (when the ids are sorted; if they are not, the checks fail whatever the boundaries are)
    bounds = [0]
    for i in range(1, k):
        module = g[n * i // k]
        a = int(np.searchsorted(g, module))
        bounds.append(max(bounds[-1], a if a > bounds[-1] else int(np.searchsorted(g, module, "right"))))
    bounds.append(n)
    ranges = [(a, b) for a, b in itertools.pairwise(bounds) if b > a]
    later = [_submit(pool, tensors, out, a, b) for a, b in ranges[1:]] if pool else []
    found = [_scan_piece(tensors, out, *ranges[0]), *(f.result() for f in later)]
    if not all(p.ok for p in found):
        return None
    starts = np.concatenate([p.starts for p in found]) if len(found) > 1 else found[0].starts
    module_ids = g[starts]
    if not bool((module_ids[1:] > module_ids[:-1]).all()):
        return None
    counts = np.empty(starts.shape[0], "<u4")
    np.subtract(starts[1:], starts[:-1], out=counts[:-1], casting="unsafe")
    counts[-1] = n - starts[-1]
    ts = tensors.get("TIMESTAMP")
    cols = {
        "module_ids": module_ids,
        "module_counts": counts,
        "channel0": out["channel0"],
        "channel1": out["channel1"],
        "activation": tensors["VALUE"],
    }
    if ts is not None and ts.any():  # zeros are not sent (kernels.edm.packed.pack_event)
        cols["time"] = ts
    if truth is not None:
        cols["measurement_id"] = out["measurement_id"] if all(p.truth_fits for p in found) else truth
    return cols


def _submit(pool: Executor, *args: Any) -> Future[_Piece]:
    """:func:`_scan_piece` on ``pool``, or at once in this thread if the pool was shut down."""
    try:
        return pool.submit(_scan_piece, *args)
    except RuntimeError:  # the gateway is stopping
        done: Future[_Piece] = Future()
        done.set_result(_scan_piece(*args))
        return done


def _scan_piece(
    tensors: Mapping[str, np.ndarray], out: Mapping[str, np.ndarray | None], a: int, b: int
) -> _Piece:
    """Check cells ``a:b`` and write their packed channels (and truth ids where they fit 32 bits) into
    ``out``: every check of the one-sweep path, each array read as few times as numpy allows.

    Channels are read as uint32 (a negative one is then above 2^31); below 2^16, ``channel1 << 16 |
    channel0`` rises strictly within a module exactly when the cells do.
    """
    g = tensors["GEOMETRY_ID"]
    lo = max(a - 1, 0)  # the cell before the range: its order with the range's first cell
    c0 = tensors["CHANNEL0"][lo:b].view("<u4")
    c1 = tensors["CHANNEL1"][lo:b].view("<u4")
    if int(c0.max()) > _U16_MAX or int(c1.max()) > _U16_MAX:
        return _Piece(False)
    gs = g[lo:b]
    new_module = gs[1:] != gs[:-1]
    key = np.left_shift(c1, _SHIFT16)
    key |= c0
    rising = key[1:] > key[:-1]
    rising |= new_module
    if not bool(rising.all()):
        return _Piece(False)
    first = np.flatnonzero(new_module)
    first += lo + 1
    starts = first if a else np.r_[0, first]
    if starts.shape[0] == 0 or starts[0] != a:  # not sorted by module (the range begins inside one)
        return _Piece(False)
    ch0, ch1 = out["channel0"][a:b], out["channel1"][a:b]  # type: ignore[index]
    np.copyto(ch0, c0[a - lo :], casting="unsafe")
    np.copyto(ch1, c1[a - lo :], casting="unsafe")
    truth = tensors.get("TRUTH_ID")
    fits = True
    if truth is not None:
        fits = int(truth[a:b].view("<u8").max()) <= _U32_MAX  # a negative id reads as >= 2^63
        if fits:
            np.copyto(out["measurement_id"][a:b], truth[a:b], casting="unsafe")  # type: ignore[index]
    return _Piece(True, starts, fits)


def _narrow_channel(c: np.ndarray, largest: int) -> np.ndarray:
    """The packed column of one channel: uint16 when every channel fits (they are >= 0), else int32."""
    return c.astype("<u2") if largest <= _U16_MAX else np.ascontiguousarray(c, "<i4")


def _sorted_runs(
    g: np.ndarray, c0: np.ndarray, c1: np.ndarray, largest: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """For cells strictly increasing in (geometry_id, channel1, channel0) and at least two of them: the
    first cell of each module and the packed channel columns. None for any other order (or duplicates).

    Channels are non-negative (checked before; ``largest`` are their maxima): within a module the order
    is that of the key ``channel1 << b | channel0``, with ``b`` the packed channel width (16, or 32 when
    a channel is wider).
    """
    new_module = g[1:] != g[:-1]
    starts = np.empty(int(np.count_nonzero(new_module)) + 1, np.intp)
    starts[0] = 0
    np.add(np.flatnonzero(new_module), 1, out=starts[1:])
    module_ids = g[starts]
    if not bool((module_ids[1:] > module_ids[:-1]).all()):
        return None
    top0, top1 = largest if largest is not None else (int(c0.max()), int(c1.max()))
    ch0, ch1 = _narrow_channel(c0, top0), _narrow_channel(c1, top1)
    rising = _channel_key(c0, c1, 16 if max(top0, top1) <= _U16_MAX else 32)
    rising = rising[1:] > rising[:-1]
    rising |= new_module
    if not bool(rising.all()):
        return None
    return starts, ch0, ch1


def _channel_key(c0: np.ndarray, c1: np.ndarray, shift: int) -> np.ndarray:
    """``channel1 << shift | channel0`` per cell, for non-negative channels below ``2**shift``.

    With 16-bit channels the key is built from uint32 views of the int32 columns: one new array and
    two same-dtype passes, where converting each column first would cost two more arrays and passes
    (and mixed-dtype ufuncs cast through buffers at half the speed).
    """
    if shift == 16 and c0.dtype == c1.dtype == np.dtype("<i4"):
        key = np.left_shift(c1.view("<u4"), np.uint32(16))
        key |= c0.view("<u4")
        return key
    key64 = c1.astype(np.uint64)
    np.left_shift(key64, np.uint64(shift), out=key64)
    key64 |= c0.astype(np.uint64)
    return key64


# --- responses --------------------------------------------------------------------------------------


def outputs_from_tracks(
    tracks: Tracks, requested: Sequence[str] | None = None
) -> list[tuple[TensorSpec, np.ndarray]]:
    """The model's outputs (all, or the ``requested`` ones in that order) as contiguous little-endian arrays.

    Dtypes are widened where the chain produced narrower ones (float32 -> FP64), which is exact.

    Raises:
        InferError: a requested output does not exist.
    """
    t = tracks
    names = list(requested) if requested else [o.name for o in OUTPUTS]
    unknown = [n for n in names if n not in OUTPUT_BY_NAME]
    if unknown:
        raise InferError(f"unexpected inference output(s) {unknown}; the model has {list(OUTPUT_BY_NAME)}")
    columns = {
        "TRACK_PARAMS": lambda: t.params,
        "TRACK_COV": lambda: t.cov,
        "TRACK_CHI2": lambda: t.chi2,
        "TRACK_NDF": lambda: t.ndf,
        "TRACK_N_HOLES": lambda: t.n_holes,
        "TRACK_LENGTH": lambda: np.diff(np.asarray(t.meas_offsets)),
        "MEASUREMENTS": lambda: np.stack([np.asarray(t.meas_local0), np.asarray(t.meas_local1)], axis=1),
        "MEASUREMENT_GEOMETRY_ID": lambda: t.meas_geometry_id,
        "MEASUREMENT_DIMENSION": lambda: t.meas_dimension,
        "MEASUREMENT_TRUTH_ID": lambda: t.meas_truth_id,
    }
    out = []
    for name in names:
        spec = OUTPUT_BY_NAME[name]
        arr = np.ascontiguousarray(np.asarray(columns[name]()), dtype=spec.dtype)
        out.append((spec, arr))
    return out


def tracks_from_outputs(outputs: Mapping[str, np.ndarray], event_id: int = 0) -> Tracks:
    """Inverse of :func:`outputs_from_tracks` (for clients and tests): all outputs back into :class:`Tracks`."""
    length = np.asarray(outputs["TRACK_LENGTH"], dtype=np.int64)
    offsets = np.zeros(length.shape[0] + 1, np.int64)
    np.cumsum(length, out=offsets[1:])
    meas = np.asarray(outputs["MEASUREMENTS"]).reshape(-1, 2)
    return Tracks(
        params=np.asarray(outputs["TRACK_PARAMS"]).reshape(-1, 5),
        cov=np.asarray(outputs["TRACK_COV"]).reshape(-1, 5, 5),
        chi2=np.asarray(outputs["TRACK_CHI2"]),
        ndf=np.asarray(outputs["TRACK_NDF"]),
        n_holes=np.asarray(outputs["TRACK_N_HOLES"]),
        meas_offsets=offsets,
        meas_geometry_id=np.asarray(outputs["MEASUREMENT_GEOMETRY_ID"]),
        meas_local0=np.ascontiguousarray(meas[:, 0]),
        meas_local1=np.ascontiguousarray(meas[:, 1]),
        meas_dimension=np.asarray(outputs["MEASUREMENT_DIMENSION"]),
        meas_truth_id=np.asarray(outputs["MEASUREMENT_TRUTH_ID"]),
        event_id=event_id,
    )
