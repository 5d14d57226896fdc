"""KServe v2 gRPC front end (``inference.GRPCInferenceService``), on the stubs shipped with tritonclient.

The message classes and the servicer base come from ``tritonclient.grpc`` (the ``triton`` extra), so
the service is Triton's own definition rather than a vendored copy of its protos; they are imported
when a server is built, never at module import. Inputs may come as ``raw_input_contents`` (what
tritonclient and perf_analyzer send) or as typed ``contents``; outputs always go back as
``raw_output_contents``. Messages above the request limit are refused by gRPC itself
(RESOURCE_EXHAUSTED); every other error is a status code with the gateway's message.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

from producer.gateway.model import MODEL_VERSION, InferError, RawInput
from producer.gateway.service import Gateway

log = logging.getLogger(__name__)

# KServe datatype -> the typed contents field that carries it
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def import_stubs() -> tuple[Any, Any, Any, Any]:
    """(grpc, service_pb2, service_pb2_grpc, model_config_pb2) from grpcio and tritonclient.

    Raises:
        RuntimeError: the ``triton`` extra is not installed (or its versions do not fit together).
    """
    try:
        import grpc
        from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
    except (ImportError, RuntimeError) as exc:
        raise RuntimeError(
            "the gateway's gRPC endpoint needs grpcio and tritonclient: pip install -e '.[triton]' "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    return grpc, service_pb2, service_pb2_grpc, model_config_pb2


def _inputs(request: Any) -> list[RawInput]:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InferError(
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: give raw contents for all "
            "inputs or for none"
        )
    out = []
    for i, t in enumerate(request.inputs):
        shape = tuple(int(d) for d in t.shape)
        if raw:
            out.append(RawInput(t.name, t.datatype, shape, data=raw[i]))
            continue
        field = _CONTENTS.get(t.datatype)
        if field is None or not t.HasField("contents"):
            raise InferError(f"input '{t.name}' carries no data (raw_input_contents or contents.{field})")
        out.append(RawInput(t.name, t.datatype, shape, values=list(getattr(t.contents, field))))
    return out


def build_servicer(gateway: Gateway) -> Any:
    """A ``GRPCInferenceServiceServicer`` that serves ``gateway``."""
    grpc, pb, pb_grpc, mc_pb = import_stubs()
    from google.protobuf import json_format

    def rpc(fn: Callable[..., Any]) -> Callable[..., Any]:
        """InferError -> its status code; anything else -> INTERNAL, logged; the server carries on."""

        @functools.wraps(fn)
        def wrapped(self: Any, request: Any, context: Any) -> Any:
            try:
                return fn(self, request, context)
            except InferError as exc:
                context.abort(getattr(grpc.StatusCode, exc.status.grpc), str(exc))
            except Exception as exc:
                log.exception("gRPC %s failed", fn.__name__)
                context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

        return wrapped

    config_proto = json_format.ParseDict(
        gateway.model_config(gateway.config.model_name), mc_pb.ModelConfig(), ignore_unknown_fields=False
    )

    def infer_response(request: Any, started: float) -> Any:
        requested = [o.name for o in request.outputs]
        result = gateway.infer(
            request.model_name,
            request.model_version,
            _inputs(request),
            requested or None,
            request_id=request.id,
            started=started,
        )
        response = pb.ModelInferResponse(
            model_name=request.model_name, model_version=MODEL_VERSION, id=result.request_id
        )
        for spec, arr in result.outputs:
            response.outputs.add(name=spec.name, datatype=spec.datatype, shape=list(arr.shape))
            response.raw_output_contents.append(arr.tobytes())
        return response

    class Servicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc,name-defined]
        @rpc
        def ServerLive(self, request: Any, context: Any) -> Any:
            return pb.ServerLiveResponse(live=gateway.live)

        @rpc
        def ServerReady(self, request: Any, context: Any) -> Any:
            return pb.ServerReadyResponse(ready=gateway.ready)

        @rpc
        def ModelReady(self, request: Any, context: Any) -> Any:
            return pb.ModelReadyResponse(ready=gateway.model_ready(request.name, request.version))

        @rpc
        def ServerMetadata(self, request: Any, context: Any) -> Any:
            return json_format.ParseDict(gateway.server_metadata(), pb.ServerMetadataResponse())

        @rpc
        def ModelMetadata(self, request: Any, context: Any) -> Any:
            return json_format.ParseDict(
                gateway.model_metadata(request.name, request.version), pb.ModelMetadataResponse()
            )

        @rpc
        def ModelConfig(self, request: Any, context: Any) -> Any:
            gateway.check_model(request.name, request.version)
            return pb.ModelConfigResponse(config=config_proto)

        @rpc
        def ModelStatistics(self, request: Any, context: Any) -> Any:
            return json_format.ParseDict(
                gateway.model_statistics(request.name, request.version), pb.ModelStatisticsResponse()
            )

        @rpc
        def RepositoryIndex(self, request: Any, context: Any) -> Any:
            return json_format.ParseDict({"models": gateway.repository_index()}, pb.RepositoryIndexResponse())

        @rpc
        def ModelInfer(self, request: Any, context: Any) -> Any:
            return infer_response(request, time.perf_counter())

        def ModelStreamInfer(self, request_iterator: Iterator[Any], context: Any) -> Iterator[Any]:
            # one response per request, in order; an error answers that request and the stream goes on
            for request in request_iterator:
                started = time.perf_counter()
                try:
                    yield pb.ModelStreamInferResponse(infer_response=infer_response(request, started))
                except InferError as exc:
                    yield pb.ModelStreamInferResponse(error_message=str(exc))
                except Exception as exc:
                    log.exception("gRPC stream inference failed")
                    yield pb.ModelStreamInferResponse(error_message=f"internal error: {exc}")

        @rpc
        def SystemSharedMemoryStatus(self, request: Any, context: Any) -> Any:
            return pb.SystemSharedMemoryStatusResponse()

        @rpc
        def SystemSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
            return pb.SystemSharedMemoryUnregisterResponse()  # nothing is ever registered

        @rpc
        def CudaSharedMemoryStatus(self, request: Any, context: Any) -> Any:
            return pb.CudaSharedMemoryStatusResponse()

        @rpc
        def CudaSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
            return pb.CudaSharedMemoryUnregisterResponse()

    return Servicer()


class GatewayGRPCServer:
    """The gRPC server of one :class:`Gateway`.

    Args:
        address: ``host:port`` (port 0 picks a free one, see :attr:`port`).
        gateway: the model to serve.
        max_workers: requests served at once (more wait in gRPC's queue).
    """

    def __init__(self, address: str, gateway: Gateway, max_workers: int = 64) -> None:
        grpc, _, pb_grpc, _ = import_stubs()
        limit = gateway.config.max_request_bytes
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="gateway-grpc"),
            # RPCs beyond this are refused with RESOURCE_EXHAUSTED instead of queueing without bound
            maximum_concurrent_rpcs=max(max_workers, gateway.config.max_in_flight),
            options=[
                ("grpc.max_receive_message_length", min(limit, 2**31 - 1)),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(build_servicer(gateway), self.server)
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"gRPC: cannot bind {address}")

    def start(self) -> None:
        self.server.start()

    def stop(self, grace_s: float) -> None:
        """Stop taking RPCs; those in progress get ``grace_s`` to finish."""
        self.server.stop(grace_s).wait(grace_s + 1.0)
