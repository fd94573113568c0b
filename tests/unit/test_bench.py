"""bench/: the consumer/worker CPU column and the consumer profiles (py-spy and cProfile)."""

from __future__ import annotations

import cProfile
import os
import signal
import subprocess
import sys
import time
import xml.dom.minidom
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bench import profiling, report
from bench.procs import Children

CPU = {"consumer": 0.30, "workers": 0.20, "broker": 0.10, "bench": 0.05, "seconds": 4.0}


def _report(prefilled: dict[str, Any]) -> dict[str, Any]:
    return {
        "sizes": {
            "32": {
                "ceiling": {"rate": 1000.0},
                "variants": {"service": {"prefilled": {"rate": 250.0, **prefilled}}},
            }
        }
    }


def _column(table: dict[str, Any]) -> str:
    row = report.rows(table)[0]
    return row[report.HEADER.index("consumer÷worker CPU %")]


def test_consumer_worker_pct_divides_the_consumer_by_its_workers() -> None:
    assert report.consumer_worker_pct(CPU) == pytest.approx(150.0)
    assert report.consumer_worker_pct({**CPU, "consumer": 0.01}) == pytest.approx(5.0)


@pytest.mark.parametrize("cpu", [None, {}, {**CPU, "workers": 0.0}])
def test_consumer_worker_pct_is_none_without_a_split_or_worker_cpu(cpu: Any) -> None:
    assert report.consumer_worker_pct(cpu) is None


def test_the_column_comes_from_the_stored_figure_or_the_split() -> None:
    assert _column(_report({"cpu": CPU, "consumer_worker_cpu_pct": 150.0})) == "150"
    # A report written before the figure was stored: computed from its split.
    assert _column(_report({"cpu": CPU})) == "150"
    # Small percentages keep a decimal: the targets are a few percent.
    assert _column(_report({"cpu": {**CPU, "consumer": 0.0062}})) == "3.1"
    assert _column(_report({})) == "-"


def test_the_old_columns_stay_in_the_table_and_the_markdown() -> None:
    table = _report({"cpu": CPU})
    row = report.rows(table)[0]
    assert len(row) == len(report.HEADER)
    assert row[report.HEADER.index("prefilled CPU % workers/consumer/broker")] == "20/30/10"
    assert report.markdown(table).splitlines()[0].endswith("| consumer÷worker CPU % |")
    assert "150" in report.text(table).splitlines()[1]


STACKS = [
    "thread (11): MainThread;main (a.py:1);loop (a.py:5);decode (b.py:3) 6",
    "thread (11): MainThread;main (a.py:1);loop (a.py:5) 2",
    "thread (11): MainThread;main (a.py:1);loop (a.py:5);encode (b.py:9);decode (b.py:3) 1",
    "thread (12): Thread-1;run (t.py:2);decode (b.py:3) 1",
    "thread (13);run (t.py:2) 1",
    "a line that is not a stack",
]


def test_top_from_stacks_counts_own_and_inclusive_samples_and_threads() -> None:
    stacks = profiling.parse_collapsed(STACKS)
    whole, rows, threads = profiling.top_from_stacks(stacks)
    assert whole == 11
    by_name = {row.function: row for row in rows}
    assert rows[0].function == "decode (b.py:3)"
    assert (by_name["decode (b.py:3)"].own, by_name["decode (b.py:3)"].total) == (8, 8)
    assert (by_name["loop (a.py:5)"].own, by_name["loop (a.py:5)"].total) == (2, 9)
    assert (by_name["encode (b.py:9)"].own, by_name["encode (b.py:9)"].total) == (0, 1)
    assert not any(name.startswith("thread (") for name in by_name)
    assert threads == Counter({"MainThread": 9, "Thread-1": 1, "thread (13)": 1})


def test_flame_graph_is_well_formed_svg_with_every_frame() -> None:
    svg = profiling.flame_graph(profiling.parse_collapsed(STACKS), title="32 <service>")
    document = xml.dom.minidom.parseString(svg)
    titles = [t.firstChild.data for t in document.getElementsByTagName("title")]  # type: ignore[union-attr]
    assert any(t.startswith("decode (b.py:3): 6 samples") for t in titles)
    assert any(t.startswith("thread (12): Thread-1: 1 samples") for t in titles)


def _busy() -> None:
    total = 0
    for i in range(200_000):
        total += i % 7


def test_top_from_pstats_leaves_out_the_wait_and_names_frames_like_py_spy(tmp_path: Path) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    _busy()
    profiler.disable()
    path = tmp_path / "run.pstats"
    profiler.dump_stats(str(path))
    busy, waiting, rows = profiling.top_from_pstats(path, tree=Path(__file__).parents[2])
    assert busy > 0 and waiting == 0
    top = rows[0]
    assert top.function == f"_busy (tests/unit/test_bench.py:{_busy.__code__.co_firstlineno})"
    assert top.calls == 1
    table = profiling.Profile("cProfile", busy, rows, 1.0, top=3).table("title")
    assert "_busy (tests/unit/test_bench.py" in table
    assert len(table.splitlines()) == 2 + min(3, len(rows))


def _fake_tree(tmp_path: Path) -> Path:
    """A checkout whose ``consumer`` spins until SIGTERM, after saying it has started."""
    tree = tmp_path / "tree"
    (tree / "consumer").mkdir(parents=True)
    (tree / "consumer" / "__init__.py").write_text("")
    (tree / "consumer" / "__main__.py").write_text(
        "import signal, sys, pathlib, threading\n"
        "stop = []\n"
        "signal.signal(signal.SIGTERM, lambda *_: stop.append(1))\n"
        "def spin_in_the_tree():\n"
        "    total = 0\n"
        "    for i in range(10_000):\n"
        "        total += i\n"
        "pathlib.Path(sys.argv[1]).write_text(' '.join(sys.argv))\n"
        "while not stop:\n"
        "    spin_in_the_tree()\n"
        "sys.exit(3)\n"
    )
    return tree


def _wait_for(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        assert proc.poll() is None, f"the fake consumer exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def test_cprofile_profiler_runs_the_consumer_of_another_tree(tmp_path: Path) -> None:
    """The --variant NAME@TREE case: the wrapper is not in that tree and imports its consumer."""
    tree = _fake_tree(tmp_path)
    started = tmp_path / "started"
    profiler = profiling.make("cprofile", tmp_path / "out" / "32-before", Children(), 5, tree)
    argv, env = profiler.command(
        [sys.executable, "-m", "consumer", str(started)], {**os.environ, "PYTHONPATH": ""}
    )
    assert argv[1] == str(profiling.CPROFILE_WRAPPER)
    proc = subprocess.Popen(argv, cwd=tree, env=env)
    try:
        _wait_for(started, proc)
        assert started.read_text().split()[1:] == [str(started)]
        profiler.start(proc.pid)
        time.sleep(0.5)
        profile = profiler.stop()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 3  # the consumer's own exit code comes through
    assert profile.rows[0].function.startswith("spin_in_the_tree (consumer/__main__.py:")
    assert Path(profile.files["table"]).read_text().startswith("consumer process, 32-before")
    assert profile.as_json()["top"][0]["own_pct"] > 50


def test_py_spy_profiler_samples_a_running_consumer(tmp_path: Path) -> None:
    # py-spy comes with the dev extra; it needs ptrace, which this project's machines allow.
    binary = profiling.py_spy()
    assert binary is not None, "py-spy is not installed (it is in the dev extra)"
    assert not (problem := profiling.py_spy_works(binary)), f"py-spy cannot attach: {problem}"
    tree = _fake_tree(tmp_path)
    started = tmp_path / "started"
    children = Children()
    profiler = profiling.make("py-spy", tmp_path / "out" / "32-service", children, 5, tree)
    proc = subprocess.Popen([sys.executable, "-m", "consumer", str(started)], cwd=tree)
    try:
        _wait_for(started, proc)
        profiler.start(proc.pid)
        time.sleep(1.0)
        profile = profiler.stop()
    finally:
        children.stop_all()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert profile.tool == "py-spy" and profile.whole > 0
    assert any(row.function.startswith("spin_in_the_tree (") for row in profile.rows[:2])
    assert set(profile.files) >= {"collapsed", "svg", "table"}
    assert "MainThread" in " ".join(profile.notes)
