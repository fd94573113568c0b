"""Fetch the S3Proxy jar from Maven Central once; later starts use the cached copy offline."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

from localstore.errors import LocalStoreError

GROUP_ID = "org.gaul"
ARTIFACT_ID = "s3proxy"
CLASSIFIER = "jar-with-dependencies"  # one fat jar: S3Proxy, jclouds, Jetty, logback
_MAIN_CLASS = "org/gaul/s3proxy/Main.class"


def ensure_jar(jar_path: Path, version: str) -> Path:
    """Return ``jar_path``, copying it there with Maven (from ~/.m2 or Maven Central) if needed."""
    if jar_path.is_file():
        return jar_path
    mvn = shutil.which("mvn")
    if mvn is None:
        raise LocalStoreError(
            f"Maven (mvn) is not installed and {jar_path} is not cached: "
            "install Maven (apt-get install maven) and try again, or run `make setup`"
        )
    home = jar_path.parent
    if not home.exists():
        home.mkdir(parents=True)
        # The cache and the instances below it are never the project's files.
        (home / ".gitignore").write_text("*\n")
    # Maven writes into a folder of its own; the jar is renamed into place only when complete,
    # so a run that dies half way (or two at once) never leaves a truncated jar to start from.
    with tempfile.TemporaryDirectory(dir=home, prefix=".fetch-") as tmp:
        cmd = [
            mvn, "-B", "-q", "dependency:copy",
            f"-Dartifact={GROUP_ID}:{ARTIFACT_ID}:{version}:jar:{CLASSIFIER}",
            f"-DoutputDirectory={tmp}",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        fetched = Path(tmp) / jar_path.name
        if proc.returncode != 0 or not fetched.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise LocalStoreError(
                f"Maven could not fetch {GROUP_ID}:{ARTIFACT_ID}:{version} ({CLASSIFIER}):\n{tail}"
            )
        _check_jar(fetched)
        os.replace(fetched, jar_path)
    return jar_path


def _check_jar(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as jar:
            names = set(jar.namelist())
    except (OSError, zipfile.BadZipFile) as exc:
        raise LocalStoreError(f"Maven fetched {path.name}, but it is not a jar: {exc}") from None
    if _MAIN_CLASS not in names:
        raise LocalStoreError(f"{path.name} holds no {_MAIN_CLASS}: not the S3Proxy fat jar")
