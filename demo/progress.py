"""A one-line progress bar on a terminal; plain periodic lines when output is a file or a pipe."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str, *, width: int = 30) -> None:
        self.total = total
        self.label = label
        self.width = width
        self.done = 0
        self.failed = 0
        self._tty = sys.stdout.isatty()
        self._started = time.monotonic()
        self._last_print = 0.0

    def advance(self, *, ok: bool = True) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        now = time.monotonic()
        if self.done == self.total or now - self._last_print > (0.1 if self._tty else 2.0):
            self._last_print = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        filled = int(self.width * self.done / max(1, self.total))
        rate = self.done / max(1e-9, now - self._started)
        line = (
            f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] "
            f"{self.done}/{self.total} ({rate:.0f}/s, {self.failed} failed)"
        )
        if self._tty:
            end = "\n" if self.done == self.total else ""
            print(f"\r{line}", end=end, flush=True)
        else:
            print(line, flush=True)
