"""``python bench/cprofile_consumer.py ARGS``: ``python -m consumer ARGS``, its main thread under
cProfile while a window is open. ``python -m bench --profile cprofile`` starts the consumer so.

SIGUSR1 opens the window; SIGUSR2 closes it and writes the stats to ``$BENCH_CPROFILE_OUT``
(under another name first, so that whoever waits for that path never reads half a file).

Run by path with the consumer's tree as the working directory: that tree (a ``--variant``'s
copy) need not contain this file, and the consumer is imported from it as ``-m`` would.
"""

from __future__ import annotations

import cProfile
import os
import runpy
import signal
import sys
from types import FrameType


def _main() -> None:
    out = os.environ["BENCH_CPROFILE_OUT"]
    # A script's own directory is sys.path[0]; -m puts the working directory there instead.
    # Pool workers inherit sys.path, so they import the same tree.
    sys.path[0] = os.getcwd()
    profiler = cProfile.Profile()

    def open_window(signum: int, frame: FrameType | None) -> None:
        profiler.enable()

    def close_window(signum: int, frame: FrameType | None) -> None:
        profiler.disable()
        profiler.dump_stats(out + ".partial")
        os.replace(out + ".partial", out)

    signal.signal(signal.SIGUSR1, open_window)
    signal.signal(signal.SIGUSR2, close_window)
    sys.argv = ["consumer", *sys.argv[1:]]
    runpy.run_module("consumer", run_name="__main__", alter_sys=True)


if __name__ == "__main__":  # not when a spawned worker imports the parent's main module
    _main()
