"""KServe's system shared memory extension: tensors in ``/dev/shm`` regions that a client on this host
registers, so that megabytes of inputs and outputs skip the socket.

A client creates a POSIX shared memory object (``shm_open(key)``, the file ``/dev/shm/<key>``), registers
a region of it by name (key, offset, byte size), and then names the region, an offset into it and a byte
size in an input's or requested output's parameters (``shared_memory_region``, ``shared_memory_offset``,
``shared_memory_byte_size``) instead of sending data. The gateway maps the file once at registration
and reads inputs as numpy views of the mapping (no copy beyond what packing makes); outputs are written
there and the response carries only their metadata.

Keys are plain names (an optional leading ``/``, then letters, digits, ``.``, ``_``, ``-``): the gateway
only ever maps files directly under ``/dev/shm``, and only those a client names.

Unregistering a region drops it from the registry at once; a request still using it keeps the mapping
alive through its views (Python references), and the mapping closes when the last one goes.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import stat
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from producer.gateway.model import InferError, Status, TensorSpec

SHM_DIR = Path("/dev/shm")
_KEY = re.compile(r"/?(?P<file>[A-Za-z0-9_.-]{1,255})")
_MAX_NAME = 256


@dataclass(frozen=True)
class Region:
    """A registered region: ``byte_size`` bytes at ``offset`` of the file ``/dev/shm/<key>``.

    Attributes:
        name / key / offset / byte_size: as registered.
        data: a writable view of exactly the region's bytes (of a mapping of the file).
    """

    name: str
    key: str
    offset: int
    byte_size: int
    data: memoryview

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}


@dataclass(frozen=True)
class Slice:
    """The part of a region that one tensor occupies (from a tensor's ``shared_memory_*`` parameters).

    Attributes:
        region: the region. offset: into the region [bytes]. byte_size: the tensor's space [bytes].
        data: the slice's bytes, writable (where outputs go); taken when the slice is, so that it stays
            valid if the region is unregistered meanwhile.
    """

    region: Region
    offset: int
    byte_size: int
    data: memoryview

    @property
    def readonly(self) -> memoryview:
        """The slice's bytes for an input: nothing the gateway does may change the client's memory."""
        return self.data.toreadonly()

    def parameters(self) -> dict[str, Any]:
        """The tensor parameters that name this slice (echoed on outputs written there, as Triton does)."""
        out: dict[str, Any] = {
            "shared_memory_region": self.region.name,
            "shared_memory_byte_size": self.byte_size,
        }
        if self.offset:
            out["shared_memory_offset"] = self.offset
        return out


def _non_negative_int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InferError(f"{what} must be a non-negative integer, not {value!r}")
    return value


class SharedMemoryRegistry:
    """The registered system shared memory regions, by name; safe to use from any thread.

    Args:
        root: the directory shared memory keys name files in (``/dev/shm``; tests may use another).
    """

    def __init__(self, root: Path = SHM_DIR) -> None:
        self.root = root
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Map ``byte_size`` bytes at ``offset`` of ``/dev/shm/<key>`` as region ``name``.

        Raises:
            InferError: a bad or taken name, a key that is not a plain name or not an existing file,
                a region outside the file.
        """
        if not isinstance(name, str) or not name or len(name) > _MAX_NAME:
            raise InferError(f"a shared memory region needs a name of 1 to {_MAX_NAME} characters")
        if not isinstance(key, str) or (m := _KEY.fullmatch(key)) is None or m["file"] in (".", ".."):
            raise InferError(
                f"shared memory key {key!r} is not a plain name (letters, digits, '.', '_', '-', "
                "optionally after one '/')"
            )
        offset = _non_negative_int(offset, f"region '{name}': offset")
        byte_size = _non_negative_int(byte_size, f"region '{name}': byte_size")
        with self._lock:
            if name in self._regions:
                raise InferError(
                    f"shared memory region '{name}' is already registered", Status.ALREADY_EXISTS
                )
            data = self._map(name, key, self.root / m["file"], offset, byte_size)
            self._regions[name] = Region(name, key, offset, byte_size, data)

    def _map(self, name: str, key: str, path: Path, offset: int, byte_size: int) -> memoryview:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as exc:
            raise InferError(
                f"region '{name}': cannot open shared memory key '{key}' ({exc.strerror})"
            ) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InferError(f"region '{name}': shared memory key '{key}' is not a regular file")
            size = info.st_size
            if offset + byte_size > size:
                raise InferError(
                    f"region '{name}': offset {offset} + byte_size {byte_size} exceed the {size} bytes of "
                    f"shared memory key '{key}'"
                )
            if byte_size == 0:
                return memoryview(bytearray())
            # mmap offsets must be page-aligned: map from the start, view from the offset
            mapping = mmap.mmap(fd, offset + byte_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise InferError(f"region '{name}': cannot map shared memory key '{key}' ({exc})") from None
        finally:
            os.close(fd)
        return memoryview(mapping)[offset : offset + byte_size]

    def unregister(self, name: str = "") -> None:
        """Drop region ``name``, or every region when ``name`` is empty.

        Raises:
            InferError: NOT_FOUND for a name that is not registered.
        """
        with self._lock:
            if not name:
                regions = list(self._regions.values())
                self._regions.clear()
            elif (region := self._regions.pop(name, None)) is None:
                raise InferError(f"no shared memory region '{name}' is registered", Status.NOT_FOUND)
            else:
                regions = [region]
        for region in regions:
            _release(region)

    def status(self, name: str = "") -> list[dict[str, Any]]:
        """The registered regions (only ``name`` when given).

        Raises:
            InferError: NOT_FOUND for a name that is not registered.
        """
        with self._lock:
            if not name:
                return [r.status() for r in self._regions.values()]
            region = self._regions.get(name)
        if region is None:
            raise InferError(f"no shared memory region '{name}' is registered", Status.NOT_FOUND)
        return [region.status()]

    def slice(self, parameters: Mapping[str, Any], what: str) -> Slice | None:
        """The shared memory a tensor's parameters place it in; None when they name no region.

        Args:
            parameters: the tensor's parameters (plain Python values).
            what: the tensor, for messages (``"input 'VALUE'"``).

        Raises:
            InferError: an unknown region, a bad offset or byte size, a slice outside the region.
        """
        name = parameters.get("shared_memory_region")
        if name is None:
            return None
        if not isinstance(name, str):
            raise InferError(f"{what}: shared_memory_region must be a string")
        if "shared_memory_byte_size" not in parameters:
            raise InferError(f"{what}: shared_memory_byte_size must be given with shared_memory_region")
        byte_size = _non_negative_int(
            parameters["shared_memory_byte_size"], f"{what}: shared_memory_byte_size"
        )
        offset = _non_negative_int(parameters.get("shared_memory_offset", 0), f"{what}: shared_memory_offset")
        with self._lock:  # the view is taken before an unregister can release the region's own
            region = self._regions.get(name)
            if region is None:
                raise InferError(f"{what}: no shared memory region '{name}' is registered")
            if offset + byte_size > region.byte_size:
                raise InferError(
                    f"{what}: shared_memory_offset {offset} + shared_memory_byte_size {byte_size} exceed "
                    f"the {region.byte_size} bytes of region '{name}'"
                )
            return Slice(region, offset, byte_size, region.data[offset : offset + byte_size])


def _release(region: Region) -> None:
    """Close the region's mapping unless a request still holds a view of it (then the last view does)."""
    obj = region.data.obj
    with contextlib.suppress(BufferError):
        region.data.release()
        if isinstance(obj, mmap.mmap):
            obj.close()


def write_outputs(outputs: Sequence[tuple[TensorSpec, np.ndarray]], targets: Mapping[str, Slice]) -> None:
    """Copy the outputs that ``targets`` name into their shared memory.

    Every size is checked before anything is written, so a request that fails leaves the regions as
    they were.

    Raises:
        InferError: a target smaller than its output (naming the output, the bytes needed and given).
    """
    chosen = [(spec, arr, targets[spec.name]) for spec, arr in outputs if spec.name in targets]
    for spec, arr, target in chosen:
        if arr.nbytes > target.byte_size:
            raise InferError(
                f"output '{spec.name}' needs {arr.nbytes} bytes but its shared memory (region "
                f"'{target.region.name}', shared_memory_byte_size) holds only {target.byte_size}"
            )
    for _, arr, target in chosen:
        if arr.nbytes:
            target.data[: arr.nbytes] = memoryview(arr).cast("B")
