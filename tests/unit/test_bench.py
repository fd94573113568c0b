"""bench/: the consumer/worker CPU column, the consumer profiles (py-spy and cProfile), and the
stored-payload runs of #17 (large sizes, the inline/stored crossover, the time split)."""

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

import orjson
import pytest

from bench import celery_peer, profiling, report
from bench.cli import parse_crossover, payload_modes
from bench.kafka_runs import answer_meta
from bench.procs import Children
from bench.stored import StorePrefix
from bench.workload import Shape, all_sizes, request_count
from schemas.headers import SVD_META

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
    assert row[report.HEADER.index("prefilled CPU % workers/consumer/broker[/store]")] == "20/30/10"
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
        # Written aside and renamed, so the test never reads a file created but not yet written.
        "pending = pathlib.Path(sys.argv[1] + '.pending')\n"
        "pending.write_text(' '.join(sys.argv))\n"
        "pending.rename(sys.argv[1])\n"
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


# --- #17: stored payloads --------------------------------------------------------------------


def test_sizes_whose_request_or_answer_cannot_travel_in_a_record_need_the_store() -> None:
    assert Shape.parse("2048").result_nbytes == (2 * 2048 * 2048 + 2048) * 8
    assert Shape.parse("4096x64").result_nbytes == (4096 * 64 + 64 + 64 * 64) * 8
    # 2048x2048 factors are 64 MiB and a little: over the topics' 64 MiB.
    assert [Shape.parse(s).needs_store() for s in ("1024", "768", "4096x64", "2048", "4096")] == [
        False, False, False, True, True,
    ]  # fmt: skip
    assert Shape.parse("1024").needs_store(limit=8 << 20)


def test_request_counts_round_up_to_whole_rounds_of_workers() -> None:
    assert request_count(0.3, 3.0, 4, 4000, multiple_of=2) == 4
    assert request_count(1.7, 3.0, 4, 4000, multiple_of=2) == 6  # 5 -> 6
    assert request_count(100.0, 3.0, 16, 4000) == 300
    assert request_count(100.0, 3.0, 16, 250, multiple_of=3) == 252


def test_crossover_sizes_join_the_run_in_order_and_once() -> None:
    sizes = [Shape.parse(s) for s in ("32", "256", "512", "1024", "4096x64", "2048", "4096")]
    crossover = [Shape.parse(s) for s in ("256", "512", "768", "1024")]
    labels = [s.label for s in all_sizes(sizes, crossover)]
    assert labels == ["32", "256", "512", "768", "1024", "4096x64", "2048", "4096"]
    assert [s.label for s in all_sizes([Shape.parse("32")], crossover[2:])] == ["32", "768", "1024"]


def test_crossover_defaults_apply_only_when_no_sizes_are_chosen() -> None:
    assert [s.label for s in parse_crossover(None, quick=False, sizes_given=False)] == [
        "256", "512", "768", "1024",
    ]  # fmt: skip
    assert [s.label for s in parse_crossover(None, quick=True, sizes_given=False)] == ["256"]
    assert parse_crossover(None, quick=False, sizes_given=True) == []
    assert parse_crossover("none", quick=False, sizes_given=False) == []
    assert [s.label for s in parse_crossover("64,4096x64", quick=False, sizes_given=True)] == [
        "64", "4096x64",
    ]  # fmt: skip


def test_payload_modes_and_why_one_is_left_out() -> None:
    large, middle, small = Shape.parse("2048"), Shape.parse("512"), Shape.parse("32")
    assert payload_modes(large, False, True) == (["stored"], "")
    modes, why = payload_modes(large, True, False)
    assert modes == [] and "cannot travel in a record" in why and "64.0 MiB" in why
    assert payload_modes(middle, True, True) == (["inline", "stored"], "")
    modes, why = payload_modes(middle, True, False)
    assert modes == ["inline"] and "no object store" in why
    assert payload_modes(small, False, True) == (["inline"], "")


def test_the_cpu_column_has_the_store_when_the_run_used_it() -> None:
    assert report.variant_key("service", "inline") == "service"
    assert report.variant_key("service", "stored") == "service/stored"
    row = report.rows(_report({"cpu": {**CPU, "store": 0.07}}))[0]
    assert row[report.HEADER.index("prefilled CPU % workers/consumer/broker[/store]")] == (
        "20/30/10/7"
    )


def test_time_split_takes_the_ratio_apart_into_computing_and_slowdown() -> None:
    # 2 workers, a 10 s window, 4 answers of 4 s each; the ceiling does one SVD in 3.2 s a core.
    split = report.time_split([4000.0] * 4, 10.0, 4, 2 / 3.2, 2)
    assert split is not None
    assert split["compute_busy"] == pytest.approx(0.8)
    assert split["svd_slowdown"] == pytest.approx(1.25)
    assert split["other_s"] == pytest.approx(1.0)  # 20 worker-seconds / 4 - 4 s
    rate, ceiling = 4 / 10.0, 2 / 3.2
    assert split["compute_busy"] / split["svd_slowdown"] == pytest.approx(rate / ceiling)
    assert report.time_split([], 10.0, 4, 1.0, 2) is None
    assert report.time_split([1.0], 10.0, 4, None, 2) is None


def _run(prefilled: float, sdk: float, payloads: str, **extra: Any) -> dict[str, Any]:
    return {
        "payloads": payloads,
        "prefilled": {"rate": prefilled, **extra},
        "sdk": {"rate": sdk},
        "latency": {"added_p50_ms": 12.0 if payloads == "inline" else 30.0},
    }


def _crossover_report(pairs: dict[str, tuple[float, float, float, float]]) -> dict[str, Any]:
    """{size: (prefilled inline, prefilled stored, sdk inline, sdk stored)}."""
    sizes: dict[str, Any] = {}
    for label, (pi, ps, si, ss) in pairs.items():
        n = int(label)
        sizes[label] = {
            "shape": [n, n],
            "ceiling": {"rate": 100.0},
            "variants": {
                "service": _run(pi, si, "inline"),
                "service/stored": _run(ps, ss, "stored"),
            },
        }
    return {"sizes": sizes}


def test_the_crossover_is_where_stored_keeps_up_from_then_on() -> None:
    table = _crossover_report(
        {
            "256": (50.0, 40.0, 40.0, 20.0),
            "512": (10.0, 10.5, 8.0, 7.0),
            "768": (4.0, 3.9, 3.0, 3.1),
            "1024": (2.0, 2.1, 1.5, 1.6),
        }
    )
    # Prefilled: 512 keeps up, 768 does not, so only from 1024; SDK: from 768.
    assert report.crossover(table) == {"service": {"prefilled": "1024", "sdk": "768"}}
    rows = report.crossover_rows(table)
    assert [row[0] for row in rows] == ["256", "512", "768", "1024"]
    first = dict(zip(report.CROSSOVER_HEADER, rows[0], strict=True))
    assert first["prefilled/s inline (ratio)"] == "50.0 (0.50)"
    assert first["prefilled/s stored (ratio)"] == "40.0 (0.40)"
    assert first["stored÷inline prefilled"] == "0.80"
    assert first["stored÷inline sdk"] == "0.50"
    assert first["added p50 ms inline / stored"] == "12.0 / 30.0"
    never = _crossover_report({"256": (5.0, 4.0, 5.0, 4.0), "512": (5.0, 4.0, 5.0, 4.0)})
    assert report.crossover(never) == {"service": {"prefilled": None, "sdk": None}}
    assert "prefilled: at none of the sizes" in report.crossover_text(never)
    # A size with no stored run (e.g. it failed) is no crossover.
    del table["sizes"]["1024"]["variants"]["service/stored"]["prefilled"]["rate"]
    assert report.crossover(table)["service"]["prefilled"] is None


def test_every_table_comes_out_in_markdown_and_text() -> None:
    split = report.time_split([4000.0] * 4, 10.0, 4, 2 / 3.2, 2)
    table = _crossover_report({"512": (10.0, 10.5, 8.0, 7.0)})
    size = table["sizes"]["512"]
    size["variants"]["service/stored"]["prefilled"]["time"] = split
    size["store_probe"] = {"read_s": 0.012, "read_sha256_s": 0.002, "write_s": 0.25,
                           "write_sha256_s": 0.004}  # fmt: skip
    time_rows = report.time_rows(table)
    assert len(time_rows) == 1  # only runs with a time split
    row = dict(zip(report.TIME_HEADER, time_rows[0], strict=True))
    assert row["variant"] == "service/stored"
    assert row["workers computing %"] == "80"
    assert row["SVD s: workers / ceiling"] == "4.00 / 3.20 (1.25x)"
    assert row["store: read s (sha256) / write s (sha256)"] == "0.012 (0.002) / 0.250 (0.004)"
    markdown = report.all_markdown(table)
    separators = [line for line in markdown.splitlines() if line.startswith("|---|")]
    assert len(separators) == 3  # the main table, the time split, the crossover
    assert "stored at least as fast as inline (service): prefilled: from 512" in markdown
    assert "Payloads inline and stored" in report.all_text(table)


class _Record:
    def __init__(self, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        self.value, self.headers = value, headers


def test_answer_meta_reads_binary_and_stored_answers_but_not_errors() -> None:
    meta = {"request_id": "a", "timings": {"queue_wait_ms": 1.0, "compute_ms": 2.0}}
    binary = _Record(b"\0" * 64, [("content-type", b"x"), (SVD_META, orjson.dumps(meta))])
    assert answer_meta(binary) == meta
    stored = {"status": "ok", **meta, "factors_ref": {"url": "s3://b/k", "nbytes": 8}}
    assert answer_meta(_Record(orjson.dumps(stored), [])) == stored
    error = {"status": "error", "request_id": "a", "error": {"code": "INTERNAL"}}
    assert answer_meta(_Record(orjson.dumps(error), [])) is None
    assert answer_meta(_Record(b"not json", [])) is None
    padded = {**stored, "pad": "x" * 70_000}  # too large to be a stored answer: not parsed
    assert answer_meta(_Record(orjson.dumps(padded), [])) is None


def test_store_prefix_points_the_service_and_the_sdk_at_one_place() -> None:
    prefix = StorePrefix(
        endpoint="http://127.0.0.1:9000", bucket="svd-payloads", region="us-east-1",
        access_key_id="id", secret_access_key="secret", prefix="bench-2048-service-stored",
    )  # fmt: skip
    env = prefix.service_env()
    assert env["SVD_STORE_URL"] == "s3://svd-payloads/bench-2048-service-stored"
    assert env["SVD_STORE_ENDPOINT"] == "http://127.0.0.1:9000"
    assert env["SVD_STORE_ALLOW_HTTP"] == "true"
    client = prefix.client_settings()
    assert client["url"] == prefix.url and client["secret_access_key"] == "secret"
    assert set(client) == {k.removeprefix("SVD_STORE_").lower() for k in env}
    store = prefix.payloads()
    assert store.url_for("requests/x") == "s3://svd-payloads/bench-2048-service-stored/requests/x"


def test_worker_profiles_split_stacks_by_process_depth() -> None:
    consumer = 'process 10:"python -m consumer run"'
    forkserver = 'process 11:"python -c from multiprocessing.forkserver import main; main(9)"'
    worker = 'process 12:"python -c from multiprocessing.forkserver import main; main(9)"'
    stacks = Counter(
        {
            f"{consumer};thread (10): MainThread;run (a.py:1)": 3,
            f"{consumer};{forkserver};thread (11): MainThread;main (f.py:1)": 5,
            f"{consumer};{forkserver};{worker};thread (12): MainThread;write (s.py:9)": 7,
            f"{consumer};{forkserver};{worker};thread (12): MainThread;svd (c.py:2)": 2,
            "thread (13): MainThread;plain (p.py:1)": 1,  # no --subprocesses: the consumer's
        }
    )
    roles = profiling.split_processes(stacks)
    assert sum(roles["consumer"].values()) == 4
    assert sum(roles["helpers"].values()) == 5
    assert roles["workers"] == Counter(
        {"thread (12): MainThread;write (s.py:9)": 7, "thread (12): MainThread;svd (c.py:2)": 2}
    )
    whole, rows, _threads = profiling.top_from_stacks(roles["workers"])
    assert whole == 9 and rows[0].function == "write (s.py:9)"
    assert not any(row.function.startswith("process ") for row in rows)


def test_celery_is_skipped_where_redis_would_drop_its_results() -> None:
    config = "normal 0 0 0 slave 268435456 67108864 60 pubsub 33554432 8388608 60"
    limit = celery_peer.pubsub_hard_limit(config)
    assert limit == 32 << 20
    assert celery_peer.pubsub_hard_limit("normal 0 0 0 pubsub 0 0 0") is None  # no limit
    assert celery_peer.pubsub_hard_limit("") is None
    assert celery_peer.skip_reason(Shape.parse("1024"), limit) == ""
    why = celery_peer.skip_reason(Shape.parse("2048"), limit)
    assert "64.0 MiB" in why and "32 MiB" in why and "--celery-pubsub-unlimited" in why
    assert celery_peer.skip_reason(Shape.parse("4096"), None) == ""


def test_notes_say_what_was_skipped_or_left_behind() -> None:
    table = _crossover_report({"512": (10.0, 10.5, 8.0, 7.0)})
    size = table["sizes"]["512"]
    size["payloads_note"] = "payloads stored not measured: no object store (see above)"
    size["celery"] = {"skipped": "too large"}
    size["variants"]["service/stored"]["store_objects_left"] = 2
    size["variants"]["service"]["prefilled"]["errors"] = 1
    assert report.notes(table) == [
        "512: payloads stored not measured: no object store (see above)",
        "512: celery skipped: too large",
        "512 service: 1 pre-filled answers were errors",
        "512 service/stored: 2 objects were left in the store (deleted)",
    ]
    row = dict(zip(report.HEADER, report.rows(table)[0], strict=True))
    assert row["celery/s (ratio)"] == "skipped"
    assert "- 512: celery skipped: too large" in report.all_text(table)


def test_slow_rates_keep_three_significant_digits() -> None:
    table = {
        "sizes": {
            "4096": {
                "shape": [4096, 4096],
                "ceiling": {"rate": 0.0641},
                "variants": {"service/stored": {"prefilled": {"rate": 0.0344}}},
            }
        }
    }
    row = dict(zip(report.HEADER, report.rows(table)[0], strict=True))
    assert row["ceiling/s"] == "0.0641"
    assert row["prefilled/s (ratio)"] == "0.0344 (0.54)"
