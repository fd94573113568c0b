"""Fetch the Kafka broker jars from Maven Central once; later starts use the cache offline."""

from __future__ import annotations

import shutil
import subprocess
from importlib import resources
from pathlib import Path

from localkafka.errors import BrokerError

_COMPLETE_MARKER = ".complete"


def ensure_jars(libs_dir: Path, kafka_version: str) -> Path:
    """Return a folder holding every runtime jar of the broker, running Maven only when needed."""
    if (libs_dir / _COMPLETE_MARKER).exists():
        return libs_dir
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError(
            f"Maven (mvn) is not installed and {libs_dir} holds no cached Kafka jars: "
            "install Maven (apt-get install maven) and try again"
        )
    libs_dir.mkdir(parents=True, exist_ok=True)
    pom = resources.files("localkafka").joinpath("pom.xml")
    with resources.as_file(pom) as pom_path:
        cmd = [
            mvn, "-B", "-q", "-f", str(pom_path),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-Dkafka.version={kafka_version}",
            f"-DoutputDirectory={libs_dir}",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise BrokerError(f"Maven could not fetch Kafka {kafka_version} jars:\n{tail}")
    if not any(libs_dir.glob(f"kafka_2.13-{kafka_version}.jar")):
        raise BrokerError(f"Maven ran but kafka_2.13-{kafka_version}.jar is not in {libs_dir}")
    (libs_dir / _COMPLETE_MARKER).write_text(kafka_version)
    return libs_dir
