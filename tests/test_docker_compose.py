"""The structure of docker-compose.yml and the Dockerfile; needs no Docker.

No Docker engine runs where the suite runs, so these checks keep the file in step
with the local stack and with config.py instead of starting it.
"""

import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import admin  # noqa: E402  (needs the repository root on sys.path)
import config  # noqa: E402

SETTING_NAMES = ({setting.env for setting in config.SETTINGS}
                 | {setting.env + "_FILE" for setting in config.SETTINGS if setting.secret})


@pytest.fixture(scope="module")
def services():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def environment(service):
    """A service's environment as a dict, written as a mapping or as a list."""
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {name: str(value) for name, value in env.items()}


def test_services(services):
    assert {"kafka", "kafka-setup", "db_source", "db_dst", "producer", "consumer"} <= set(services)
    assert not [name for name in services if "zookeeper" in name.lower()]


DEFAULTS = {setting.env: setting.default for setting in config.SETTINGS}
# Settings whose values name hosts: host:port lists, listeners (NAME://host:port), voters (id@host:port).
ADDRESS_SETTINGS = ("KAFKA_BOOTSTRAP_SERVERS", "KAFKA_ADVERTISED_LISTENERS", "KAFKA_CONTROLLER_QUORUM_VOTERS")


def addresses(value):
    """The (host, port) pairs a setting's value names."""
    return [(host, int(port)) for host, port in re.findall(r"(?:^|[,/@ ])([A-Za-z0-9_.-]+):(\d+)", value)]


def hosts_named(service):
    """(setting, host) for every host a service's environment or set-up command names."""
    named = []
    for key, value in environment(service).items():
        if key.endswith("_HOST"):
            named.append((key, value))
        elif key in ADDRESS_SETTINGS:
            named += [(key, host) for host, _ in addresses(value)]
    command = service.get("command")
    script = " ".join(command) if isinstance(command, list) else command or ""
    for servers in re.findall(r"--bootstrap-server (\S+)", script):
        named += [("--bootstrap-server", host) for host, _ in addresses(servers)]
    return named


def test_every_host_named_is_a_service(services):
    for name, service in services.items():
        for key, host in hosts_named(service):
            # Inside a container localhost is the container: only a broker may name it, for
            # its own controller and for the clients on the host (its PLAINTEXT_HOST listener).
            broker = "KAFKA_NODE_ID" in environment(service)
            assert host in services or (broker and host == "localhost"), f"{name}: {key} names {host!r}"


def listener_ports(broker):
    return {name: int(port) for name, port in re.findall(r"(\w+)://[^:,]*:(\d+)",
                                                           environment(broker)["KAFKA_LISTENERS"])}


def advertised(broker):
    return {name: (host, int(port)) for name, host, port in re.findall(
        r"(\w+)://([^:,]+):(\d+)", environment(broker)["KAFKA_ADVERTISED_LISTENERS"])}


def test_the_daemons_reach_what_listens(services):
    """The daemons name ports the databases listen on (5432 in the postgres image) and
    brokers' listeners that advertise the very address the daemon used."""
    for name, service in services.items():
        env = environment(service)
        for side, variable in (("SOURCE", "db_source"), ("DEST", "db_dst")):
            if f"{side}_DB_HOST" in env:
                assert (env[f"{side}_DB_HOST"], env[f"{side}_DB_PORT"]) == (variable, "5432"), name
        for host, port in addresses(env.get("KAFKA_BOOTSTRAP_SERVERS", "")):
            broker = services[host]
            [listener] = [listener for listener, (advertised_host, advertised_port) in advertised(broker).items()
                          if (advertised_host, advertised_port) == (host, port)]
            assert listener_ports(broker)[listener] == port, f"{name} -> {host}:{port}"


def test_the_host_reaches_the_stack_with_the_clients_defaults(services):
    """admin.py and test_pipeline.py on the host work unchanged: the published ports are
    config.py's defaults, and the broker advertises its default bootstrap address."""
    published = {name: [str(port) for port in service.get("ports", [])] for name, service in services.items()}
    assert f"{DEFAULTS['SOURCE_DB_PORT']}:5432" in published["db_source"]
    assert f"{DEFAULTS['DEST_DB_PORT']}:5432" in published["db_dst"]
    [(host, port)] = addresses(DEFAULTS["KAFKA_BOOTSTRAP_SERVERS"])
    for broker in ("kafka", "kafka1"):
        [listener] = [listener for listener, address in advertised(services[broker]).items() if address == (host, port)]
        assert f"{port}:{listener_ports(services[broker])[listener]}" in published[broker]


def test_kafka_runs_kraft(services):
    kafka = services["kafka"]
    env = environment(kafka)
    assert kafka["image"] == "apache/kafka:4.1.1"
    assert "controller" in env["KAFKA_PROCESS_ROLES"].split(",")
    assert "broker" in env["KAFKA_PROCESS_ROLES"].split(",")
    assert not [name for name in env if "ZOOKEEPER" in name]
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert "localhost:29092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert "healthcheck" in kafka


@pytest.mark.parametrize("service, scripts", [
    ("db_source", "scripts/source"), ("db_dst", "scripts/destination")])
def test_databases(services, service, scripts):
    database = services[service]
    assert database["image"] == "postgres:15"
    env = environment(database)
    assert (env["POSTGRES_USER"], env["POSTGRES_PASSWORD_FILE"], env["POSTGRES_DB"]) == (
        "postgres", "/run/secrets/postgres_password", "postgres")
    mounts = [volume.split(":") for volume in database["volumes"]]
    # In name order: the schema, then the roles that are granted on it.
    assert [f"./{scripts}/init.sql", f"./{scripts}/roles.sql"] == [
        host for host, target, *_ in mounts if target.startswith("/docker-entrypoint-initdb.d/")]
    assert (ROOT / scripts / "init.sql").is_file() and (ROOT / scripts / "roles.sql").is_file()
    # roles.sql includes ../role_passwords.psql, relative to where it is mounted.
    assert ["./scripts/role_passwords.psql", "/role_passwords.psql"] in [mount[:2] for mount in mounts]
    assert "\\ir ../role_passwords.psql" in (ROOT / scripts / "roles.sql").read_text()
    assert "/var/lib/postgresql/data" in named_volume_targets(database)
    assert "pg_isready" in database["healthcheck"]["test"]


def created_topics(setup):
    """What a topic set-up job's command creates: {topic: (partitions, replicas, configs, bootstrap)}."""
    command = setup["command"]
    script = command[-1] if isinstance(command, list) else command
    created = {}
    for invocation in script.split("&&"):
        args = shlex.split(invocation)
        assert args[0] == "/opt/kafka/bin/kafka-topics.sh"
        assert "--create" in args and "--if-not-exists" in args
        configs = [args[i + 1] for i, arg in enumerate(args) if arg == "--config"]
        created[args[args.index("--topic") + 1]] = (
            args[args.index("--partitions") + 1], args[args.index("--replication-factor") + 1],
            configs, args[args.index("--bootstrap-server") + 1])
    return created


def test_setup_creates_topics(services):
    setup = services["kafka-setup"]
    assert setup["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert created_topics(setup) == {"bf_employee_cdc": ("3", "1", [], "kafka:9092"),
                                     "bf_employee_cdc_dlq": ("1", "1", [], "kafka:9092")}


@pytest.mark.parametrize("setup, brokers", [("kafka-setup", 1), ("kafka-cluster-setup", 3)])
def test_topic_setup_is_what_admin_create_makes(services, setup, brokers):
    topics = SimpleNamespace(topic=DEFAULTS["KAFKA_TOPIC"], dlq_topic=DEFAULTS["KAFKA_DLQ_TOPIC"])
    replicas = min(brokers, 3)  # admin.py create's default on that many brokers
    expected = {name: (str(partitions), str(replicas), str(admin.default_min_insync(replicas)))
                for name, partitions in admin.contract_partitions(topics).items()}
    created = {name: (partitions, rf, dict(config.split("=") for config in configs).get("min.insync.replicas", "1"))
               for name, (partitions, rf, configs, _) in created_topics(services[setup]).items()}
    assert created == expected


@pytest.mark.parametrize("service, database, expected", [
    ("producer", "db_source", {"SOURCE_DB_HOST": "db_source", "SOURCE_DB_PORT": "5432"}),
    ("consumer", "db_dst", {"DEST_DB_HOST": "db_dst", "DEST_DB_PORT": "5432"})])
def test_daemons(services, service, database, expected):
    daemon = services[service]
    env = environment(daemon)
    assert set(env) <= SETTING_NAMES, f"not settings of config.py: {set(env) - SETTING_NAMES}"
    assert {**expected, "KAFKA_BOOTSTRAP_SERVERS": "kafka:9092"}.items() <= env.items()
    assert daemon["command"] == ["python", f"{service}.py"]
    assert daemon["depends_on"] == {
        database: {"condition": "service_healthy"},
        "kafka-setup": {"condition": "service_completed_successfully"}}
    assert daemon["build"] == "."
    assert daemon["restart"] == "unless-stopped"


def named_volume_targets(service):
    """Where a service mounts volumes that docker-compose.yml names (not host folders)."""
    declared = yaml.safe_load((ROOT / "docker-compose.yml").read_text()).get("volumes") or {}
    return {volume.split(":")[1] for volume in service.get("volumes", [])
            if volume.split(":")[0] in declared}


def test_data_lives_in_named_volumes(services):
    # Anonymous volumes are left behind by `down`, and `up` silently starts empty.
    assert "/var/lib/kafka/data" in named_volume_targets(services["kafka"])
    assert environment(services["kafka"])["KAFKA_LOG_DIRS"] == "/var/lib/kafka/data"


def test_dockerfile_installs_the_runtime_requirements_and_runs_unprivileged():
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    assert "FROM python:3.11-slim" in lines
    assert any(line.startswith("COPY requirements.txt") for line in lines)
    assert any(line.startswith("RUN pip install") and "-r requirements.txt" in line
               for line in lines)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    runtime = (ROOT / "requirements.txt").read_text()
    assert "pytest" not in runtime and "PyYAML" not in runtime


def test_dockerignore_keeps_local_files_and_the_tests_out():
    ignored = set((ROOT / ".dockerignore").read_text().splitlines())
    assert {".stack/", ".venv/", ".git/", ".env", "tests/", "requirements-test.txt"} <= ignored


def test_passwords_are_secrets_never_inline(services):
    secrets = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["secrets"]
    for name, service in services.items():
        env = environment(service)
        assert not [key for key in env if key.endswith("PASSWORD")], name
        for key, path in env.items():
            if key.endswith("PASSWORD_FILE"):
                secret = path.removeprefix("/run/secrets/")
                assert secret in service["secrets"], (name, key)
                assert (ROOT / secrets[secret]["file"]).read_text().strip(), secret


@pytest.mark.parametrize("service, user", [("producer", "SOURCE_DB_USER"), ("consumer", "DEST_DB_USER")])
def test_daemons_log_in_as_their_roles(services, service, user):
    assert environment(services[service])[user] == f"cdc_{service}"


# --- profile cluster -----------------------------------------------------------------

CLUSTER_NODES = {"kafka1": (1, 29092), "kafka2": (2, 29094), "kafka3": (3, 29096)}
CLUSTER_BOOTSTRAP = "kafka1:9092,kafka2:9092,kafka3:9092"


def test_the_cluster_is_a_profile_of_its_own(services):
    in_profile = {name for name, service in services.items() if "cluster" in service.get("profiles", [])}
    assert in_profile == {*CLUSTER_NODES, "kafka-cluster-setup", "producer-cluster", "consumer-cluster"}
    # The default stack neither starts nor waits for a node of the cluster.
    for name, service in services.items():
        if name not in in_profile:
            assert "profiles" not in service
            assert not set(service.get("depends_on", {})) & in_profile


@pytest.mark.parametrize("name", sorted(CLUSTER_NODES))
def test_cluster_nodes_are_kraft_voters_with_replicated_internal_topics(services, name):
    node = services[name]
    node_id, host_port = CLUSTER_NODES[name]
    env = environment(node)
    assert node["image"] == services["kafka"]["image"]
    assert env["KAFKA_NODE_ID"] == str(node_id)
    assert env["KAFKA_PROCESS_ROLES"].split(",") == ["broker", "controller"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "1@kafka1:9093,2@kafka2:9093,3@kafka3:9093"
    assert env["CLUSTER_ID"] == environment(services["kafka1"])["CLUSTER_ID"]
    assert f"PLAINTEXT://{name}:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert f"PLAINTEXT_HOST://localhost:{host_port}" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert [str(port) for port in node["ports"]] == [f"{host_port}:{host_port}"]
    for key in ("OFFSETS_TOPIC", "TRANSACTION_STATE_LOG", "SHARE_COORDINATOR_STATE_TOPIC"):
        assert env[f"KAFKA_{key}_REPLICATION_FACTOR"] == "3"
    assert env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == env["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert "healthcheck" in node


def test_cluster_setup_creates_topics_with_three_replicas(services):
    setup = services["kafka-cluster-setup"]
    assert setup["depends_on"] == {name: {"condition": "service_healthy"} for name in CLUSTER_NODES}
    replicated = ["min.insync.replicas=2"]
    assert created_topics(setup) == {"bf_employee_cdc": ("3", "3", replicated, CLUSTER_BOOTSTRAP),
                                     "bf_employee_cdc_dlq": ("1", "3", replicated, CLUSTER_BOOTSTRAP)}


@pytest.mark.parametrize("service", ["producer", "consumer"])
def test_cluster_daemons_are_the_daemons_on_the_cluster(services, service):
    single, on_cluster = services[service], services[f"{service}-cluster"]
    assert environment(on_cluster) == {**environment(single), "KAFKA_BOOTSTRAP_SERVERS": CLUSTER_BOOTSTRAP}
    assert on_cluster["depends_on"] == {
        **{name: dependency for name, dependency in single["depends_on"].items() if name != "kafka-setup"},
        "kafka-cluster-setup": {"condition": "service_completed_successfully"}}
    for key in ("build", "command", "restart"):
        assert on_cluster[key] == single[key]


def test_docker_compose_accepts_the_file():
    """Where a Docker client with compose exists, it parses the file as Docker would
    (this machine's client has no compose plugin, so here the checks above stand alone)."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no `docker compose` on this machine")
    for profile in ([], ["--profile", "cluster"]):
        result = subprocess.run(["docker", "compose", *profile, "config", "--quiet"], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
