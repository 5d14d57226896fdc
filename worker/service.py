"""One worker process: a compute thread with a warm chain and an I/O thread that talks to the broker.

Start-up order follows traccc's ``initialize()`` then serve: the compute thread selects the device, loads
the detector, builds and warms up the chain; only then does the I/O thread connect and announce READY,
so the broker never leases an event to a cold worker.

Shutdown order (pattern 14) is driven by the I/O thread (see :mod:`worker.io_thread`); the service only
waits for both threads and reports an exit status.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from broker.protocol import VERSION
from worker.compute import ComputeThread, Engine
from worker.config import WorkerConfig
from worker.inbox import Inbox
from worker.io_thread import IOThread
from worker.observer import WorkerObservers

log = logging.getLogger(__name__)


class WorkerService:
    """Assemble and run one worker.

    Args:
        config: worker configuration.
        observers: lifecycle hooks (metrics exporters subscribe here).
        engine: the compute engine (a default :class:`~worker.compute.Engine` when None; tests inject one).
        clock: monotonic time source [s].
    """

    def __init__(
        self,
        config: WorkerConfig,
        observers: WorkerObservers | None = None,
        engine: Engine | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.observers = observers if observers is not None else WorkerObservers()
        self.clock = clock
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.inbox = Inbox(clock)
        self.engine = engine if engine is not None else Engine(config, clock)
        self.io: IOThread | None = None
        self.compute: ComputeThread | None = None
        self._stop_requested = threading.Event()

    def start(self, init_timeout_s: float = 600.0) -> None:
        """Initialize the compute side, then connect to the broker.

        Raises:
            RuntimeError: initialization failed or took longer than ``init_timeout_s`` (the cause is chained).
        """
        io_info: dict[str, Any] = {}
        # the I/O thread binds the outbox first so that the compute thread can connect to it
        self.io = IOThread(
            self.config,
            self.context,
            self.inbox,
            computing=threading.Event(),
            compute_alive=lambda: self.compute is not None and self.compute.is_alive(),
            info=io_info,
            observers=self.observers,
            clock=self.clock,
        )
        self.compute = ComputeThread(
            self.engine, self.inbox, self.context, self.io.outbox_endpoint, self.observers
        )
        self.io.computing = self.compute.computing
        t0 = self.clock()
        self.compute.start()
        if not self.compute.initialized.wait(init_timeout_s):
            raise RuntimeError(f"worker initialization took longer than {init_timeout_s} s")
        if self.compute.init_error is not None:
            raise RuntimeError(
                f"worker initialization failed: {self.compute.init_error}"
            ) from self.compute.init_error
        io_info.update(
            {
                "name": self.config.name,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "protocol": VERSION,
                "capacity": self.config.effective_capacity,
                **self.engine.info,
            }
        )
        log.info("worker %s initialized in %.2f s", self.config.name, self.clock() - t0)
        if self._stop_requested.is_set():
            return
        self.io.start()

    def stop(self) -> None:
        """Begin the graceful shutdown (thread-safe; safe from a signal handler)."""
        self._stop_requested.set()
        if self.io is not None:
            self.io.request_stop()

    def wait(self, poll_s: float = 0.2) -> bool:
        """Block until the worker has left the broker.

        Returns:
            True when both threads ended cleanly, False when the compute thread is still busy (stuck).
        """
        if self.io is not None and self.io.is_alive():
            while self.io.is_alive():
                self.io.join(poll_s)
        elif self.io is not None and self.io.ident is None:
            # stopped during initialization: the I/O thread never ran, so its outbox socket (bound in its
            # constructor) is still open and would keep context.term() waiting forever
            self.io.outbox.close(linger=0)
        self.inbox.close()
        if self.compute is not None:
            self.compute.join(self.config.shutdown_timeout_s + 1.0)
            if self.compute.is_alive():
                log.error("compute thread still busy after shutdown; abandoning it")
                return False
        return True

    def close(self) -> None:
        """Release the ZeroMQ context (only after :meth:`wait` returned True)."""
        self.context.term()
