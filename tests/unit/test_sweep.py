"""``svd-consumer sweep-store``: old objects go, recent ones and other prefixes stay."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from consumer import cli
from consumer.sweep import sweep
from objectstore import PayloadStore, StoreSettings


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_only_objects_older_than_the_age_under_the_prefix_are_deleted(tmp_path: Path) -> None:
    settings = StoreSettings(url=f"file://{tmp_path}")
    store = PayloadStore(settings)
    for key in ("results/old", "results/new", "requests/old"):
        store.write(key, [b"payload"])
    _age(tmp_path / "results" / "old", 7200)
    _age(tmp_path / "requests" / "old", 7200)
    dry = sweep(settings, older_than_s=3600, prefix="results/", dry_run=True)
    assert (dry.seen, dry.deleted) == (2, 1)
    assert (tmp_path / "results" / "old").exists()
    swept = sweep(settings, older_than_s=3600, prefix="results/")
    assert (swept.seen, swept.deleted, swept.failed, swept.kept_bytes) == (2, 1, 0, 7)
    left = sorted(e.url.removeprefix(f"file://{tmp_path}/") for e in store.list())
    assert left == ["requests/old", "results/new"]


def test_the_command_needs_a_store_and_reports_what_it_did(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SVD_STORE_URL", raising=False)
    assert cli.main(["sweep-store", "--older-than-s", "1"]) == 2
    monkeypatch.setenv("SVD_STORE_URL", f"file://{tmp_path}")
    PayloadStore(StoreSettings(url=f"file://{tmp_path}")).write("results/a", [b"x"])
    _age(tmp_path / "results" / "a", 100)
    assert cli.main(["sweep-store", "--older-than-s", "10"]) == 0
    assert "deleted 1" in capsys.readouterr().out
    assert not (tmp_path / "results" / "a").exists()
