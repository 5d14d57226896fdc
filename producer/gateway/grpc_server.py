"""KServe v2 gRPC front end (``inference.GRPCInferenceService``), on the stubs shipped with tritonclient.

The message classes and the servicer base come from ``tritonclient.grpc`` (the ``triton`` extra), so
the service is Triton's own definition rather than a vendored copy of its protos; they are imported
when a server is built, never at module import. Inputs may come as ``raw_input_contents`` (what
tritonclient and perf_analyzer send), as typed ``contents``, or in system shared memory (the
``shared_memory_*`` parameters, :mod:`producer.gateway.shm`; SystemSharedMemoryRegister / Unregister /
Status manage the regions); outputs go back as ``raw_output_contents``, or are written to shared memory
when a requested output names a region (its raw content is then empty). Messages above the request
limit are refused by gRPC itself (RESOURCE_EXHAUSTED); every other error is a status code with the
gateway's message.

ModelInfer, the call that carries megabytes, skips protobuf for its tensors: gRPC hands the handler the
message's bytes, :func:`split_infer_request` cuts the ``raw_input_contents`` out as views of them (the
rest, a few hundred bytes, is parsed as usual), and the response's ``raw_output_contents`` are written
after the serialized rest by :func:`encode_infer_response`. Protobuf would copy each tensor twice on the
way in (parsing, then reading the field) and twice on the way out. ModelStreamInfer uses the parsed
messages.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from typing import Any

import numpy as np

from producer.gateway.model import MODEL_VERSION, InferError, RawInput
from producer.gateway.service import Gateway
from producer.gateway.shm import SharedMemoryRegistry, Slice

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


_SERVICE = "inference.GRPCInferenceService"
_EMPTY = np.empty(0, np.uint8)  # the raw content of an output written to shared memory


def _varint(mv: memoryview, pos: int) -> tuple[int, int]:
    """A protobuf varint at ``pos``: (value, position after it)."""
    value = shift = 0
    while True:
        if pos >= len(mv) or shift > 63:
            raise InferError("malformed ModelInferRequest: truncated or overlong varint")
        b = mv[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def split_infer_request(data: bytes, raw_field: int) -> tuple[bytes, list[memoryview]]:
    """A serialized ModelInferRequest without its ``raw_input_contents`` (field ``raw_field``), and those
    contents as views of ``data``, in order. Only the top-level fields are walked.

    Raises:
        InferError: the bytes are not a well-formed protobuf message.
    """
    mv = memoryview(data).cast("B")
    n = len(mv)
    pos = 0
    raw: list[memoryview] = []
    keep: list[memoryview] = []
    kept_from = 0  # start of the run of fields kept since the last raw content
    while pos < n:
        start = pos
        key, pos = _varint(mv, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _varint(mv, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, pos = _varint(mv, pos)
            if field == raw_field and pos + length <= n:
                raw.append(mv[pos : pos + length])
                keep.append(mv[kept_from:start])
                kept_from = pos + length
            pos += length
        else:
            raise InferError(f"malformed ModelInferRequest: wire type {wire_type} at byte {start}")
        if pos > n or field == 0:
            raise InferError(f"malformed ModelInferRequest: field {field} at byte {start} runs past the end")
    keep.append(mv[kept_from:])
    return b"".join(keep), raw


def encode_infer_response(response: Any, raw_field: int, outputs: list[Any]) -> bytes:
    """``response`` serialized, followed by ``outputs`` as its ``raw_output_contents`` (field ``raw_field``),
    each copied once. Protobuf appends repeated fields in the order they come, so this is the message
    with ``raw_output_contents`` set."""
    tag = _encode_varint(raw_field << 3 | 2)
    parts: list[Any] = [response.SerializeToString()]
    for arr in outputs:
        blob = memoryview(arr).cast("B") if arr.size else b""
        parts += [tag, _encode_varint(len(blob)), blob]
    return b"".join(parts)


def _parameters(params: Mapping[str, Any]) -> dict[str, Any]:
    """A map of InferParameter as plain Python values (unset ones left out)."""
    out = {}
    for key, p in params.items():
        choice = p.WhichOneof("parameter_choice")
        if choice is not None:
            out[key] = getattr(p, choice)
    return out


def _inputs(request: Any, shm: SharedMemoryRegistry, raw: list[Any] | None = None) -> list[RawInput]:
    """The request's inputs. As Triton (and tritonclient) have it, ``raw_input_contents`` belong to the
    inputs not in shared memory, in order."""
    if raw is None:
        raw = list(request.raw_input_contents)
    targets = [
        shm.slice(_parameters(t.parameters), f"input '{t.name}'") if t.parameters else None
        for t in request.inputs
    ]
    n_plain = sum(target is None for target in targets)
    if raw and len(raw) != n_plain:
        raise InferError(
            f"{len(raw)} raw_input_contents for {n_plain} inputs not in shared memory: give raw contents "
            "for all of them or for none"
        )
    out = []
    plain = iter(raw)
    for t, target in zip(request.inputs, targets, strict=True):
        shape = tuple(int(d) for d in t.shape)
        if target is not None:
            out.append(RawInput(t.name, t.datatype, shape, data=target.readonly))
            continue
        if raw:
            out.append(RawInput(t.name, t.datatype, shape, data=next(plain)))
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

    shm = gateway.shm

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

    def infer(request: Any, started: float, raw: list[Any] | None = None) -> tuple[Any, list[Any]]:
        """The response without its raw contents, and the output arrays that belong there (empty for
        outputs written to shared memory: Triton keeps one raw content per output, in output order)."""
        requested = [o.name for o in request.outputs]
        output_shm: dict[str, Slice] = {}
        for o in request.outputs:
            target = shm.slice(_parameters(o.parameters), f"output '{o.name}'") if o.parameters else None
            if target is not None:
                output_shm[o.name] = target
        result = gateway.infer(
            request.model_name,
            request.model_version,
            _inputs(request, shm, raw),
            requested or None,
            request_id=request.id,
            started=started,
            output_shm=output_shm,
        )
        response = pb.ModelInferResponse(
            model_name=request.model_name, model_version=MODEL_VERSION, id=result.request_id
        )
        arrays = []
        for spec, arr in result.outputs:
            out = response.outputs.add(name=spec.name, datatype=spec.datatype, shape=list(arr.shape))
            target = result.in_shm.get(spec.name)
            if target is not None:
                for key, value in target.parameters().items():
                    if isinstance(value, str):
                        out.parameters[key].string_param = value
                    else:
                        out.parameters[key].int64_param = value
                arr = _EMPTY
            arrays.append(arr)
        return response, arrays

    def infer_response(request: Any, started: float) -> Any:
        response, arrays = infer(request, started)
        for arr in arrays:
            response.raw_output_contents.append(arr.tobytes())
        return response

    raw_in = pb.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number
    raw_out = pb.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number

    def model_infer_bytes(data: bytes, context: Any) -> bytes:
        """ModelInfer on the message's bytes (see the module docstring)."""
        started = time.perf_counter()
        try:
            rest, raw = split_infer_request(data, raw_in)
            try:
                request = pb.ModelInferRequest.FromString(rest)
            except Exception as exc:  # protobuf's DecodeError
                raise InferError(f"malformed ModelInferRequest: {exc}") from None
            response, arrays = infer(request, started, raw)
            return encode_infer_response(response, raw_out, arrays)
        except InferError as exc:
            context.abort(getattr(grpc.StatusCode, exc.status.grpc), str(exc))
        except Exception as exc:
            log.exception("gRPC ModelInfer failed")
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        raise AssertionError("unreachable: context.abort raises")

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
            regions = {r["name"]: r for r in shm.status(request.name)}
            return json_format.ParseDict({"regions": regions}, pb.SystemSharedMemoryStatusResponse())

        @rpc
        def SystemSharedMemoryRegister(self, request: Any, context: Any) -> Any:
            shm.register(request.name, request.key, request.offset, request.byte_size)
            return pb.SystemSharedMemoryRegisterResponse()

        @rpc
        def SystemSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
            shm.unregister(request.name)
            return pb.SystemSharedMemoryUnregisterResponse()

        @rpc
        def CudaSharedMemoryStatus(self, request: Any, context: Any) -> Any:
            return pb.CudaSharedMemoryStatusResponse()

        @rpc
        def CudaSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
            return pb.CudaSharedMemoryUnregisterResponse()

    servicer = Servicer()
    servicer.model_infer_bytes = model_infer_bytes
    return servicer


def add_servicer(server: Any, servicer: Any) -> None:
    """Register ``servicer`` as the generated ``add_GRPCInferenceServiceServicer_to_server`` would, with
    ModelInfer taking and returning bytes (``servicer.model_infer_bytes``)."""
    grpc, _, pb_grpc, _ = import_stubs()

    class Collect:  # what the generated function registers, whichever grpcio API it uses
        def __init__(self) -> None:
            self.generic: list[Any] = []
            self.registered: dict[str, Any] | None = None

        def add_generic_rpc_handlers(self, handlers: Any) -> None:
            self.generic.extend(handlers)

        def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
            self.registered = dict(handlers)

    found = Collect()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, found)
    model_infer = grpc.unary_unary_rpc_method_handler(servicer.model_infer_bytes)  # no (de)serializer
    override = grpc.method_handlers_generic_handler(_SERVICE, {"ModelInfer": model_infer})
    server.add_generic_rpc_handlers((override, *found.generic))  # the first handler that knows a method wins
    if found.registered is not None:  # registered methods are looked up before generic handlers
        found.registered["ModelInfer"] = model_infer
        server.add_registered_method_handlers(_SERVICE, found.registered)


class GatewayGRPCServer:
    """The gRPC server of one :class:`Gateway`.

    Args:
        address: ``host:port`` (port 0 picks a free one, see :attr:`port`).
        gateway: the model to serve.
        max_workers: requests served at once (more wait in gRPC's queue).
    """

    def __init__(self, address: str, gateway: Gateway, max_workers: int = 64) -> None:
        grpc, _, _, _ = import_stubs()
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
        add_servicer(self.server, build_servicer(gateway))
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"gRPC: cannot bind {address}")

    def start(self) -> None:
        self.server.start()

    def stop(self, grace_s: float) -> None:
        """Stop taking RPCs; those in progress get ``grace_s`` to finish."""
        self.server.stop(grace_s).wait(grace_s + 1.0)
