"""KServe v2 REST front end with the binary tensor data extension, on the standard library's HTTP server.

Endpoints (``{m}`` the model name; ``/versions/{v}`` may follow it):

- ``GET /v2`` server metadata; ``GET /v2/health/live``, ``/v2/health/ready``
- ``GET /v2/models/{m}`` metadata, ``/ready``, ``/config``, ``/stats``; ``GET /v2/models/stats``
- ``POST /v2/models/{m}/infer``: JSON request, or a JSON header of ``Inference-Header-Content-Length``
  bytes followed by the inputs' raw little-endian data (``parameters.binary_data_size`` per input, in
  input order). Outputs come back as binary data when the request asks for it (``binary_data`` per
  output, ``binary_data_output`` for all), otherwise as JSON ``data``.
- ``POST /v2/repository/index``
- ``POST /v2/systemsharedmemory/region/{r}/register`` (``{"key", "offset", "byte_size"}``),
  ``POST /v2/systemsharedmemory[/region/{r}]/unregister``, ``GET /v2/systemsharedmemory[/region/{r}]/status``:
  the system shared memory extension (:mod:`producer.gateway.shm`); inputs and requested outputs name a
  region in their ``parameters`` instead of carrying data (an output written there comes back as
  name, datatype and shape only: Triton's C++ client reads ``parameters`` as binary data).
- ``/v2/cudasharedmemory/...``: no CUDA regions: status lists none, unregister succeeds (perf_analyzer
  unregisters both kinds when it starts and stops), register is refused.

Errors are ``{"error": "..."}`` with a status code: 400 bad request, 404 unknown model or path, 411 no
length, 413 too large, 503 not ready / too busy, 504 fleet timeout, 500 internal. A body above the limit
is refused from its ``Content-Length`` without being read (before ``100 Continue`` when the client
asks for it), and the connection is closed.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

import numpy as np

from producer.gateway.model import InferError, RawInput, Status
from producer.gateway.service import Gateway, InferResult
from producer.gateway.shm import SharedMemoryRegistry, Slice

log = logging.getLogger(__name__)

_MODEL = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<rest>/[a-z]+)?$")
_SHM = re.compile(
    r"^/v2/(?P<kind>system|cuda)sharedmemory(?:/region/(?P<name>[^/]+))?/(?P<action>status|register|unregister)$"
)
_DRAIN_BYTES = 256 * 2**20  # an oversized body up to this much beyond the limit is read and dropped


class GatewayHTTPServer(ThreadingHTTPServer):
    """A threading HTTP/1.1 server bound to one :class:`Gateway`.

    Args:
        address: (host, port); port 0 picks a free one (see :attr:`port`).
        gateway: the model to serve.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    #: connections served at once (one thread each); more are closed at once
    max_connections = 512

    def __init__(self, address: tuple[str, int], gateway: Gateway) -> None:
        self.gateway = gateway
        self._connections = threading.BoundedSemaphore(self.max_connections)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._connections.acquire(blocking=False):
            log.warning("HTTP: %d connections open; refusing %s", self.max_connections, client_address)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connections.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "trackfleet-gateway"
    timeout = 600  # idle keep-alive connections are closed after this long [s]
    # a response goes out as several writes (headers, JSON, tensors): Nagle would hold the last ones back
    # until the client acknowledges, and a client that delays its ACK adds tens of milliseconds
    disable_nagle_algorithm = True
    server: GatewayHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    # --- plumbing -------------------------------------------------------------------------------------

    def _send(
        self, status: int, body: list[Any], content_type: str, extra: dict[str, str] | None = None
    ) -> None:
        length = sum(memoryview(b).nbytes for b in body)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            for b in body:
                self.wfile.write(b)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, [json.dumps(obj, separators=(",", ":")).encode()], "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _length(self) -> int | None:
        """The request body's length; answers 411 / 413 itself (and returns None)."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self._error(411, "chunked request bodies are not supported; send Content-Length")
            return None
        text = self.headers.get("Content-Length", "0")
        try:
            n = int(text)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            self._error(400, f"bad Content-Length {text!r}")
            return None
        limit = self.server.gateway.config.max_request_bytes
        if n > limit:
            # read (and drop) a body of sane size so that the client, still sending, gets the answer
            if n <= limit + _DRAIN_BYTES:
                self._drain(n)
            self.close_connection = True
            self._error(413, f"request of {n} bytes exceeds the gateway's limit of {limit} bytes")
            return None
        return n

    def _read_body(self, n: int) -> memoryview | None:
        """The body, read straight into a fresh buffer placed so that the binary data after the JSON header
        of ``Inference-Header-Content-Length`` bytes starts 8-byte aligned: the tensors are then numpy views
        of it that numpy's fast (aligned) loops can check. None when the client closed early."""
        try:
            header_length = int(self.headers.get("Inference-Header-Content-Length", "0"))
        except ValueError:
            header_length = 0  # _split_body refuses it
        buf = np.empty(n + 7, np.uint8)
        start = -(buf.ctypes.data + header_length) % 8
        view = memoryview(buf)[start : start + n]
        got = 0
        while got < n:
            k = self.rfile.readinto(view[got:])
            if not k:
                return None
            got += k
        return view

    def _drain(self, n: int) -> None:
        while n > 0:
            chunk = self.rfile.read(min(n, 2**20))
            if not chunk:
                return
            n -= len(chunk)

    def handle_expect_100(self) -> bool:
        # refuse an oversized body before the client sends it
        length = self.headers.get("Content-Length")
        try:
            too_big = length is not None and int(length) > self.server.gateway.config.max_request_bytes
        except ValueError:
            too_big = False
        if too_big:
            self.close_connection = True
            self._error(413, f"request of {length} bytes exceeds the gateway's limit")
            return False
        return super().handle_expect_100()

    def _route(self, method: str) -> None:
        try:
            self._dispatch(method)
        except InferError as exc:
            self._error(exc.status.http, str(exc))
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as exc:  # a bug must cost one request, not the server
            log.exception("HTTP %s %s failed", method, self.path)
            try:
                self._error(500, f"internal error: {type(exc).__name__}: {exc}")
            except OSError:
                self.close_connection = True

    def do_GET(self) -> None:
        self._route("GET")

    def do_HEAD(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    # --- endpoints ------------------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        gw = self.server.gateway
        path = self.path.split("?", 1)[0].rstrip("/")
        body = memoryview(b"")
        if method == "POST":
            n = self._length()
            if n is None:
                return
            body = self._read_body(n) if n else memoryview(b"")
            if body is None:
                self.close_connection = True
                return
        elif method != "GET":
            self.close_connection = True  # a body we do not read may follow
            raise InferError(f"method {method} is not supported on {path}", Status.NOT_FOUND)
        if method == "GET" and path == "/v2":
            return self._json(200, gw.server_metadata())
        if method == "GET" and path == "/v2/health/live":
            return self._send(200 if gw.live else 503, [], "text/plain")
        if method == "GET" and path == "/v2/health/ready":
            return self._send(200 if gw.ready else 503, [], "text/plain")
        if method == "GET" and path == "/v2/models/stats":
            return self._json(200, gw.model_statistics())
        if method == "POST" and path == "/v2/repository/index":
            return self._json(200, gw.repository_index())
        if (s := _SHM.match(path)) is not None:
            if s["kind"] == "cuda":
                return self._cuda_shared_memory(method, s["action"])
            return self._shared_memory(method, unquote(s["name"] or ""), s["action"], body)
        m = _MODEL.match(path)
        if m is None:
            raise InferError(f"no endpoint {method} {path}", Status.NOT_FOUND)
        name, version, rest = m["name"], m["version"] or "", m["rest"] or ""
        if method == "GET" and rest == "":
            return self._json(200, gw.model_metadata(name, version))
        if method == "GET" and rest == "/ready":
            return self._send(200 if gw.model_ready(name, version) else 503, [], "text/plain")
        if method == "GET" and rest == "/config":
            return self._json(200, gw.model_config(name, version))
        if method == "GET" and rest == "/stats":
            return self._json(200, gw.model_statistics(name, version))
        if method == "POST" and rest == "/infer":
            return self._infer(name, version, body)
        raise InferError(f"no endpoint {method} {path}", Status.NOT_FOUND)

    def _shared_memory(self, method: str, name: str, action: str, body: memoryview) -> None:
        """The system shared memory extension: register, unregister (one or all), status."""
        shm = self.server.gateway.shm
        if action == "status" and method == "GET":
            return self._json(200, shm.status(name))
        if action == "unregister" and method == "POST":
            shm.unregister(name)
            return self._send(200, [], "application/json")
        if action == "register" and method == "POST" and name:
            try:
                request = json.loads(bytes(body) or b"{}")
            except (ValueError, UnicodeDecodeError) as exc:
                raise InferError(f"the register request is not valid JSON: {exc}") from None
            if not isinstance(request, dict):
                raise InferError("the register request must be a JSON object")
            shm.register(name, request.get("key"), request.get("offset", 0), request.get("byte_size"))
            return self._send(200, [], "application/json")
        raise InferError(f"no endpoint {method} {self.path}", Status.NOT_FOUND)

    def _cuda_shared_memory(self, method: str, action: str) -> None:
        """The CUDA shared memory endpoints of a gateway that holds no CUDA regions."""
        if action == "status" and method == "GET":
            return self._json(200, [])
        if action == "unregister" and method == "POST":
            return self._send(200, [], "application/json")
        if action == "register" and method == "POST":
            raise InferError("CUDA shared memory is not supported by this gateway; use system shared memory")
        raise InferError(f"no endpoint {method} {self.path}", Status.NOT_FOUND)

    def _infer(self, name: str, version: str, body: memoryview) -> None:
        started = time.perf_counter()
        gw = self.server.gateway
        gw.check_model(name, version)
        if self.headers.get("Content-Encoding", "identity").lower() != "identity":
            raise InferError(f"Content-Encoding {self.headers.get('Content-Encoding')!r} is not supported")
        request, binary = _split_body(body, self.headers.get("Inference-Header-Content-Length"))
        inputs, outputs, binary_all, request_id, output_shm = _parse_request(request, binary, gw.shm)
        result = gw.infer(
            name,
            version,
            inputs,
            [o for o, _ in outputs] or None,
            request_id=request_id,
            started=started,
            output_shm=output_shm,
        )
        binary_of = dict(outputs)
        self._respond(name, result, lambda o: binary_of.get(o, binary_all))

    def _respond(self, name: str, result: InferResult, is_binary: Any) -> None:
        header: dict[str, Any] = {"model_name": name, "model_version": "1"}
        if result.request_id:
            header["id"] = result.request_id
        outs, blobs = [], []
        for spec, arr in result.outputs:
            entry: dict[str, Any] = {"name": spec.name, "datatype": spec.datatype, "shape": list(arr.shape)}
            if spec.name in result.in_shm:
                # the data is in the client's shared memory: name, datatype and shape only (Triton's
                # C++ client reads any output "parameters" as binary data that follows the header)
                pass
            elif is_binary(spec.name):
                blob = memoryview(arr).cast("B") if arr.size else b""
                entry["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                entry["data"] = arr.reshape(-1).tolist()
            outs.append(entry)
        header["outputs"] = outs
        head = json.dumps(header, separators=(",", ":")).encode()
        if blobs:
            self._send(
                200,
                [head, *blobs],
                "application/octet-stream",
                {"Inference-Header-Content-Length": str(len(head))},
            )
        else:
            self._send(200, [head], "application/json")


def _split_body(body: bytes | memoryview, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """The request's JSON header and the binary data after it."""
    if header_length is None:
        n = len(body)
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise InferError(f"bad Inference-Header-Content-Length {header_length!r}") from None
        if not 0 <= n <= len(body):
            raise InferError(f"Inference-Header-Content-Length {n} does not fit a body of {len(body)} bytes")
    mv = memoryview(body)
    try:
        request = json.loads(bytes(mv[:n]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InferError(f"the inference request header is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise InferError("the inference request must be a JSON object")
    return request, mv[n:]


def _params(obj: dict[str, Any], what: str) -> dict[str, Any]:
    p = obj.get("parameters", {})
    if not isinstance(p, dict):
        raise InferError(f"{what}: 'parameters' must be an object")
    return p


def _parse_request(
    request: dict[str, Any], binary: memoryview, shm: SharedMemoryRegistry
) -> tuple[list[RawInput], list[tuple[str, bool]], bool, str, dict[str, Slice]]:
    """Inputs, requested outputs (name, binary?), the default for unnamed outputs, the request id, and the
    requested outputs to write to shared memory."""
    request_id = request.get("id", "")
    if not isinstance(request_id, str):
        raise InferError("'id' must be a string")
    binary_all = bool(_params(request, "request").get("binary_data_output", False))
    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InferError("the request must list its 'inputs'")
    inputs: list[RawInput] = []
    offset = 0
    for i, t in enumerate(raw_inputs):
        if not isinstance(t, dict):
            raise InferError(f"input {i} must be an object")
        name, datatype, shape = t.get("name"), t.get("datatype"), t.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise InferError(f"input {i} needs a string 'name' and 'datatype'")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape
        ):
            raise InferError(f"input '{name}': 'shape' must be a list of integers")
        params = _params(t, f"input '{name}'")
        size = params.get("binary_data_size")
        target = shm.slice(params, f"input '{name}'")
        if target is not None:
            inputs.append(RawInput(name, datatype, tuple(shape), data=target.readonly))
        elif size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
                raise InferError(
                    f"input '{name}': binary_data_size {size!r} does not fit the {len(binary) - offset} "
                    "bytes left in the request"
                )
            inputs.append(RawInput(name, datatype, tuple(shape), data=binary[offset : offset + size]))
            offset += size
        elif "data" in t:
            inputs.append(RawInput(name, datatype, tuple(shape), values=t["data"]))
        else:
            raise InferError(f"input '{name}' has neither 'data' nor binary_data_size")
    if offset != len(binary):
        raise InferError(f"{len(binary) - offset} bytes of binary data belong to no input")
    outputs: list[tuple[str, bool]] = []
    output_shm: dict[str, Slice] = {}
    raw_outputs = request.get("outputs", [])
    if not isinstance(raw_outputs, list):
        raise InferError("'outputs' must be a list")
    for i, o in enumerate(raw_outputs):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise InferError(f"output {i} needs a string 'name'")
        params = _params(o, f"output '{o['name']}'")
        outputs.append((o["name"], bool(params.get("binary_data", binary_all))))
        target = shm.slice(params, f"output '{o['name']}'")
        if target is not None:
            output_shm[o["name"]] = target
    return inputs, outputs, binary_all, request_id, output_shm
