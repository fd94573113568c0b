"""Where the consumer's own process spends its CPU: ``python -m bench --profile`` (``make profile``).

    .venv/bin/python -m bench --profile --sizes 32 --skip quickfix,celery
    .venv/bin/python -m bench --profile --sizes 32 --skip quickfix,celery --variant before@/tmp/old

In every pre-filled run, over the window the CPU split covers (first answer to last), the
consumer's main process is profiled: its event loop and its threads, not the pool workers, whose
CPU is the SVDs themselves. Each (size, variant) leaves, in ``<report>-profile/`` beside the JSON
report:

- with py-spy (``py-spy record --pid``; the default wherever it can attach): ``SIZE-VARIANT.txt``,
  the top-N functions by own samples (the function was the innermost Python frame) with their
  inclusive share; ``SIZE-VARIANT.collapsed``, the stacks in the collapsed format that
  flamegraph.pl and speedscope read; ``SIZE-VARIANT.svg``, a flame graph of them. Samples of
  idle threads are dropped: a sample is a thread running or ready to run (waiting for a CPU
  counts, so on a busy machine the samples exceed the CPU the split measured). Time in C (the
  garbage collector, orjson, numpy) counts as the calling Python function's own, unless
  ``--profile-native`` adds the C frames (dearer per sample).
- with cProfile (``--profile cprofile``, or where py-spy is missing or ptrace is refused): the
  consumer is started through ``bench/cprofile_consumer.py``, profiling switched on and off by
  signals over the same window; ``SIZE-VARIANT.pstats`` and the same ``.txt`` table, by
  ``tottime``. cProfile sees only the main thread and slows every Python call it times, so its
  shares lean toward call-heavy code; its clock is wall time, so the event loop's wait in epoll
  is taken out of the total and reported on its own.

With ``--profile-workers`` (py-spy only), py-spy follows the consumer's subprocesses too and
keeps idle samples: the table is then of the pool workers' wall time (``SIZE-VARIANT.txt``), where
a worker's time goes between its SVDs: reading and writing stored payloads (obstore's calls block
the worker's thread), sha256, decoding and encoding, waiting for the next job. The consumer's own
samples are in the same ``.collapsed`` file and flame graph, and in the notes, by share.

The profiler costs the consumer some CPU too: a profiled run's rates are a little below an
unprofiled one's.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench.procs import REPO, Children, spawn, stop

KINDS = ("auto", "py-spy", "cprofile")
#: Samples per second per thread. py-spy pauses the process for each one, so more costs more.
PY_SPY_RATE = 200
CPROFILE_WRAPPER = REPO / "bench" / "cprofile_consumer.py"
#: cProfile's clock runs while the event loop sleeps in these: waiting, not CPU.
_WAITS = re.compile(r"method '(poll|select)' of 'select\.\w+' objects")


@dataclass
class Row:
    """One function: own = time with it innermost, total = time with it anywhere on the stack."""

    function: str
    own: float
    total: float
    calls: int | None = None

    def as_json(self, whole: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "function": self.function,
            "own_pct": round(100 * self.own / whole, 2) if whole else 0.0,
            "total_pct": round(100 * self.total / whole, 2) if whole else 0.0,
        }
        if self.calls is not None:
            out["calls"] = self.calls
        return out


@dataclass
class Profile:
    """A finished profile: the rows by own time, what 100 % is, and where the files went."""

    tool: str
    whole: float  # samples (py-spy) or seconds (cProfile) that the percentages are of
    rows: list[Row]
    seconds: float
    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    top: int = 25
    subject: str = "consumer process"  # or "pool workers" (--profile-workers)

    def table(self, title: str) -> str:
        unit = "samples" if self.tool == "py-spy" else "s"
        lines = [f"{title}: {self.tool}, {self.whole:,.4g} {unit} over {self.seconds:.1f} s"]
        lines += [f"  {note}" for note in self.notes]
        calls = any(row.calls is not None for row in self.rows)
        lines.append(
            f"{'own %':>7} {'total %':>8} " + (f"{'calls':>9} " if calls else "") + "function"
        )
        for row in self.rows[: self.top]:
            own = 100 * row.own / self.whole if self.whole else 0.0
            total = 100 * row.total / self.whole if self.whole else 0.0
            count = f"{row.calls:>9,} " if calls and row.calls is not None else ""
            lines.append(f"{own:7.1f} {total:8.1f} {count}{row.function}")
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        return {
            "tool": self.tool,
            "whole": self.whole,
            "seconds": self.seconds,
            "files": self.files,
            "notes": self.notes,
            "subject": self.subject,
            "top": [row.as_json(self.whole) for row in self.rows[: self.top]],
        }


class ConsumerProfiler(Protocol):
    """How the consumer is started, and the window: ``start`` at the first answer, ``stop`` at
    the last. ``close`` ends whatever is still running, on any path."""

    def command(self, argv: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]: ...
    def start(self, pid: int) -> None: ...
    def stop(self) -> Profile: ...
    def close(self) -> None: ...


# --- py-spy ------------------------------------------------------------------------------------


def py_spy() -> str | None:
    """The venv's py-spy first: ``pip install -e '.[bench]'`` puts it there."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.is_file() else shutil.which("py-spy")


def py_spy_works(binary: str) -> str | None:
    """None if py-spy can read a Python process of ours; else why not (ptrace refused, ...)."""
    target = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], stdin=subprocess.DEVNULL
    )
    try:
        time.sleep(0.3)  # past the interpreter's start-up, so there is a frame to read
        out = subprocess.run(
            [binary, "dump", "--pid", str(target.pid)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        if out.returncode == 0 and "<module>" in out.stdout:
            return None
        return (out.stderr or out.stdout).strip() or f"py-spy dump exited with {out.returncode}"
    finally:
        target.kill()
        target.wait()


def parse_collapsed(lines: Iterable[str]) -> Counter[str]:
    """``frame;frame;...;innermost COUNT`` lines (py-spy's raw format, flamegraph.pl's input)."""
    stacks: Counter[str] = Counter()
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if stack and count.isdigit():
            stacks[stack] += int(count)
    return stacks


#: py-spy --threads puts ``thread (TID): NAME`` first in every stack.
_THREAD = re.compile(r"thread \(\d+\)(?:: (.*))?")
#: py-spy --subprocesses puts ``process PID:"CMDLINE"`` frames first, the root process first; a
#: command line may hold ";" (the fork server's ``-c "...import main; main(...)"``).
_PROCESSES = re.compile(r'((?:process \d+:"[^"]*";)*)(.*)', re.DOTALL)
_PROCESS = re.compile(r'process (\d+):"')
#: By how deep a stack's process is below the consumer: the consumer itself, the fork server and
#: resource tracker (its children), the pool's workers (the fork server's children).
ROLES = ("consumer", "helpers", "workers")


def split_processes(stacks: Counter[str]) -> dict[str, Counter[str]]:
    """The stacks of each role (``ROLES``), without their ``process`` frames. Stacks without
    any (py-spy without --subprocesses) are the consumer's."""
    out: dict[str, Counter[str]] = {role: Counter() for role in ROLES}
    for stack, count in stacks.items():
        match = _PROCESSES.match(stack)
        assert match is not None  # the pattern matches any string
        depth = len(_PROCESS.findall(match.group(1)))
        role = ROLES[min(2, max(0, depth - 1))]
        out[role][match.group(2) or "(no Python frame)"] += count
    return out


def top_from_stacks(stacks: Counter[str]) -> tuple[int, list[Row], Counter[str]]:
    """The sample count; every function's own and inclusive samples, by own samples; and the
    samples of each thread, by name."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    for stack, count in stacks.items():
        frames = stack.split(";")
        if thread := _THREAD.fullmatch(frames[0]):
            threads[thread.group(1) or frames[0]] += count  # unnamed: by its id
            frames = frames[1:] or ["(no Python frame)"]
        own[frames[-1]] += count
        for frame in set(frames):  # a recursive function counts once per sample
            total[frame] += count
    rows = [Row(name, own[name], total[name]) for name in total]
    rows.sort(key=lambda row: (-row.own, -row.total, row.function))
    return sum(stacks.values()), rows, threads


class PySpyProfiler:
    def __init__(
        self,
        binary: str,
        stem: Path,
        children: Children,
        top: int,
        native: bool = False,
        workers: bool = False,
    ) -> None:
        self._binary = binary
        self._native = native
        self._workers = workers
        self._stem = stem
        self._children = children
        self._top = top
        self._proc: subprocess.Popen[bytes] | None = None
        self._started = 0.0

    def command(self, argv: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        return argv, env

    def start(self, pid: int) -> None:
        self._stem.parent.mkdir(parents=True, exist_ok=True)
        # --function: one row per function rather than per line; --threads: which thread (the
        # event loop, or one of the library threads beside it). Idle samples are left out.
        self._proc = spawn(
            [
                self._binary, "record", "--pid", str(pid), "--rate", str(PY_SPY_RATE),
                "--format", "raw", "--function", "--threads",
                "--output", str(self._stem.with_suffix(".collapsed")),
                *(["--native"] if self._native else []),
                *(["--subprocesses", "--idle"] if self._workers else []),
            ],
            log_path=self._stem.with_suffix(".py-spy.log"),
        )  # fmt: skip
        self._children.add(self.close)
        self._started = time.monotonic()

    def stop(self) -> Profile:
        if self._proc is None:
            raise RuntimeError("py-spy was not started")
        seconds = time.monotonic() - self._started
        # SIGINT is py-spy's Ctrl-C: it writes what it has and exits.
        stop(self._proc, 60, signal.SIGINT)
        log = self._stem.with_suffix(".py-spy.log")
        collapsed = self._stem.with_suffix(".collapsed")
        if not collapsed.exists():
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"py-spy wrote no profile (exit {self._proc.returncode}):\n{tail}")
        stacks = parse_collapsed(collapsed.read_text(errors="replace").splitlines())
        roles = split_processes(stacks)
        whole, rows, threads = top_from_stacks(roles["workers" if self._workers else "consumer"])
        svg = self._stem.with_suffix(".svg")
        svg.write_text(flame_graph(stacks, title=self._stem.name))
        # py-spy's "not idle" is a thread running or ready to run: waiting for a CPU counts.
        # So this is how often the process had work, not the CPU it got (the CPU split has that).
        ticks = max(1.0, PY_SPY_RATE * seconds)
        notes = [
            f"{whole:,} samples of a thread not idle in {ticks:,.0f} ticks at {PY_SPY_RATE}/s "
            f"({whole / ticks:.2f} per tick; running or waiting for a CPU)",
            "threads: "
            + ", ".join(
                f"{name} {100 * n / max(1, whole):.1f} %" for name, n in threads.most_common()
            ),
        ]
        if self._workers:
            every = max(1, sum(stacks.values()))
            notes[0] = (
                f"the pool workers' wall time, idle included: {whole:,} samples at "
                f"{PY_SPY_RATE}/s over {seconds:.1f} s"
            )
            notes.append(
                "samples by process: "
                + ", ".join(f"{r} {100 * sum(roles[r].values()) / every:.1f} %" for r in ROLES)
            )
        if errors := re.search(r"Errors: (\d+)", log.read_text(errors="replace")):
            notes.append(f"py-spy sampling errors: {errors.group(1)}")
        files = {"collapsed": str(collapsed), "svg": str(svg), "log": str(log)}
        subject = "pool workers" if self._workers else "consumer process"
        profile = Profile("py-spy", whole, rows, seconds, files, notes, subject=subject)
        return _save(profile, self._stem, self._top)

    def close(self) -> None:
        if self._proc is not None:
            stop(self._proc, 30, signal.SIGINT)


# --- cProfile ----------------------------------------------------------------------------------


def top_from_pstats(path: Path, tree: Path = REPO) -> tuple[float, float, list[Row]]:
    """(seconds busy, seconds waiting in epoll/select, rows by own time) of a pstats file;
    ``tree`` is the checkout the consumer ran from, left out of its file names."""
    stats: Any = pstats.Stats(str(path))
    rows: list[Row] = []
    waiting = 0.0
    for (filename, line, name), (_, calls, own, total, _) in stats.stats.items():
        if filename == "~" and _WAITS.search(name):
            waiting += own
            continue
        rows.append(Row(_label(filename, line, name, tree), own, total, calls))
    rows.sort(key=lambda row: (-row.own, -row.total, row.function))
    return float(stats.total_tt) - waiting, waiting, rows


def _label(filename: str, line: int, name: str, tree: Path) -> str:
    """Named as py-spy names a frame, ``f (aiokafka/conn.py:10)``; a builtin by its own name."""
    if filename == "~":
        return name
    path = filename
    for marker in ("/site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker != "/site-packages/":
                path = path.partition("/")[2]  # past the "11/" of "lib/python3.11/"
            break
    else:
        path = path.removeprefix(f"{tree}/")
    return f"{name} ({path}:{line})"


class CProfileProfiler:
    def __init__(self, stem: Path, top: int, tree: Path) -> None:
        self._stem = stem
        self._top = top
        self._tree = tree
        self._pid = 0
        self._started = 0.0

    @property
    def _pstats(self) -> Path:
        return self._stem.with_suffix(".pstats")

    def command(self, argv: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        # argv is [python, -m, consumer, ARGS...]. The wrapper is run by path: the consumer's
        # tree (a --variant's) need not have it, and it imports the consumer from the working
        # directory the way -m does.
        self._stem.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self._pstats.unlink()
        return [argv[0], str(CPROFILE_WRAPPER), *argv[3:]], {
            **env,
            "BENCH_CPROFILE_OUT": str(self._pstats),
        }

    def start(self, pid: int) -> None:
        self._pid = pid
        os.kill(pid, signal.SIGUSR1)
        self._started = time.monotonic()

    def stop(self) -> Profile:
        seconds = time.monotonic() - self._started
        os.kill(self._pid, signal.SIGUSR2)
        deadline = time.monotonic() + 60
        while not self._pstats.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the consumer wrote no {self._pstats.name} within 60 s")
            time.sleep(0.05)
        cpu, waiting, rows = top_from_pstats(self._pstats, self._tree)
        notes = [
            f"main thread only; percentages of its {cpu:.2f} s outside the event loop's wait "
            f"({waiting:.2f} s waiting in epoll: left out, but inside the loop's total %)",
        ]
        profile = Profile("cProfile", cpu, rows, seconds, {"pstats": str(self._pstats)}, notes)
        return _save(profile, self._stem, self._top)

    def close(self) -> None:
        pass  # the wrapper lives and dies with the consumer


def _save(profile: Profile, stem: Path, top: int) -> Profile:
    text = stem.with_suffix(".txt")
    profile.top = top
    profile.files["table"] = str(text)
    text.write_text(profile.table(f"{profile.subject}, {stem.name}") + "\n")
    return profile


def make(
    kind: str,
    stem: Path,
    children: Children,
    top: int,
    tree: Path,
    native: bool = False,
    workers: bool = False,
) -> ConsumerProfiler:
    """A profiler for one run of the consumer in ``tree``; ``kind`` as ``choose`` returned it.
    ``native`` (py-spy only) adds the C frames: the garbage collector, orjson, numpy.
    ``workers`` (py-spy only): the pool workers' wall time instead of the consumer's CPU."""
    if kind == "py-spy":
        binary = py_spy()
        assert binary is not None
        return PySpyProfiler(binary, stem, children, top, native, workers)
    return CProfileProfiler(stem, top, tree)


def choose(kind: str) -> tuple[str, str]:
    """The profiler to use for ``--profile KIND``, and why (printed once per run)."""
    binary = py_spy()
    if kind == "cprofile":
        return "cprofile", "cProfile, as asked"
    why = "py-spy is not installed (pip install -e '.[bench]')"
    if binary is not None:
        problem = py_spy_works(binary)
        if problem is None:
            return "py-spy", f"py-spy ({binary})"
        why = f"py-spy cannot read a process here: {problem}"
    if kind == "py-spy":
        raise SystemExit(f"--profile py-spy: {why}")
    return "cprofile", f"cProfile: {why}"


# --- a flame graph -----------------------------------------------------------------------------


@dataclass
class _Node:
    count: int = 0
    children: dict[str, _Node] = field(default_factory=dict)


_WIDTH, _ROW, _FONT = 1200.0, 16, 11


def flame_graph(stacks: Counter[str], title: str) -> str:
    """A self-contained SVG flame graph (root at the bottom, width = samples); hover for names."""
    root = _Node()
    for stack, count in stacks.items():
        node = root
        node.count += count
        for frame in stack.split(";"):
            node = node.children.setdefault(frame, _Node())
            node.count += count
    whole = max(1, root.count)
    boxes: list[tuple[float, int, float, str, int]] = []  # x, depth, width, name, samples

    def walk(node: _Node, x: float, depth: int) -> int:
        deepest = depth
        for name, child in sorted(node.children.items()):
            width = _WIDTH * child.count / whole
            if width >= 0.3:  # narrower boxes cannot be seen or hovered
                boxes.append((x, depth, width, name, child.count))
                deepest = max(deepest, walk(child, x, depth + 1))
            x += width
        return deepest

    depth = walk(root, 0.0, 0) + 1
    height = (depth + 2) * _ROW
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH:.0f}" height="{height}" '
        f'font-family="monospace" font-size="{_FONT}">',
        f'<text x="4" y="{_ROW - 4}">{html.escape(title)}: {whole:,} samples</text>',
    ]
    for x, level, width, name, count in boxes:
        y = height - (level + 1) * _ROW
        hue = int(hashlib.md5(name.encode()).hexdigest()[:4], 16)
        fill = f"rgb(230,{100 + hue % 120},{hue % 60})"
        label = html.escape(f"{name}: {count:,} samples, {100 * count / whole:.1f} %")
        chars = int((width - 4) / (_FONT * 0.6))
        text = ""
        if chars >= 3:
            shown = name if len(name) <= chars else name[: chars - 2] + ".."
            text = f'<text x="{x + 2:.1f}" y="{y + _ROW - 4}">{html.escape(shown)}</text>'
        out.append(
            f'<g><title>{label}</title><rect x="{x:.1f}" y="{y}" width="{width:.1f}" '
            f'height="{_ROW - 1}" fill="{fill}"/>{text}</g>'
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"
