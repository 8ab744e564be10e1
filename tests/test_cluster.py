"""On a three-node Kafka cluster: a broker killed, restarted, rolled or down during a
rebalance loses nothing that was acknowledged and applies nothing twice to effect.

The cluster is a second Kafka of its own (scripts/stack.sh with KAFKA_BROKERS=3 on
CLUSTER_KAFKA_PORT, default KAFKA_PORT + 10: nodes on +10, +12 and +14), started for
this module and stopped after it, beside the single broker the other tests use; the
PostgreSQL servers are the stack's. `-m "not cluster"` leaves these tests out.
"""

import gc
import os
import re
import subprocess
import sys
import time
from collections import namedtuple

import pytest
from confluent_kafka.admin import AdminClient

from conftest import ROOT, Pipeline, published_action_ids, query, stack, wait_until
from test_guarantees import SEED, assert_per_key_order
from workload import Writers

pytestmark = pytest.mark.cluster

CLUSTER_PORT = int(os.environ.get("CLUSTER_KAFKA_PORT", int(os.environ.get("KAFKA_PORT", 29092)) + 10))
NODES = (1, 2, 3)
Group = namedtuple("Group", "coordinator members")


class Cluster:
    """The three nodes, kafka1 to kafka3, whose node ids are 1 to 3."""

    bootstrap = ",".join(f"localhost:{CLUSTER_PORT + 2 * (node - 1)}" for node in NODES)

    def __init__(self):
        self.admin = AdminClient({"bootstrap.servers": self.bootstrap})

    def stack(self, *args):
        result = stack(*args, timeout=600, KAFKA_BROKERS="3", KAFKA_PORT=str(CLUSTER_PORT))
        assert result.returncode == 0, f"stack.sh {' '.join(args)}:\n{result.stdout}{result.stderr}"
        return result

    def kill(self, node):
        self.stack("kill", f"kafka{node}")

    def stop(self, node):
        self.stack("down", f"kafka{node}")

    def start(self, node):
        self.stack("up", f"kafka{node}")

    def partitions(self, topic):
        return self.admin.list_topics(topic, timeout=10).topics[topic].partitions.values()

    def leader(self, topic, partition):
        return next(p.leader for p in self.partitions(topic) if p.id == partition)

    def wait_in_sync(self, topic, timeout=120):
        """Until every partition of the topic has all its replicas in sync again."""
        wait_until(lambda: all(len(p.isrs) == len(p.replicas) == 3 for p in self.partitions(topic)),
                   timeout, f"every replica of {topic} to be in sync")

    def coordinator(self, group):
        return self.admin.describe_consumer_groups([group], request_timeout=10)[group].result().coordinator.id


@pytest.fixture(scope="module")
def cluster(services):
    cluster = Cluster()
    cluster.stack("up", "kafka")
    yield cluster
    # Clients left behind would report the stopped nodes on stderr until the run ends.
    cluster.admin = None
    gc.collect()
    # Killed, not stopped: nodes stopped all at once sometimes waited out their
    # controlled shutdown for a controller already gone (60 s, then a kill anyway).
    cluster.stack("kill", "kafka")


@pytest.fixture
def pipeline(cluster, request, tmp_path):
    pipeline = Pipeline(re.sub(r"[^A-Za-z0-9_]", "_", request.node.name), tmp_path,
                        kafka={"bootstrap.servers": cluster.bootstrap}, replicas=3)
    yield pipeline
    pipeline.close()


def assert_promises_kept(pipeline):
    """The destination equals the source; each employee's newest change is the one
    applied; every change the producer saw acknowledged is in the topic."""
    pipeline.wait_for_equal(180)
    newest = dict(query("source", "SELECT emp_id, max(action_id) FROM emp_cdc GROUP BY emp_id"))
    applied = dict(query("dest", "SELECT emp_id, last_action_id FROM cdc_applied"))
    assert applied == newest, f"TEST_SEED={SEED}"
    [(watermark,)] = query("source", "SELECT last_action_id FROM cdc_offset")
    acknowledged = {action_id for (action_id,) in
                    query("source", "SELECT action_id FROM emp_cdc WHERE action_id <= %s", (watermark,))}
    published = published_action_ids(pipeline)
    assert acknowledged and not acknowledged - set(published), \
        f"acknowledged but missing from the topic: {sorted(acknowledged - set(published))[:20]}"
    assert_per_key_order(pipeline)


def test_replicated_topics_from_stack_and_admin(cluster, pipeline):
    for topic in ("bf_employee_cdc", "bf_employee_cdc_dlq"):
        assert all(len(p.replicas) == 3 for p in cluster.partitions(topic))
    result = subprocess.run([sys.executable, str(ROOT / "admin.py"), "create", f"{pipeline.topic}_new"],
                            env=pipeline.env, capture_output=True, text=True, timeout=60)
    assert result.stdout == (f"Created topic {pipeline.topic}_new (1 partitions, "
                             "replication factor 3, min.insync.replicas 2)\n"), result.stderr
    result = subprocess.run([sys.executable, str(ROOT / "admin.py"), "describe", f"{pipeline.topic}_new"],
                            env=pipeline.env, capture_output=True, text=True, timeout=60)
    cluster.admin.delete_topics([f"{pipeline.topic}_new"])
    assert "replication factor: 3  min.insync.replicas: 2" in result.stdout
    assert re.search(r"partition 0: leader \d, replicas \[\d, \d, \d\], isr \[\d, \d, \d\]", result.stdout)


def test_leader_killed_under_steady_writes_then_restarted(cluster, pipeline):
    pipeline.producer()
    pipeline.consumer()
    leader = cluster.leader(pipeline.topic, 0)
    try:
        with Writers(threads=4, seed=SEED):
            time.sleep(2)
            cluster.kill(leader)
            time.sleep(8)
            cluster.start(leader)
            time.sleep(2)
    finally:
        cluster.start(leader)
    assert_promises_kept(pipeline)


def test_rolling_restart_of_every_node_under_steady_writes(cluster, pipeline):
    pipeline.producer()
    pipeline.consumer()
    try:
        with Writers(threads=4, seed=SEED):
            for node in NODES:
                cluster.stop(node)
                cluster.start(node)
                cluster.wait_in_sync(pipeline.topic)
    finally:
        cluster.stack("up", "kafka")
    assert_promises_kept(pipeline)


def test_coordinator_down_while_the_group_rebalances(cluster, pipeline):
    pipeline.producer()
    consumers = [pipeline.consumer("consumer-0")]
    coordinator = cluster.coordinator(pipeline.group)
    try:
        with Writers(threads=4, seed=SEED):
            time.sleep(2)
            cluster.kill(coordinator)
            # Two more members join while the group's coordinator is dead: the group
            # must find the new coordinator and share the partitions out again.
            consumers += [pipeline.start("consumer.py", f"consumer-{n}") for n in (1, 2)]

            def each_has_a_partition():
                return all(re.findall(r"Assigned partitions: \[(\d.*)\]", c.log()) for c in consumers)

            wait_until(each_has_a_partition, 120, "the three consumers to share the partitions", consumers)
            cluster.start(coordinator)
            time.sleep(2)
    finally:
        cluster.start(coordinator)
    assert_promises_kept(pipeline)
