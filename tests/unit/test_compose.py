"""docker-compose.yml, the Dockerfile and the Prometheus/Grafana files agree with each other.

No Docker engine here: these check what can be checked without one. The files parse, every
file a service mounts exists, the consumer's environment names real settings with valid values,
the topics kafka-init creates are the ones the consumer reads, Prometheus finds the replicas by
DNS on the port they listen on (and promtool accepts its config), Grafana's provisioning points
at the mounted dashboard and the provisioned datasource, the consumer and the load generator use
the bucket the object store creates, with the credentials it checks.
"""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from consumer.settings import ConsumerSettings
from localstore import LocalStoreSettings
from objectstore.settings import StoreSettings
from schemas import topics
from tests.conftest import missing

REPO = Path(__file__).resolve().parents[2]

# Compose substitutes ${NAME} / ${NAME:-default}; a bare $name would be substituted too, so
# shell variables must be written $$name. Anything else is a mistake.
_INTERPOLATION = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


def _interpolate(text: str) -> str:
    """What compose makes of the file with no variable set: defaults in, $$ down to $."""
    return _INTERPOLATION.sub(
        lambda m: "$" if m.group() == "$$" else m.group("default") or "", text
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    raw = (REPO / "docker-compose.yml").read_text()
    loose = _INTERPOLATION.sub("", raw)
    assert "$" not in loose, "a $ compose would interpolate: write $$ for the shell"
    doc: dict[str, Any] = yaml.safe_load(_interpolate(raw))
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    svc: dict[str, Any] = compose["services"]
    return svc


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    out = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            out.append((REPO / source, target))
    return out


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(f"{name} missing (Debian package prometheus; make test installs it)")
    return path


def _size(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kmg]?)b?", text.lower()).groups()  # type: ignore[union-attr]
    return int(number) * 1024 ** " kmg".index(unit or " ")


def test_the_stack_has_every_service_and_references_resolve(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    assert {"kafka", "kafka-init", "store", "consumer", "prometheus", "grafana"} <= set(services)
    volumes = set(compose.get("volumes", {}))
    for name, service in services.items():
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in volumes, f"{name} uses undeclared volume {source}"


def test_kafka_runs_kraft_from_the_official_image(services: dict[str, Any]) -> None:
    kafka = services["kafka"]
    assert kafka["image"] == "apache/kafka:4.1.1"
    env = _env(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "ZOOKEEPER" not in " ".join(env)
    protocols = dict(
        item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    listeners = [item.split("://")[0] for item in env["KAFKA_LISTENERS"].split(",")]
    assert set(listeners) <= set(protocols)
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in listeners
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in listeners
    assert "healthcheck" in kafka


def test_kafka_init_creates_the_topics_the_consumer_uses_with_64_mib_messages(
    services: dict[str, Any],
) -> None:
    init = services["kafka-init"]
    assert init["image"] == services["kafka"]["image"]
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"
    script = "\n".join(init["command"]) if isinstance(init["command"], list) else init["command"]
    env = _env(services["consumer"])
    wanted = {env["SVD_REQUESTS_TOPIC"], env["SVD_RESULTS_TOPIC"], env["SVD_DLQ_TOPIC"]}
    assert wanted == {topics.REQUESTS, topics.RESULTS, topics.DLQ}
    created = {}
    for line in script.splitlines():
        if "kafka-topics.sh" in line and "--create" in line:
            assert line.strip().startswith("/opt/kafka/bin/kafka-topics.sh")
            args = line.split()
            topic = args[args.index("--topic") + 1]
            created[topic] = args[args.index("--config") + 1]
            assert "--if-not-exists" in args  # a restart of the stack is a no-op
    assert set(created) == wanted
    max_bytes = ConsumerSettings().max_message_bytes
    assert all(config == f"max.message.bytes={max_bytes}" for config in created.values())


def test_the_consumer_service_is_scalable_and_its_environment_is_valid_settings(
    services: dict[str, Any],
) -> None:
    consumer = services["consumer"]
    # --scale needs: no fixed name, no host port (replicas would collide).
    assert "container_name" not in consumer
    assert "ports" not in consumer
    assert (REPO / consumer["build"]["context"] / consumer["build"]["dockerfile"]).is_file()
    assert consumer["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
    assert _size(consumer["shm_size"]) >= 512 * 1024**2
    env = {k: v for k, v in _env(consumer).items() if k not in _STORE_FIELDS}  # below
    fields = {f"SVD_{name.upper()}" for name in ConsumerSettings.model_fields}
    assert set(env) <= fields, f"not settings: {set(env) - fields}"
    settings = ConsumerSettings(**{k.removeprefix("SVD_").lower(): v for k, v in env.items()})
    assert settings.metrics_host == "0.0.0.0"
    assert settings.metrics_port > 0
    host, port = settings.bootstrap_servers.split(":")
    advertised = _env(services["kafka"])["KAFKA_ADVERTISED_LISTENERS"]
    assert f"//{host}:{port}" in advertised, "the consumer must use a listener kafka advertises"
    grace = int(consumer["stop_grace_period"].rstrip("s"))
    assert grace > settings.drain_timeout_s, "docker would SIGKILL the drain"
    assert "9400" in consumer["healthcheck"]["test"][-1]


def test_prometheus_finds_every_replica_by_dns_and_promtool_accepts_the_config(
    services: dict[str, Any],
) -> None:
    ((config, target),) = _bind_mounts(services["prometheus"])
    assert any(target in arg for arg in services["prometheus"]["command"])
    doc = yaml.safe_load(config.read_text())
    (job,) = [j for j in doc["scrape_configs"] if j["job_name"] == "svd-consumer"]
    (sd,) = job["dns_sd_configs"]
    port = int(_env(services["consumer"])["SVD_METRICS_PORT"])
    assert (sd["names"], sd["type"], sd["port"]) == (["consumer"], "A", port)
    result = subprocess.run(
        [_tool("promtool"), "check", "config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisions_the_datasource_and_the_dashboard(services: dict[str, Any]) -> None:
    grafana = services["grafana"]
    mounts = {
        source.relative_to(REPO).as_posix(): target for source, target in _bind_mounts(grafana)
    }
    provisioning = REPO / "grafana" / "provisioning"
    assert mounts["grafana/provisioning"] == "/etc/grafana/provisioning"
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "svd.yml").read_text())["providers"]
    assert provider["options"]["path"] == mounts["grafana/dashboards"]
    home = _env(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    inside = Path(home).relative_to(mounts["grafana/dashboards"])
    assert (REPO / "grafana" / "dashboards" / inside).is_file()


def test_the_lag_exporter_watches_the_consumer_group(services: dict[str, Any]) -> None:
    exporter = services["kafka-exporter"]
    assert exporter["profiles"] == ["lag-exporter"]  # opt-in: see docs/operations.md
    args = dict(arg.lstrip("-").split("=", 1) for arg in exporter["command"])
    assert args["kafka.server"] == _env(services["consumer"])["SVD_BOOTSTRAP_SERVERS"]
    assert re.fullmatch(args["group.filter"], _env(services["consumer"])["SVD_GROUP_ID"])


def test_the_demo_load_generator_calls_the_workload_as_it_is_defined(
    services: dict[str, Any],
) -> None:
    from demo import workload

    loadgen = services["loadgen"]
    assert loadgen["image"] == services["consumer"]["image"]
    python, flag, source = loadgen["command"]
    assert (python, flag) == ("python", "-c")
    compile(source, "loadgen", "exec")
    (call,) = re.findall(r"run_workload\((.*)\)\)", source)
    bootstrap, _topics, count = (part.strip() for part in call.split(",", 2))
    assert bootstrap.strip('"') == _env(services["consumer"])["SVD_BOOTSTRAP_SERVERS"]
    inspect.signature(workload.run_workload).bind(
        "kafka:19092", {"requests": "", "results": "", "dlq": ""}, count=int(count.split("=")[1])
    )
    for attribute in ("sent", "verified", "failed", "ok"):
        assert hasattr(workload.Report(), attribute)


def _dockerfile() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def test_the_dockerfile_installs_every_package_and_runs_the_service_unprivileged() -> None:
    instructions = _dockerfile()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    copied = set()
    for instruction, rest in instructions:
        if instruction == "COPY":
            *sources, _destination = rest.split()
            copied.update(s.rstrip("/") for s in sources)
    for source in copied:
        assert (REPO / source).exists(), source
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    assert packages | {"pyproject.toml", pyproject["project"]["readme"]} <= copied
    ignore = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*", ".dockerignore is an allow-list: exclude all, then name what goes in"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert copied <= allowed, f"excluded from the build context: {copied - allowed}"
    users = [rest for instruction, rest in instructions if instruction == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ("CMD", '["svd-consumer", "run"]') in instructions
    assert "svd-consumer" in pyproject["project"]["scripts"]


_STORE_FIELDS = {f"SVD_STORE_{name.upper()}" for name in StoreSettings.model_fields}


def _store_settings(env: dict[str, str], prefix: str) -> StoreSettings:
    """The object store settings ``env`` gives a component whose variables start with ``prefix``."""
    mine = {k.removeprefix(prefix).lower(): v for k, v in env.items() if k.startswith(prefix)}
    assert mine, f"no {prefix}* variables"
    return StoreSettings(**mine)  # extra="forbid": a misspelt variable fails here


def test_the_store_serves_the_bucket_the_consumer_uses_with_the_credentials_it_checks(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    store, consumer = services["store"], services["consumer"]
    image, _, tag = store["image"].partition(":")
    assert image == "andrewgaul/s3proxy"
    assert tag == LocalStoreSettings().s3proxy_version, "the S3Proxy `make run` runs, pinned"
    env = _env(store)
    assert env["S3PROXY_AUTHORIZATION"] == "aws-v2-or-v4"  # every request signed and checked
    assert env["JCLOUDS_PROVIDER"] == "filesystem-nio2"  # as localstore configures it
    basedir = env["JCLOUDS_FILESYSTEM_BASEDIR"]
    ((volume, target),) = [v.split(":")[:2] for v in store["volumes"]]
    assert (volume, target) == (volume, basedir) and volume in compose["volumes"]
    listen_port = int(env["S3PROXY_ENDPOINT"].rsplit(":", 1)[1])
    assert any(p.endswith(f":{listen_port}") for p in store["ports"])

    settings = _store_settings(_env(consumer), "SVD_STORE_")
    assert settings.endpoint == f"http://store:{listen_port}"
    assert settings.allow_http
    assert settings.access_key_id == env["S3PROXY_IDENTITY"]
    assert settings.secret_access_key is not None
    assert settings.secret_access_key.get_secret_value() == env["S3PROXY_CREDENTIAL"]
    location = settings.location
    assert location.scheme == "s3"
    # The bucket is a directory of the filesystem backend, made before the server starts.
    shell, flag, script = store["command"]
    assert (shell, flag) == ("/bin/sh", "-c")
    assert f"mkdir -p {basedir}/{location.bucket} && exec " in script
    assert consumer["depends_on"]["store"]["condition"] == "service_healthy"
    assert "healthcheck" in store


def test_the_load_generator_reaches_the_store_the_consumer_uses(services: dict[str, Any]) -> None:
    service = _store_settings(_env(services["consumer"]), "SVD_STORE_")
    client = _store_settings(_env(services["loadgen"]), "SVD_CLIENT_STORE_")
    assert client.model_dump() == service.model_dump()
