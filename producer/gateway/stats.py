"""Per-model inference statistics in the form of KServe's ``statistics`` extension (Triton's).

Each successful request adds one count to ``success``, ``queue``, ``compute_input``, ``compute_infer`` and
``compute_output`` under one lock, so a reader (perf_analyzer takes differences between two reads) always
sees the compute counts agree. The durations come from the fleet's own timings:

- ``queue``: the broker's queue time plus the wait inside the worker before its compute thread took the
  event (``queue_s`` + ``worker_queue_s``);
- ``compute_input``: the gateway's checks, sort/merge and packing, plus the worker's unpacking and copy to
  the device (``decode_s``);
- ``compute_infer``: the reconstruction chain (``chain_s``; with dynamic batching, the batch's time);
- ``compute_output``: the worker's packing of the tracks (``pack_s``) plus the gateway's unpacking into
  output tensors;
- ``success``: from the request's arrival at the gateway to its response being ready, so that
  ``success - queue - compute`` is the transport (gateway <-> broker <-> worker) and framing overhead.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


@dataclass(frozen=True)
class RequestTimes:
    """Where one successful request spent its time [s]."""

    total_s: float
    queue_s: float
    compute_input_s: float
    compute_infer_s: float
    compute_output_s: float

    @staticmethod
    def from_fleet(
        total_s: float,
        gateway_in_s: float,
        gateway_out_s: float,
        broker_queue_s: float,
        timings: Mapping[str, float],
    ) -> RequestTimes:
        """Split a request's time using the broker's queue time and the worker's stage timings."""

        def t(key: str) -> float:
            v = timings.get(key, 0.0)
            return float(v) if isinstance(v, int | float) and v > 0 else 0.0

        infer = t("chain_s")
        if infer == 0.0:  # an older worker: what remains of its own time
            infer = max(0.0, t("worker_s") - t("decode_s") - t("pack_s"))
        return RequestTimes(
            total_s=max(0.0, total_s),
            queue_s=max(0.0, broker_queue_s) + t("worker_queue_s"),
            compute_input_s=max(0.0, gateway_in_s) + t("decode_s"),
            compute_infer_s=infer,
            compute_output_s=t("pack_s") + max(0.0, gateway_out_s),
        )


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)


class ModelStats:
    """Thread-safe counters of one model version.

    Args:
        name: model name. version: model version.
        clock_ms: wall clock in ms since the epoch (``last_inference``).
    """

    def __init__(self, name: str, version: str, clock_ms: Any = None) -> None:
        self.name = name
        self.version = version
        self._clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self._lock = threading.Lock()
        self._count = dict.fromkeys(_DURATIONS, 0)
        self._ns = dict.fromkeys(_DURATIONS, 0)
        self._inference_count = 0
        self._execution_count = 0
        self._last_inference_ms = 0

    def record_success(self, t: RequestTimes) -> None:
        """One successful request (one inference, one execution)."""
        with self._lock:
            for key, seconds in (
                ("success", t.total_s),
                ("queue", t.queue_s),
                ("compute_input", t.compute_input_s),
                ("compute_infer", t.compute_infer_s),
                ("compute_output", t.compute_output_s),
            ):
                self._count[key] += 1
                self._ns[key] += _ns(seconds)
            self._inference_count += 1
            self._execution_count += 1
            self._last_inference_ms = self._clock_ms()

    def record_failure(self, total_s: float) -> None:
        """One failed request."""
        with self._lock:
            self._count["fail"] += 1
            self._ns["fail"] += _ns(max(0.0, total_s))
            self._last_inference_ms = self._clock_ms()

    def snapshot(self) -> dict[str, Any]:
        """One ``model_stats`` entry of KServe's statistics response (JSON field names)."""
        with self._lock:
            counts, ns = dict(self._count), dict(self._ns)
            inference, execution, last = self._inference_count, self._execution_count, self._last_inference_ms

        def d(key: str) -> dict[str, int]:
            return {"count": counts[key], "ns": ns[key]}

        zero = {"count": 0, "ns": 0}
        return {
            "name": self.name,
            "version": self.version,
            "last_inference": last,
            "inference_count": inference,
            "execution_count": execution,
            "inference_stats": {
                **{k: d(k) for k in _DURATIONS},
                "cache_hit": dict(zero),
                "cache_miss": dict(zero),
            },
            "batch_stats": [
                {
                    "batch_size": 1,
                    "compute_input": d("compute_input"),
                    "compute_infer": d("compute_infer"),
                    "compute_output": d("compute_output"),
                }
            ]
            if counts["success"]
            else [],
            "memory_usage": [],
            "response_stats": {},
        }
