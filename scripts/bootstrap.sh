#!/usr/bin/env bash
# Installs what the project needs on a fresh Debian machine: system packages (only those missing),
# the virtualenv with the project and its dev tools, the Kafka jars (cached in .kafka/) and the
# S3Proxy jar of the local object store (cached in .s3proxy/), so tests and `make run` work offline.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v java >/dev/null || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need+=(maven)
for pkg in "$@"; do  # optional extras named by the caller, e.g. prometheus, kcat, redis-server
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing system packages: ${need[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev,examples]'
  touch "$stamp"
fi

.venv/bin/python -c 'from localkafka.jars import ensure_jars; from localkafka.settings import BrokerSettings as S; s=S(); ensure_jars(s.libs_dir, s.kafka_version)'
.venv/bin/python -c 'from localstore.jar import ensure_jar; from localstore.settings import LocalStoreSettings as S; s=S(); ensure_jar(s.jar_path, s.s3proxy_version)'
