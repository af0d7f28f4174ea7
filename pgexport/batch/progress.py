"""A one-line progress bar for a batch job: done / total, images/s, ETA (on a terminal only).

    >>> bar = ProgressBar(total=300, stream=None)   # stream=None: silent
    >>> bar.update(16)
    >>> bar.done
    16
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """Redraws one line on `stream` (default: stderr when it is a terminal) at most 10 times a second."""

    def __init__(self, total: int, stream: TextIO | None | bool = True, label: str = "images"):
        if stream is True:
            stream = sys.stderr if sys.stderr.isatty() else None
        self.total, self.stream, self.label = total, stream or None, label
        self.done, self.errors = 0, 0
        self.start = self._drawn = time.perf_counter()

    def update(self, n: int, errors: int = 0) -> None:
        self.done += n
        self.errors += errors
        now = time.perf_counter()
        if self.stream is not None and now - self._drawn >= 0.1 and self.done < self.total:  # close() draws the end
            self._drawn = now
            self.stream.write("\r" + self.line(now))
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.perf_counter()) - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else None
        width = 24
        filled = int(width * self.done / self.total) if self.total else width
        errors = f", {self.errors} errors" if self.errors else ""
        return (f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {self.label}{errors}  "
                f"{rate:.1f} {self.label}/s  ETA {_clock(eta)}  ")

    def close(self) -> None:
        if self.stream is not None:
            self.stream.write("\r" + self.line() + "\n")
            self.stream.flush()


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"
