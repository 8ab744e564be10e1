"""The real stack for the tests.

`scripts/stack.sh up` runs once per test run (a missing service is a failure, never a
skip). The tests work in databases of their own, `cdc_test` on both servers, so they
leave the `postgres` databases of a running demo alone; every test gets fresh topics,
a fresh consumer group and emptied tables, and runs the daemons as subprocesses.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from contextlib import closing
from pathlib import Path

import psycopg2
import pytest
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import admin  # noqa: E402  (needs the repository root on sys.path)

TEST_DB = "cdc_test"
# The stack's ports, moved by the same variables as scripts/stack.sh and the daemons.
KAFKA = f"localhost:{os.environ.get('KAFKA_PORT', 29092)}"
PORTS = {"source": int(os.environ.get("SOURCE_DB_PORT", 5432)),
         "dest": int(os.environ.get("DEST_DB_PORT", 5433))}
INIT_SQL = {"source": ROOT / "scripts/source/init.sql", "dest": ROOT / "scripts/destination/init.sql"}
ROLES_SQL = {"source": ROOT / "scripts/source/roles.sql", "dest": ROOT / "scripts/destination/roles.sql"}
# The least-privilege roles of roles.sql, with the local stack's passwords (their names).
ROLE_PASSWORDS = {"CDC_PRODUCER_PASSWORD": "cdc_producer", "CDC_CONSUMER_PASSWORD": "cdc_consumer",
                  "CDC_READER_PASSWORD": "cdc_reader"}
# Each daemon runs as its own role; the tests' own set-up connects as postgres (connect()).
DAEMON_ROLES = {
    "producer.py": {"SOURCE_DB_USER": "cdc_producer", "SOURCE_DB_PASSWORD": "cdc_producer"},
    "consumer.py": {"DEST_DB_USER": "cdc_consumer", "DEST_DB_PASSWORD": "cdc_consumer"},
}
# status and verify (admin.py): the read-only role on both sides.
READER_ROLE = {"SOURCE_DB_USER": "cdc_reader", "SOURCE_DB_PASSWORD": "cdc_reader",
               "DEST_DB_USER": "cdc_reader", "DEST_DB_PASSWORD": "cdc_reader"}


def connect(side, dbname=TEST_DB):
    # UTF-8 whatever a test sets as the database's default encoding for clients
    connection = psycopg2.connect(host="localhost", port=PORTS[side], user="postgres",
                                  password="postgres", dbname=dbname, connect_timeout=5,
                                  client_encoding="UTF8")
    connection.autocommit = True
    return connection


def stack(*args, timeout=300, **env):
    """scripts/stack.sh with the arguments; env overrides its variables (KAFKA_BROKERS, say)."""
    return subprocess.run(["bash", str(ROOT / "scripts/stack.sh"), *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


def pytest_addoption(parser):
    parser.addoption("--shuffle", type=int, metavar="SEED",
                     help="run the tests in an order drawn at random from SEED")


def pytest_collection_modifyitems(config, items):
    # No test may rely on what an earlier one left behind: shuffled, each still passes.
    seed = config.getoption("--shuffle")
    if seed is not None:
        random.Random(seed).shuffle(items)


def pytest_configure(config):
    config.addinivalue_line("markers", "cluster: runs on a three-node Kafka cluster of its own "
                                       "(tests/test_cluster.py); -m 'not cluster' leaves them out")


@pytest.fixture(scope="session")
def services():
    """The stack, up, with the tests' own databases created afresh."""
    result = stack("up")
    if result.returncode != 0:
        pytest.fail(f"scripts/stack.sh up failed:\n{result.stdout}{result.stderr}", pytrace=False)
    for side in PORTS:
        with closing(connect(side, "postgres")) as admin, admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {TEST_DB} WITH (FORCE)")
            cursor.execute(f"CREATE DATABASE {TEST_DB}")
        query(side, INIT_SQL[side].read_text())
        apply_roles(side)


def apply_roles(side, dbname=TEST_DB, **passwords):
    """roles.sql, as psql runs it (it uses psql's variables), with the test passwords
    or the given CDC_..._PASSWORD(_FILE) variables (None: unset)."""
    env = {**os.environ, "PGPASSWORD": "postgres", **ROLE_PASSWORDS, **passwords}
    result = subprocess.run(["psql", "-h", "localhost", "-p", str(PORTS[side]), "-U", "postgres",
                             "-d", dbname, "-q", "-v", "ON_ERROR_STOP=1", "-f", str(ROLES_SQL[side])],
                            env={name: value for name, value in env.items() if value is not None},
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        pytest.fail(f"{ROLES_SQL[side]} failed on the {side} database:\n{result.stderr}", pytrace=False)


# Runs a command, then says its peak resident memory (KiB) as stderr's last line: from a
# small process of its own, because the peak Linux reports for a child counts the pages
# its parent held when it forked, and a test process's are more than the command's.
PEAK_OF = """import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
sys.exit(code)"""


def run_with_peak_kib(args, **options):
    """The command's CompletedProcess (text, output captured) and its peak resident
    memory in KiB."""
    result = subprocess.run([sys.executable, "-c", PEAK_OF, *args], capture_output=True, text=True, **options)
    *errors, peak = result.stderr.splitlines()
    result.stderr = "".join(f"{line}\n" for line in errors)
    return result, int(peak)


def query(side, sql, params=None, dbname=TEST_DB):
    """Runs one statement in the test database; returns its rows, if it has any."""
    with closing(connect(side, dbname)) as db, db.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall() if cursor.description else None


def employees(side):
    return query(side, "SELECT emp_id, first_name, last_name, dob::text, city, salary "
                       "FROM employees ORDER BY emp_id")


def wait_until(condition, timeout, what, logs=()):
    """Polls condition() until it is true; fails naming what did not happen."""
    deadline = time.monotonic() + timeout
    while True:
        asked = time.monotonic()
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            tails = "".join(f"\n--- {daemon.name} (last lines) ---\n{daemon.tail()}" for daemon in logs)
            pytest.fail(f"timed out after {timeout} s waiting for {what}{tails}", pytrace=False)
        # A condition that reads a large table is not asked again at once: on two
        # cores, asking without a pause takes one from the daemons under test.
        time.sleep(min(max(0.1, 4 * (time.monotonic() - asked)), 1.0))


class Daemon:
    """producer.py or consumer.py as a subprocess, logging to a file."""

    def __init__(self, name, script, env, log_dir, args=()):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen([sys.executable, str(ROOT / script), *args], env=env,
                                        cwd=log_dir, stdout=self._log_file, stderr=subprocess.STDOUT)

    @property
    def pid(self):
        return self.process.pid

    def log(self):
        return self.log_path.read_text(errors="replace")

    def tail(self, lines=25):
        return "\n".join(self.log().splitlines()[-lines:])

    def wait_for_log(self, text, timeout=30, count=1):
        wait_until(lambda: self.log().count(text) >= count, timeout,
                   f"{self.name} to log {text!r}", [self])

    def running(self):
        return self.process.poll() is None

    def stop(self, timeout=30):
        """SIGTERM, and the exit status."""
        if self.running():
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self._log_file.close()

    def kill(self):
        self.process.kill()
        self.process.wait()
        self._log_file.close()


class Pipeline:
    """One test's topics, consumer group, emptied tables and daemons."""

    def __init__(self, name, log_dir, kafka=None, replicas=1):
        self.kafka = kafka or {"bootstrap.servers": KAFKA}  # the tests' own Kafka clients' settings
        self.roles = dict(DAEMON_ROLES)
        suffix = uuid.uuid4().hex[:8]
        self.topic = f"test_{name}_{suffix}"[:200]
        self.dlq_topic = f"{self.topic}_dlq"
        self.group = f"{self.topic}_group"
        self.log_dir = log_dir
        self.daemons = []
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1",
                    "SOURCE_DB_NAME": TEST_DB, "DEST_DB_NAME": TEST_DB,
                    "KAFKA_BOOTSTRAP_SERVERS": self.kafka["bootstrap.servers"], "KAFKA_TOPIC": self.topic,
                    "KAFKA_DLQ_TOPIC": self.dlq_topic, "KAFKA_GROUP_ID": self.group,
                    "RETRY_BACKOFF": "0.2"}
        self.admin = AdminClient(self.kafka)
        # As admin.py creates them: on a cluster, a write needs 2 of 3 replicas.
        replicated = {"min.insync.replicas": str(admin.default_min_insync(replicas))}
        for future in self.admin.create_topics([NewTopic(self.topic, 3, replicas, config=replicated),
                                                NewTopic(self.dlq_topic, 1, replicas, config=replicated)
                                                ]).values():
            future.result()
        self.reset_tables()

    @staticmethod
    def reset_tables():
        # replica: the truncate is not captured as a change.
        query("source", "SET session_replication_role = replica; "
                        "TRUNCATE employees, emp_cdc, cdc_snapshot RESTART IDENTITY; "
                        "UPDATE cdc_offset SET last_action_id = 0, snapshot = '1:1:', "
                        "batch_snapshot = NULL, batch_action_id = 0")
        query("dest", "DROP TRIGGER IF EXISTS record_applied ON employees; "
                      "DROP TABLE IF EXISTS applied_history; TRUNCATE employees, cdc_applied, cdc_truncated")

    @staticmethod
    def record_applied():
        """From now on the destination logs every row version the consumer writes,
        for assert_applied_once_in_order."""
        query("dest", RECORD_APPLIED)

    def start(self, script, name=None, args=(), **env):
        """Starts a script as its role, with env added to the pipeline's (None: removed)."""
        merged = {**self.env, **self.roles.get(script, {}), **env}
        daemon = Daemon(name or Path(script).stem, script,
                        {key: value for key, value in merged.items() if value is not None},
                        self.log_dir, args)
        self.daemons.append(daemon)
        return daemon

    def producer(self, name="producer", **env):
        daemon = self.start("producer.py", name, **env)
        daemon.wait_for_log("Loaded offset")
        return daemon

    def consumer(self, name="consumer", **env):
        daemon = self.start("consumer.py", name, **env)
        daemon.wait_for_log("Assigned partitions")
        return daemon

    def wait_for_equal(self, timeout=60):
        """Waits until the destination's employees equal the source's, row for row."""
        source = employees("source")
        wait_until(lambda: employees("dest") == source, timeout,
                   f"the destination to equal the source ({len(source)} rows)", self.daemons)
        return source

    def messages(self, topic=None):
        """Every message in a topic, as dicts with key, value, partition, offset, headers."""
        return read_topic(topic or self.topic, self.kafka)

    def committed_offsets(self, group=None):
        """The group's committed offset per partition of the topic (none yet: left out)."""
        request = ConsumerGroupTopicPartitions(group or self.group)
        [future] = self.admin.list_consumer_group_offsets([request]).values()
        return {tp.partition: tp.offset for tp in future.result().topic_partitions
                if tp.topic == self.topic and tp.offset >= 0}

    def end_offsets(self):
        """The topic's end offset per partition that has messages."""
        partitions = self.admin.list_topics(self.topic, timeout=10).topics[self.topic].partitions
        futures = self.admin.list_offsets({TopicPartition(self.topic, p): OffsetSpec.latest() for p in partitions})
        ends = {tp.partition: future.result().offset for tp, future in futures.items()}
        return {partition: end for partition, end in ends.items() if end > 0}

    def assignments(self):
        """The partitions of the topic each member of the group holds, as sorted lists."""
        group = self.admin.describe_consumer_groups([self.group], request_timeout=10)[self.group].result()
        return [sorted(part.partition for part in member.assignment.topic_partitions
                       if part.topic == self.topic) for member in group.members]

    def caught_up(self, group=None):
        """Whether the group has committed every message of the topic as consumed."""
        return self.committed_offsets(group) == self.end_offsets()

    def produce(self, key, value, topic=None):
        """Produces one message as it is, straight to the topic; returns its
        (partition, offset)."""
        delivered = []
        producer = Producer(self.kafka)
        producer.produce(topic or self.topic, key=key, value=value,
                         on_delivery=lambda error, message: delivered.append((error, message)))
        assert producer.flush(10) == 0
        [(error, message)] = delivered
        assert error is None, error
        return message.partition(), message.offset()

    def close(self):
        for daemon in self.daemons:
            if daemon.running():
                daemon.kill()
        for future in self.admin.delete_topics([self.topic, self.dlq_topic]).values():
            future.result()


# A test's own bookkeeping on the destination: one row per row version written to
# employees, in the order the writes happened.
RECORD_APPLIED = """
CREATE TABLE applied_history (
    seq bigserial PRIMARY KEY, emp_id int, action text, first_name text, last_name text,
    dob text, city text, salary int, backend_pid int NOT NULL DEFAULT pg_backend_pid());
-- SECURITY DEFINER: the consumer's role may write employees and nothing else.
CREATE OR REPLACE FUNCTION record_applied() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO applied_history (emp_id, action) VALUES (OLD.emp_id, 'DELETE');
    ELSE
        INSERT INTO applied_history (emp_id, action, first_name, last_name, dob, city, salary)
        VALUES (NEW.emp_id, 'UPSERT', NEW.first_name, NEW.last_name, NEW.dob::text, NEW.city, NEW.salary);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER record_applied AFTER INSERT OR UPDATE OR DELETE ON employees
    FOR EACH ROW EXECUTE FUNCTION record_applied();
"""


def row_versions(side, sql):
    """Each emp_id's row versions, in order, as (action, first_name, ..., salary)."""
    versions = {}
    for emp_id, action, *values in query(side, sql):
        versions.setdefault(emp_id, []).append(
            ("DELETE",) if action == "DELETE" else ("UPSERT", *values))
    return versions


def assert_applied_once_in_order():
    """Every row version the destination wrote is a committed change of the source,
    taken in the source's order per employee, none twice: a change applied again (a
    replay the version gate let through) or out of order would have to match a change
    before one already matched. Intermediate changes may be skipped (a batch applies
    each employee's newest); the final state is checked by wait_for_equal."""
    committed = row_versions("source", "SELECT emp_id, action, first_name, last_name, dob::text, "
                                       "city, salary FROM emp_cdc ORDER BY action_id")
    applied = row_versions("dest", "SELECT emp_id, action, first_name, last_name, dob, city, "
                                   "salary FROM applied_history ORDER BY seq")
    assert applied, "the destination recorded no applied change"
    for emp_id, versions in applied.items():
        changes, position = committed.get(emp_id, []), 0
        for version in versions:
            try:
                position = changes.index(version, position) + 1
            except ValueError:
                pytest.fail(f"emp_id {emp_id}: the destination applied {version} twice, out of "
                            f"order, or never committed (source: {changes})", pytrace=False)


def read_topic(topic, kafka=None):
    reader = Consumer({**(kafka or {"bootstrap.servers": KAFKA}), "group.id": f"reader-{uuid.uuid4().hex}",
                       "enable.auto.commit": False})
    messages = []
    try:
        metadata = reader.list_topics(topic, timeout=10).topics[topic]
        for partition in sorted(metadata.partitions):
            low, high = reader.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            if high <= low:
                continue
            reader.assign([TopicPartition(topic, partition, low)])
            while True:
                message = reader.poll(10)
                assert message is not None and not message.error(), f"reading {topic} [{partition}]"
                messages.append({"key": message.key(), "value": message.value(),
                                 "partition": partition, "offset": message.offset(),
                                 "headers": dict(message.headers() or [])})
                if message.offset() >= high - 1:
                    break
    finally:
        reader.close()
    return messages


def published_action_ids(pipeline):
    return [json.loads(message["value"])["action_id"] for message in pipeline.messages()]


@pytest.fixture
def pipeline(services, request, tmp_path):
    pipeline = Pipeline(re.sub(r"[^A-Za-z0-9_]", "_", request.node.name), tmp_path)
    yield pipeline
    pipeline.close()
