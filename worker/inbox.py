"""The queue between the worker's I/O thread and its compute thread, with Triton-style dynamic batching."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class JobItem:
    """One leased event, as the I/O thread hands it to the compute thread.

    Attributes:
        job: broker job id. epoch: broker instance. attempt: dispatch number.
        payload: the packed event frames (``zmq.Frame`` objects, not copied).
        received_at: when the I/O thread received it [s, monotonic].
    """

    job: int
    epoch: str
    attempt: int
    payload: tuple[Any, ...]
    received_at: float


class Inbox:
    """Thread-safe FIFO of :class:`JobItem` with batch retrieval.

    Args:
        clock: monotonic time source [s].
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._cv = threading.Condition()
        self._items: deque[JobItem] = deque()
        self._closed = False
        self._clock = clock

    def __len__(self) -> int:
        with self._cv:
            return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: JobItem) -> None:
        """Append an item (ignored once closed: the caller hands it back to the broker instead)."""
        with self._cv:
            self._items.append(item)
            self._cv.notify()

    def get_batch(self, max_items: int, wait_s: float, timeout_s: float) -> list[JobItem]:
        """Take up to ``max_items``: wait at most ``timeout_s`` for the first, then at most ``wait_s`` more
        for the batch to fill (Triton's max queue delay). Returns [] on timeout or when closed and empty.
        """
        with self._cv:
            deadline = self._clock() + timeout_s
            while not self._items and not self._closed:
                left = deadline - self._clock()
                if left <= 0:
                    return []
                self._cv.wait(left)
            if not self._items:
                return []
            if wait_s > 0 and len(self._items) < max_items and not self._closed:
                fill_deadline = self._clock() + wait_s
                while len(self._items) < max_items and not self._closed:
                    left = fill_deadline - self._clock()
                    if left <= 0:
                        break
                    self._cv.wait(left)
            n = min(max_items, len(self._items))
            return [self._items.popleft() for _ in range(n)]

    def drain(self) -> list[JobItem]:
        """Remove and return everything queued (unstarted events to hand back or drop)."""
        with self._cv:
            items = list(self._items)
            self._items.clear()
            return items

    def close(self) -> None:
        """Wake the consumer; :meth:`get_batch` returns [] once the queue is empty."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
