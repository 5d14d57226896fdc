"""A one-line progress report on stderr for long jobs (quiet when stderr is not a terminal, except
for a final line), with a rate and an estimate of the time left."""

from __future__ import annotations

import sys
import time


class Progress:
    """Count steps of a job and redraw ``label: i/n, rate, eta`` at most every ``interval_s`` seconds."""

    def __init__(self, label: str, total: int | None, interval_s: float = 0.5, stream=None) -> None:
        self.label, self.total, self.interval_s = label, total, interval_s
        self.stream = stream if stream is not None else sys.stderr
        self.count = 0
        self.start = self._last = time.monotonic()
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()

    def _line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        text = f"{self.label}: {self.count}" + (f"/{self.total}" if self.total else "") + f"  {rate:.2f}/s"
        if self.total and rate > 0 and self.count < self.total:
            text += f"  eta {(self.total - self.count) / rate:.0f}s"
        return text + f"  {elapsed:.1f}s"

    def step(self, n: int = 1, note: str = "") -> None:
        self.count += n
        now = time.monotonic()
        if self.live and now - self._last >= self.interval_s:
            self._last = now
            self.stream.write("\r" + self._line() + (f"  {note}" if note else "") + "\033[K")
            self.stream.flush()

    def done(self) -> None:
        if self.live:
            self.stream.write("\r\033[K")
        if self.count > 1 or self.live:
            self.stream.write(self._line() + "\n")
            self.stream.flush()
