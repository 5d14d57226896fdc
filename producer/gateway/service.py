"""The protocol-independent core of the gateway: one model, served by the fleet behind a broker.

The HTTP and gRPC front ends parse their wire forms, call :class:`Gateway` and render what it returns or
the :class:`~producer.gateway.model.InferError` it raises; neither holds state of its own.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from broker.protocol import ErrorCode
from kernels.edm.packed import MAX_CELLS
from kernels.edm.packed_tracks import unpack_tracks
from kernels.errors import EventFormatError
from producer.client import ClientConfig
from producer.gateway.bridge import BridgeConfig, BrokerBridge
from producer.gateway.model import (
    MODEL_VERSION,
    InferError,
    PackedRequest,
    RawInput,
    Status,
    TensorSpec,
    decode_inputs,
    model_config,
    model_metadata,
    outputs_from_tracks,
    pack_inputs,
)
from producer.gateway.shm import SharedMemoryRegistry, Slice, write_outputs
from producer.gateway.stats import ModelStats, RequestTimes

log = logging.getLogger(__name__)

#: KServe extensions the gateway implements (perf_analyzer reads server statistics only when
#: "statistics" is listed).
EXTENSIONS = ("binary_tensor_data", "model_configuration", "statistics", "system_shared_memory")

# fleet error code -> KServe error class
_FLEET_ERRORS: dict[str, Status] = {
    ErrorCode.BAD_EVENT: Status.INVALID_ARGUMENT,
    ErrorCode.DETECTOR_MISMATCH: Status.INVALID_ARGUMENT,
    ErrorCode.OVERSIZED: Status.TOO_LARGE,
    ErrorCode.TIMEOUT: Status.DEADLINE_EXCEEDED,
    "busy": Status.UNAVAILABLE,
    ErrorCode.SHUTTING_DOWN: Status.UNAVAILABLE,
}


@dataclass(frozen=True)
class GatewayConfig:
    """What the gateway serves and how.

    Attributes:
        broker: the broker's producer endpoint.
        model_name: the model's name.
        detector: detector directory: events are stamped with its fingerprint, so that workers serving
            another detector refuse them (None: not stamped). Whether cells fit the detector is checked
            by the workers in either case.
        max_request_bytes: largest request body / gRPC message [bytes].
        max_cells: cells accepted in one request.
        request_timeout_s: a request still unanswered after this long fails with DEADLINE_EXCEEDED [s].
        max_in_flight: requests held at once; more get UNAVAILABLE.
        client: retry settings of the broker connection (its endpoint and deadline are set from above).
        pack_threads: threads that check and pack one request's cells while no other request is being
            packed (a lone request on a host with idle cores); 1: always one; None: by the cores this
            process may use (:func:`default_pack_threads`).
    """

    broker: str = "tcp://127.0.0.1:5555"
    model_name: str = "trackfleet"
    detector: Path | None = None
    max_request_bytes: int = 256 * 2**20
    max_cells: int = MAX_CELLS
    request_timeout_s: float = 300.0
    max_in_flight: int = 1024
    client: ClientConfig = field(default_factory=ClientConfig)
    pack_threads: int | None = None

    def __post_init__(self) -> None:
        if not self.model_name or "/" in self.model_name:
            raise ValueError(f"bad model name {self.model_name!r}")
        if self.pack_threads is not None and self.pack_threads < 1:
            raise ValueError("pack_threads must be >= 1")
        if self.max_request_bytes < 1 or self.max_cells < 1 or self.max_in_flight < 1:
            raise ValueError("max_request_bytes, max_cells and max_in_flight must be >= 1")
        if not self.request_timeout_s > 0:
            raise ValueError("request_timeout_s must be > 0")


def default_pack_threads() -> int:
    """Threads for one request's packing: 3 where this process may use 4 cores or more, 2 on 2-3 cores,
    else 1 (on a 16-core host, 2 and 3 threads cut packing a mu=200 event by 30-35%; 4 gained nothing
    more, 6 and 8 were slower: docs/gateway.md)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return 3 if cores >= 4 else 2 if cores >= 2 else 1


@dataclass(frozen=True)
class InferResult:
    """A successful inference: the outputs in response order, the request id to echo, and where outputs
    were written to shared memory instead (their data does not go in the response)."""

    outputs: list[tuple[TensorSpec, np.ndarray]]
    request_id: str = ""
    in_shm: Mapping[str, Slice] = field(default_factory=dict)


class Gateway:
    """One model backed by the fleet.

    Args:
        config: what to serve.
        context: ZeroMQ context for the broker sockets (a new one when None).
    """

    def __init__(self, config: GatewayConfig, context: zmq.Context[Any] | None = None) -> None:
        self.config = config
        self.fingerprint = ""
        if config.detector is not None:
            from producer.io.detector import load_detector

            self.fingerprint = load_detector(config.detector).fingerprint()
        client = replace(config.client, endpoint=config.broker, deadline_s=config.request_timeout_s)
        self.bridge = BrokerBridge(BridgeConfig(client=client, max_in_flight=config.max_in_flight), context)
        self.stats = ModelStats(config.model_name, MODEL_VERSION)
        self.shm = SharedMemoryRegistry()
        self.pack_threads = config.pack_threads or default_pack_threads()
        self._pack_pool = (
            ThreadPoolExecutor(self.pack_threads - 1, thread_name_prefix="gateway-pack")
            if self.pack_threads > 1
            else None
        )
        self._packing = 0  # requests being packed now
        self._packing_lock = threading.Lock()
        params = {"broker": config.broker}
        if self.fingerprint:
            params["detector_fingerprint"] = self.fingerprint
        self._config = model_config(config.model_name, params)
        self._metadata = model_metadata(config.model_name)

    def start(self) -> None:
        """Connect to the broker (requests are accepted from now on)."""
        self.bridge.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Fail what the fleet has not answered with UNAVAILABLE, close the broker sockets and unregister
        the shared memory regions."""
        self.bridge.stop(timeout_s)
        self.shm.unregister()
        if self._pack_pool is not None:
            self._pack_pool.shutdown(wait=False)

    # --- server and model endpoints -------------------------------------------------------------------

    @property
    def live(self) -> bool:
        return True

    @property
    def ready(self) -> bool:
        """The broker answers and has at least one worker."""
        return self.bridge.ready

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "trackfleet", "version": _package_version(), "extensions": list(EXTENSIONS)}

    def check_model(self, name: str, version: str = "") -> None:
        """Raises: InferError NOT_FOUND for any other model or version."""
        if name != self.config.model_name:
            raise InferError(f"Request for unknown model: '{name}' is not found", Status.NOT_FOUND)
        if version not in ("", MODEL_VERSION):
            raise InferError(
                f"Request for unknown model: '{name}' version {version} is not found", Status.NOT_FOUND
            )

    def model_metadata(self, name: str, version: str = "") -> dict[str, Any]:
        self.check_model(name, version)
        return self._metadata

    def model_config(self, name: str, version: str = "") -> dict[str, Any]:
        self.check_model(name, version)
        return self._config

    def model_ready(self, name: str, version: str = "") -> bool:
        self.check_model(name, version)
        return self.ready

    def model_statistics(self, name: str = "", version: str = "") -> dict[str, Any]:
        """KServe statistics of one model, or of all models when ``name`` is empty."""
        if name:
            self.check_model(name, version)
        return {"model_stats": [self.stats.snapshot()]}

    def repository_index(self) -> list[dict[str, str]]:
        state = "READY" if self.ready else "UNAVAILABLE"
        return [{"name": self.config.model_name, "version": MODEL_VERSION, "state": state, "reason": ""}]

    # --- inference --------------------------------------------------------------------------------------

    def infer(
        self,
        name: str,
        version: str,
        inputs: Sequence[RawInput],
        requested_outputs: Sequence[str] | None = None,
        request_id: str = "",
        started: float | None = None,
        output_shm: Mapping[str, Slice] | None = None,
    ) -> InferResult:
        """Reconstruct one event.

        Args:
            name / version: the model addressed.
            inputs: the request's tensors as received.
            requested_outputs: output names in response order (None or empty: all).
            request_id: echoed in the result.
            started: ``time.perf_counter()`` when the request arrived (default: now).
            output_shm: requested outputs to write to shared memory instead of returning their data.

        Raises:
            InferError: a KServe error for the client; the request is counted as failed.
        """
        t0 = started if started is not None else time.perf_counter()
        self.check_model(name, version)
        try:
            result, times = self._infer(inputs, requested_outputs, t0)
            write_outputs(result, output_shm or {})
        except InferError:
            self.stats.record_failure(time.perf_counter() - t0)
            raise
        except Exception as exc:  # never a traceback for the client, never a dead handler
            log.exception("inference failed unexpectedly")
            self.stats.record_failure(time.perf_counter() - t0)
            raise InferError(f"internal error: {type(exc).__name__}: {exc}", Status.INTERNAL) from exc
        self.stats.record_success(times)
        return InferResult(result, request_id, output_shm or {})

    def _infer(
        self, inputs: Sequence[RawInput], requested: Sequence[str] | None, t0: float
    ) -> tuple[list[tuple[TensorSpec, np.ndarray]], RequestTimes]:
        tensors = decode_inputs(inputs)
        event = self._pack(tensors)
        t_submit = time.perf_counter()
        future = self.bridge.submit(event.event_id, event.frames)
        try:
            # the bridge's client fails the event with "timeout" at request_timeout_s; this is a backstop
            reply = future.result(timeout=self.config.request_timeout_s + 30.0)
        except FutureTimeout:
            raise InferError("no answer from the fleet in time", Status.DEADLINE_EXCEEDED) from None
        t_reply = time.perf_counter()
        if not reply.ok:
            status = _FLEET_ERRORS.get(reply.code, Status.INTERNAL)
            raise InferError(f"the fleet failed the event ({reply.code}): {reply.message}", status)
        try:
            first = reply.payload[0]
            tracks = unpack_tracks(
                first.bytes if isinstance(first, zmq.Frame) else bytes(first), reply.payload[1:]
            )
        except (EventFormatError, IndexError) as exc:
            raise InferError(f"the fleet returned unreadable tracks: {exc}", Status.INTERNAL) from None
        outputs = outputs_from_tracks(tracks, requested)
        t_end = time.perf_counter()
        times = RequestTimes.from_fleet(
            total_s=t_end - t0,
            gateway_in_s=t_submit - t0,
            gateway_out_s=t_end - t_reply,
            broker_queue_s=reply.queue_s,
            timings=reply.timings,
        )
        return outputs, times

    def _pack(self, tensors: Mapping[str, np.ndarray]) -> PackedRequest:
        """:func:`pack_inputs` on the pack threads while this is the only request being packed: with
        requests packed side by side the cores are busy anyway, and threads would only contend."""
        with self._packing_lock:
            self._packing += 1
            alone = self._packing == 1
        try:
            return pack_inputs(
                tensors,
                self.fingerprint,
                self.config.max_cells,
                pool=self._pack_pool if alone else None,
                pieces=self.pack_threads if alone else 1,
            )
        finally:
            with self._packing_lock:
                self._packing -= 1


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("trackfleet")
    except Exception:  # running from a source tree that was never installed
        return "0"
