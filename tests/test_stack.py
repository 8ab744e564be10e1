"""scripts/stack.sh refusing what it cannot do, with one line that names why."""

import shutil
import subprocess

import pytest
from confluent_kafka.admin import AdminClient

from conftest import KAFKA, ROOT, stack


def test_a_missing_prerequisite_is_named_with_its_install_command(tmp_path):
    # A PATH with the shell's basic tools and none of java, mvn, psql, openssl.
    for tool in ["bash", "dirname", "ls", "sort", "id", "cat"]:
        (tmp_path / tool).symlink_to(shutil.which(tool))
    result = subprocess.run(["bash", str(ROOT / "scripts/stack.sh"), "up"], env={"PATH": str(tmp_path)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == ("Error: missing Java Maven psql openssl; install with: sudo apt-get "
                                     "install -y openjdk-17-jre-headless maven postgresql-client openssl")


@pytest.mark.parametrize("command", ["up", "down", "reset"])
def test_an_unknown_service_is_named_before_anything_is_touched(services, command):
    result = stack(command, "kafka", "zookeeper")
    assert result.returncode == 1
    assert result.stderr.strip() == "Error: unknown service 'zookeeper' (expected: source dest kafka)"
    # Kafka, named first, was neither stopped nor wiped.
    assert stack("status").returncode == 0
    assert "bf_employee_cdc" in AdminClient({"bootstrap.servers": KAFKA}).list_topics(timeout=10).topics


@pytest.mark.parametrize("brokers, args, error", [
    ("x", ["status"], "Error: KAFKA_BROKERS: 'x' is not a number of Kafka nodes from 1 to 9"),
    ("3", ["up", "kafka4"], "Error: unknown service 'kafka4' (expected: source dest kafka kafka1 kafka2 kafka3)"),
    ("3", ["reset", "kafka2"], "Error: one node of a cluster cannot be wiped alone; "
                               "wipe them all with: scripts/stack.sh reset kafka")])
def test_a_cluster_setting_or_node_that_cannot_be_is_named(brokers, args, error):
    # On ports of no stack: refused before anything is touched.
    result = stack(*args, KAFKA_BROKERS=brokers, KAFKA_PORT="1")
    assert result.returncode == 1
    assert result.stderr.strip() == error
