"""The compute side of a worker: device, CUDA stream and warm reconstruction chain, on one thread.

:class:`Engine` is traccc's ``initialize()`` plus the per-event work: it selects the device, makes one
non-blocking CUDA stream current for its thread, loads the detector once and moves it to the device
(inside :class:`~kernels.pipeline.Chain`), warms the chain up (with CuPy on real events, so that the kernels
are compiled for realistic shapes before the first request), and then turns batches of
leased events into :class:`~broker.protocol.WorkResult` / :class:`~broker.protocol.WorkFailed` messages.
It only uses ``Chain.reconstruct_batch`` / ``Chain.reconstruct`` and the packed formats.

:class:`ComputeThread` runs the engine: it takes batches from the :class:`~worker.inbox.Inbox` and sends
results to the I/O thread over an ``inproc`` PAIR socket, so tracks buffers reach the broker socket
without a copy. CuPy's current device and stream are per thread, so the engine is created on this thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import msgpack
import numpy as np
import zmq

from broker.protocol import ErrorCode, WorkerMessage, WorkFailed, WorkResult, encode, frame_bytes
from kernels.edm.cells import Cells, merge_duplicate_cells
from kernels.edm.packed import unpack_event
from kernels.edm.packed_tracks import pack_tracks
from kernels.edm.tracks import Tracks
from kernels.errors import DetectorMismatchError, EventFormatError
from kernels.pipeline import Chain, ChainConfig
from kernels.xp import get_namespace, pool_limit_lifted, set_pool_limit
from worker.config import WorkerConfig
from worker.inbox import Inbox, JobItem
from worker.observer import WorkerObservers

log = logging.getLogger(__name__)

#: Internal messages on the compute -> I/O PAIR socket (first frame).
STARTED = b"S"  # + msgpack list of job ids now being computed
DONE = b"D"  # + msgpack job id, then the frames of one protocol message to forward to the broker


def select_device(xp: ModuleType, device: int) -> Any:
    """Make ``device`` current for this thread and a non-blocking stream current on it (CuPy only).

    Returns:
        The stream (None for numpy).

    Raises:
        RuntimeError: the device ordinal is not visible.
    """
    if xp.__name__.split(".")[0] != "cupy":
        return None
    n = xp.cuda.runtime.getDeviceCount()
    if device >= n:
        raise RuntimeError(
            f"CUDA device {device} is not visible ({n} visible; check CUDA_VISIBLE_DEVICES and --device)"
        )
    xp.cuda.Device(device).use()
    stream = xp.cuda.Stream(non_blocking=True)
    stream.use()  # one stream per worker process: every kernel of this thread runs on it
    return stream


def dummy_event(detector: Any, n_modules: int = 16) -> Cells:
    """A small synthetic event on modules spread over the detector, for warming up the chain."""
    m = int(detector.n_modules)
    idx = np.unique(np.linspace(0, max(m - 1, 0), min(n_modules, m)).astype(np.int64))
    bins = np.asarray(detector.seg_bins)[idx]
    g = np.repeat(np.asarray(detector.geometry_id)[idx], 4)
    c0 = np.repeat(np.minimum(bins[:, 0] // 2, np.maximum(bins[:, 0] - 2, 0)), 4) + np.tile(
        [0, 1, 0, 1], idx.size
    )
    c1 = np.repeat(np.minimum(bins[:, 1] // 2, np.maximum(bins[:, 1] - 2, 0)), 4) + np.tile(
        [0, 0, 1, 1], idx.size
    )
    c0 = np.minimum(c0, np.repeat(np.maximum(bins[:, 0] - 1, 0), 4))
    c1 = np.minimum(c1, np.repeat(np.maximum(bins[:, 1] - 1, 0), 4))
    n = g.size
    cells = Cells(
        geometry_id=g.astype(np.uint64),
        channel0=c0.astype(np.int32),
        channel1=c1.astype(np.int32),
        activation=np.full(n, 0.5, np.float32),
        time=np.zeros(n, np.float32),
        event_id=0,
    )
    return merge_duplicate_cells(cells)[0]


def _stage_key(name: str) -> str:
    return "chain_s" if name == "total" else name if name.endswith("_s") else f"{name}_s"


class Engine:
    """Warm chain plus per-batch work. Create and use it on one thread only.

    Args:
        config: worker configuration.
        clock: monotonic time source [s].
        load_detector: detector loader (injectable for tests); default :func:`producer.io.detector.load_detector`.
    """

    def __init__(
        self,
        config: WorkerConfig,
        clock: Callable[[], float] = time.monotonic,
        load_detector: Callable[[Any], Any] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self._load_detector = load_detector
        self.xp: ModuleType | None = None
        self.chain: Chain | None = None
        self.stream: Any = None
        self.preloaded: Cells | None = None
        self.info: dict[str, Any] = {}
        self.over_pool_limit = 0  # batches that ran without the GPU pool's limit
        self.pool_limit_bytes = config.gpu_pool_limit_mb * 2**20  # raised by batches that need more

    def initialize(self) -> dict[str, Any]:
        """Select the device, load the detector, build and warm up the chain.

        Returns:
            A description for READY (backend, device, fingerprint, init and warm-up times).

        Raises:
            RuntimeError, InputError, ...: the worker cannot serve; the process should exit.
        """
        cfg = self.config
        t0 = self.clock()
        xp = get_namespace(cfg.backend)
        self.stream = select_device(xp, cfg.device)
        set_pool_limit(xp, self.pool_limit_bytes)
        loader = self._load_detector
        if loader is None:
            from producer.io.detector import load_detector

            loader = load_detector
        detector = loader(cfg.detector)
        self.xp = xp
        self.chain = Chain(xp, detector, ChainConfig())
        t_init = self.clock() - t0
        if cfg.preload is not None:
            from producer.io.events import discover, load_cells

            source = discover(cfg.preload)[0]
            self.preloaded = load_cells(source, detector).to(xp)
            log.info(
                "preload mode: event %d (%d cells) stays on the device", source.event_id, self.preloaded.size
            )
        t1 = self.clock()
        warm = self._warmup_events(detector)
        try:  # as batches are served: a warm-up batch past the GPU pool's limit raises the limit
            for c in warm:
                self._within_memory([c])
            if warm and cfg.batch_max > 1:
                self._within_memory((warm * cfg.batch_max)[: cfg.batch_max])
        except Exception:
            # warm-up only saves time on the first event; a chain that fails here will fail per event
            log.exception("warm-up failed; serving anyway")
        t_warm = self.clock() - t1
        self.info = {
            "backend": cfg.backend,
            "device": cfg.device if cfg.backend == "cupy" else None,
            "fingerprint": self.chain.fingerprint,
            "batch_max": cfg.batch_max,
            "batch_wait_us": cfg.batch_wait_us,
            "gpu_pool_limit_mb": cfg.gpu_pool_limit_mb if cfg.backend == "cupy" else None,
            "preload": self.preloaded is not None,
            "init_s": round(t_init, 4),
            "warmup_s": round(t_warm, 4),
        }
        log.info(
            "chain ready on %s%s in %.2f s (warm-up %.2f s), detector %s",
            cfg.backend,
            f":{cfg.device}" if cfg.backend == "cupy" else "",
            t_init,
            t_warm,
            self.chain.fingerprint,
        )
        return self.info

    def _warmup_events(self, detector: Any) -> list[Cells]:
        """Events to warm the chain up with, on the device (see :attr:`WorkerConfig.warmup`)."""
        cfg, xp = self.config, self.xp
        if cfg.warmup == "none" or xp is None:
            return []
        if self.preloaded is not None:
            return [self.preloaded]
        source: Path | None = None
        if cfg.warmup not in ("auto", "synthetic"):
            source = Path(cfg.warmup)
        elif cfg.warmup == "auto" and cfg.backend == "cupy":
            source = Path(cfg.detector)  # a data directory usually holds events next to the detector
        if source is not None:
            from producer.io.events import discover, load_cells

            try:
                events = [load_cells(s, detector).to(xp) for s in discover(source)[: cfg.warmup_events]]
                log.info("warming up on %d event(s) from %s", len(events), source)
                return events
            except Exception as exc:  # InputError, unreadable files: fall back to a synthetic event
                log.info("no warm-up events in %s (%s); using a synthetic event", source, exc)
        return [dummy_event(detector).to(xp)]

    def _decode(self, item: JobItem) -> Cells:
        if self.chain is None or self.xp is None:
            raise RuntimeError("engine is not initialized")
        if not item.payload:
            raise EventFormatError("job carries no event frames")
        ev = unpack_event(frame_bytes(item.payload[0]), item.payload[1:])
        if ev.detector and ev.detector != self.chain.fingerprint:
            raise DetectorMismatchError(
                f"event {ev.event_id} was packed for detector {ev.detector}; this worker serves "
                f"{self.chain.fingerprint}"
            )
        if self.preloaded is not None:
            return replace(self.preloaded, event_id=ev.event_id)
        return ev.to_cells(self.xp)

    def _reconstruct(self, cells: list[Cells]) -> list[tuple[Tracks, dict[str, float]] | Exception]:
        if self.chain is None or self.xp is None:
            raise RuntimeError("engine is not initialized")
        try:
            return self._within_memory(cells)
        except Exception as exc:
            if len(cells) == 1:
                return [exc]
        # isolate the event that breaks the batch: the others still get their tracks
        out: list[tuple[Tracks, dict[str, float]] | Exception] = []
        for c in cells:
            try:
                out.append(self._within_memory([c])[0])
            except Exception as exc:
                out.append(exc)
        return out

    def _within_memory(self, cells: list[Cells]) -> list[tuple[Tracks, dict[str, float]]]:
        """The chain on a batch; one that needs more device memory than the pool's limit runs again
        without it, and the limit rises to what that batch held (the limit bounds what the pool caches,
        never which events are served)."""
        assert self.chain is not None and self.xp is not None
        try:
            return list(self.chain.reconstruct_batch(cells))
        except MemoryError:
            if self.config.gpu_pool_limit_mb == 0 or self.config.backend != "cupy":
                raise  # a real shortage: no limit of ours to lift
        self.over_pool_limit += 1
        with pool_limit_lifted(self.xp) as lifted:
            result = list(self.chain.reconstruct_batch(cells))
        # batches like this one should not run twice: the limit rises to what it held, plus a tenth
        old = self.pool_limit_bytes
        needed = lifted["high_water"] * 11 // 10
        self.pool_limit_bytes = max(old, (needed + 2**20 - 1) // 2**20 * 2**20)  # whole MiB
        set_pool_limit(self.xp, self.pool_limit_bytes)
        log.info(
            "a batch of %d events needed more than the %d MiB GPU pool limit (%d batches so far): ran it "
            "without the limit, which now is %d MiB",
            len(cells),
            old // 2**20,
            self.over_pool_limit,
            self.pool_limit_bytes // 2**20,
        )
        return result

    def process(self, items: Sequence[JobItem]) -> list[WorkerMessage]:
        """Reconstruct a batch; one RESULT or FAILED message per item, in order."""
        t_take = self.clock()
        out: list[WorkerMessage | None] = [None] * len(items)
        good: list[int] = []
        cells: list[Cells] = []
        decode_s: dict[int, float] = {}
        for i, it in enumerate(items):
            t = self.clock()
            try:
                cells.append(self._decode(it))
                good.append(i)
            except DetectorMismatchError as exc:
                out[i] = WorkFailed(it.job, it.epoch, ErrorCode.DETECTOR_MISMATCH, str(exc))
            except (EventFormatError, ValueError, TypeError) as exc:
                out[i] = WorkFailed(it.job, it.epoch, ErrorCode.BAD_EVENT, f"cannot unpack the event: {exc}")
            decode_s[i] = self.clock() - t
        results = self._reconstruct(cells) if cells else []
        if self.config.simulate_compute_ms > 0:
            time.sleep(self.config.simulate_compute_ms * 1e-3 * len(cells))
        for i, res in zip(good, results, strict=True):
            it = items[i]
            if isinstance(res, DetectorMismatchError | EventFormatError):  # the chain refused the cells
                code = (
                    ErrorCode.DETECTOR_MISMATCH
                    if isinstance(res, DetectorMismatchError)
                    else ErrorCode.BAD_EVENT
                )
                out[i] = WorkFailed(it.job, it.epoch, code, str(res))
                continue
            if isinstance(res, Exception):
                log.warning("reconstruction of job %d failed: %r", it.job, res)
                out[i] = WorkFailed(
                    it.job, it.epoch, ErrorCode.RECONSTRUCTION_FAILED, f"{type(res).__name__}: {res}"
                )
                continue
            tracks, stage_times = res
            t = self.clock()
            header, buffers = pack_tracks(tracks)
            t_pack = self.clock() - t
            timings = {
                "worker_queue_s": max(0.0, t_take - it.received_at),
                "decode_s": decode_s[i],
                **{_stage_key(k): float(v) for k, v in stage_times.items()},
                "pack_s": t_pack,
                "worker_s": self.clock() - t_take,
            }
            out[i] = WorkResult(it.job, it.epoch, timings, payload=(header, *buffers))
        return [m for m in out if m is not None]


class ComputeThread(threading.Thread):
    """Runs an :class:`Engine` over batches from the inbox.

    Args:
        engine: the (not yet initialized) engine.
        inbox: where the I/O thread puts leased events.
        context: ZeroMQ context shared with the I/O thread.
        outbox_endpoint: the I/O thread's inproc PAIR endpoint.
        observers: worker hooks.
    """

    def __init__(
        self,
        engine: Engine,
        inbox: Inbox,
        context: zmq.Context[zmq.Socket[bytes]],
        outbox_endpoint: str,
        observers: WorkerObservers,
    ) -> None:
        super().__init__(name="compute", daemon=True)
        self.engine = engine
        self.inbox = inbox
        self.context = context
        self.outbox_endpoint = outbox_endpoint
        self.observers = observers
        self.initialized = threading.Event()
        self.init_error: BaseException | None = None
        self.computing = threading.Event()

    def run(self) -> None:
        try:
            self.engine.initialize()
        except BaseException as exc:
            self.init_error = exc
            self.initialized.set()
            return
        self.initialized.set()
        cfg = self.engine.config
        out = self.context.socket(zmq.PAIR)
        out.setsockopt(zmq.LINGER, 2000)
        out.connect(self.outbox_endpoint)
        try:
            while True:
                batch = self.inbox.get_batch(cfg.batch_max, cfg.batch_wait_us * 1e-6, timeout_s=0.2)
                if not batch:
                    if self.inbox.closed:
                        return
                    continue
                self.computing.set()
                try:
                    self._run_batch(out, batch)
                finally:
                    self.computing.clear()
        finally:
            out.close()

    def _run_batch(self, out: zmq.Socket[bytes], batch: list[JobItem]) -> None:
        out.send_multipart([STARTED, msgpack.packb([it.job for it in batch])])
        if self.observers:
            self.observers.emit(
                "on_batch", len(batch), self.engine.clock() - min(it.received_at for it in batch)
            )
        over_limit = self.engine.over_pool_limit
        try:
            messages = self.engine.process(batch)
        except Exception as exc:  # a bug outside the per-event guards: fail the batch, keep serving
            log.exception("batch of %d events failed", len(batch))
            messages = [WorkFailed(it.job, it.epoch, ErrorCode.INTERNAL, repr(exc)) for it in batch]
        if self.observers and self.engine.over_pool_limit > over_limit:
            self.observers.emit("on_gpu_pool_over_limit", len(batch))
        for m in messages:
            job = m.job if isinstance(m, WorkResult | WorkFailed) else -1
            out.send_multipart([DONE, msgpack.packb(job), *encode(m)], copy=False)
            if self.observers:
                if isinstance(m, WorkResult):
                    self.observers.emit("on_job_done", job, m.timings)
                elif isinstance(m, WorkFailed):
                    self.observers.emit("on_job_failed", job, m.code)
