"""The seed README's verification steps, end to end on the real stack."""

import json
import re
import subprocess
import sys
import time
from collections import Counter
from contextlib import closing

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

import config
from conftest import (KAFKA, PORTS, ROOT, connect, employees, published_action_ids, query,
                      stack, wait_until)

SEED_ROWS = [(200, "David", "Wilson", "1991-01-01", "Miami", 65000),
             (201, "Emma", "Davis", "1993-02-02", "Denver", 70000),
             (202, "Frank", "Miller", "1989-03-03", "Portland", 72000)]


def insert(*rows):
    for row in rows:
        query("source", "INSERT INTO employees (emp_id, first_name, last_name, dob, city, salary) "
                        "VALUES (%s, %s, %s, %s, %s, %s)", row)


def run_script(pipeline, script, *args, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / script), *args], env=pipeline.env,
                          capture_output=True, text=True, timeout=timeout)


def test_step1_services_up_and_topics_created(services):
    status = stack("status")
    assert status.returncode == 0, status.stdout
    assert [line.split()[-1] for line in status.stdout.splitlines()] == ["up", "up", "up"]
    topics = AdminClient({"bootstrap.servers": KAFKA}).list_topics(timeout=10).topics
    assert len(topics["bf_employee_cdc"].partitions) == 3
    assert len(topics["bf_employee_cdc_dlq"].partitions) == 1


def test_step1_up_again_is_quick_and_downloads_nothing(services):
    started = time.monotonic()
    result = stack("up")
    took = time.monotonic() - started
    assert result.returncode == 0
    assert "Resolving" not in result.stdout and "Creating" not in result.stdout
    # Only checks: no Maven, no initdb, no broker start (each of those takes seconds).
    assert took < 5, f"stack.sh up on a running stack took {took:.1f} s"


def test_step2_schema_in_the_stack_databases(services):
    def tables(side):
        return {row[0] for row in query(side, "SELECT tablename FROM pg_tables "
                                              "WHERE schemaname = 'public'", dbname="postgres")}

    assert {"employees", "emp_cdc", "cdc_offset"} <= tables("source")
    assert {"employees", "cdc_applied"} <= tables("dest")
    assert query("source", "SELECT tgname, tgenabled FROM pg_trigger WHERE tgname LIKE 'employee_audit%' "
                           "ORDER BY tgname", dbname="postgres") == [
        ("employee_audit_insert_trigger", "O"), ("employee_audit_trigger", "O")]
    assert query("source", "SELECT id FROM cdc_offset", dbname="postgres") == [(1,)]


def test_step2_password_authentication_is_required(services):
    import psycopg2
    for port in PORTS.values():
        try:
            psycopg2.connect(host="localhost", port=port, user="postgres", password="wrong",
                             dbname="postgres", connect_timeout=5)
        except psycopg2.OperationalError as error:
            assert "password authentication failed" in str(error)
        else:
            raise AssertionError(f"port {port} accepted a wrong password")


def test_steps3_to_5_insert_update_delete(pipeline):
    producer, consumer = pipeline.producer(), pipeline.consumer()
    insert((100, "Test", "User", "1990-01-01", "Test City", 50000))
    pipeline.wait_for_equal()
    producer.wait_for_log("Successfully published 1 records. Offset saved: 1")
    consumer.wait_for_log("INSERT operation completed for emp_id=100")
    [message] = pipeline.messages()
    # The seed's lines, in the seed's order, the delivery line naming where the message is.
    lines = [line.split(" INFO ", 1)[1] for line in producer.log().splitlines() if " INFO " in line]
    published = lines.index("Published CDC record: action_id=1, emp_id=100, action=INSERT")
    assert lines[published:published + 3] == [
        "Published CDC record: action_id=1, emp_id=100, action=INSERT",
        f"Message delivered to {pipeline.topic} [{message['partition']}] at offset 0",
        "Successfully published 1 records. Offset saved: 1"]
    assert message["key"] == b"100"
    assert json.loads(message["value"]) == {
        "action_id": 1, "emp_id": 100, "first_name": "Test", "last_name": "User",
        "dob": "1990-01-01", "city": "Test City", "salary": 50000, "action": "INSERT"}

    insert((101, "Alice", "Smith", "1985-05-15", "New York", 75000))
    query("source", "UPDATE employees SET salary = 80000, city = 'Boston' WHERE emp_id = 101")
    wait_until(lambda: query("dest", "SELECT city, salary FROM employees WHERE emp_id = 101")
               == [("Boston", 80000)], 30, "the UPDATE to reach the destination", pipeline.daemons)
    consumer.wait_for_log("UPDATE operation completed for emp_id=101")

    query("source", "DELETE FROM employees WHERE emp_id = 101")
    wait_until(lambda: query("dest", "SELECT 1 FROM employees WHERE emp_id = 101") == [],
               30, "the DELETE to reach the destination", pipeline.daemons)
    consumer.wait_for_log("DELETE operation completed for emp_id=101")
    assert employees("dest") == [(100, "Test", "User", "1990-01-01", "Test City", 50000)]


def test_step6_producer_restart_resumes_without_republishing(pipeline):
    producer = pipeline.producer()
    pipeline.consumer()
    insert(*SEED_ROWS)
    pipeline.wait_for_equal()
    assert producer.stop() == 0
    assert "CDC Producer stopped." in producer.log()

    restarted = pipeline.producer("producer-restarted")
    assert "Loaded offset: 3" in restarted.log()
    insert((102, "Bob", "Jones", "1992-03-20", "Chicago", 60000))
    pipeline.wait_for_equal()
    restarted.wait_for_log("Published CDC record: action_id=4, emp_id=102, action=INSERT")
    assert sorted(published_action_ids(pipeline)) == [1, 2, 3, 4]


def test_many_small_transactions_log_at_most_100_records_a_second(pipeline):
    producer, consumer = pipeline.producer(), pipeline.consumer()
    with closing(connect("source")) as db, db.cursor() as cursor:
        db.autocommit = True
        for emp_id in range(1, 1501):
            cursor.execute("INSERT INTO employees (emp_id, first_name, salary) VALUES (%s, 'Quick', 1)",
                           (emp_id,))
    pipeline.wait_for_equal()
    wait_until(lambda: sum(map(int, re.findall(r"Successfully processed (\d+) messages",
                                               consumer.log()))) == 1500,
               30, "the consumer to report 1,500 changes processed", pipeline.daemons)
    for daemon, line in ((producer, "Published CDC record: "), (consumer, "Consuming: "),
                         (consumer, " operation completed for emp_id=")):
        # A log line starts with its time to the second; RecordLines counts by seconds of
        # time.monotonic(), so one clock second may hold parts of two of its seconds.
        per_second = Counter(entry[:19] for entry in daemon.log().splitlines() if line in entry)
        assert 0 < sum(per_second.values()) < 1500, (line, per_second)
        assert max(per_second.values()) <= 2 * config.RECORD_LINES_PER_SECOND, (line, per_second)


def test_consumer_restart_loses_nothing(pipeline):
    pipeline.producer()
    consumer = pipeline.consumer()
    insert(SEED_ROWS[0])
    pipeline.wait_for_equal()
    assert consumer.stop() == 0
    assert "CDC Consumer stopped." in consumer.log()
    insert(*SEED_ROWS[1:])
    query("source", "UPDATE employees SET salary = salary + 1")
    pipeline.consumer("consumer-restarted")
    assert len(pipeline.wait_for_equal()) == 3


def test_step8_consumer_group_offsets_and_lag(pipeline):
    pipeline.producer()
    pipeline.consumer()
    insert(*SEED_ROWS)
    pipeline.wait_for_equal()
    total = len(pipeline.messages())

    def caught_up():
        result = run_script(pipeline, "admin.py", "group")
        rows = [line.split() for line in result.stdout.splitlines() if line.startswith(pipeline.topic)]
        committed = sum(int(row[2]) for row in rows if row[2] != "-")
        return result.returncode == 0 and len(rows) == 3 and committed == total \
            and all(row[4] == "0" for row in rows) and result.stdout

    output = wait_until(caught_up, 20, "admin.py group to show every offset committed")
    assert f"Consumer group: {pipeline.group}" in output and "members: 1" in output


def test_step9_several_rows_then_update_and_delete(pipeline):
    pipeline.producer()
    pipeline.consumer()
    query("source", "INSERT INTO employees (emp_id, first_name, last_name, dob, city, salary) "
                    "VALUES (%s, %s, %s, %s, %s, %s), (%s, %s, %s, %s, %s, %s), "
                    "(%s, %s, %s, %s, %s, %s)", [value for row in SEED_ROWS for value in row])
    pipeline.wait_for_equal()
    query("source", "UPDATE employees SET salary = 75000 WHERE emp_id = 200")
    query("source", "DELETE FROM employees WHERE emp_id = 202")
    pipeline.wait_for_equal()
    assert query("dest", "SELECT emp_id, first_name, salary FROM employees ORDER BY emp_id") == [
        (200, "David", 75000), (201, "Emma", 70000)]


def test_test_pipeline_script_passes_against_a_running_pipeline(pipeline):
    pipeline.producer()
    pipeline.consumer()
    result = run_script(pipeline, "test_pipeline.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Results: 7/7 tests passed" in result.stdout
    assert "All tests passed!" in result.stdout


def test_test_pipeline_reads_what_comes_while_it_starts_reading(pipeline):
    """Test 7 looks up where the DLQ stood, then reads from there: a record parked
    between the lookup and the reader's assignment is read too (CI once missed one)."""
    import test_pipeline
    run = test_pipeline.Run(test_pipeline.parse_settings(
        ["--bootstrap-servers", KAFKA, "--topic", pipeline.topic, "--dlq-topic", pipeline.dlq_topic]))
    producer = Producer({"bootstrap.servers": KAFKA})

    class ParkedMeanwhile:
        """The reader, with a record parked right after it looked up where to start."""

        def __init__(self, reader):
            self.reader = reader

        def __getattr__(self, name):
            return getattr(self.reader, name)

        def offsets_for_times(self, *args, **kwargs):
            starts = self.reader.offsets_for_times(*args, **kwargs)
            producer.produce(pipeline.dlq_topic, value=b"parked meanwhile")
            assert producer.flush(10) == 0
            return starts

    reader = test_pipeline.kafka_reader(run)
    try:
        test_pipeline.assign_since_start(run, ParkedMeanwhile(reader), pipeline.dlq_topic)
        deadline, values = time.monotonic() + 10, []
        while not values and time.monotonic() < deadline:
            values = [message.value() for message in reader.consume(10, 0.2) if not message.error()]
        assert values == [b"parked meanwhile"]
    finally:
        reader.close()


def test_test_pipeline_script_fails_without_a_consumer(pipeline):
    pipeline.producer()
    result = run_script(pipeline, "test_pipeline.py", "--timeout", "3")
    assert result.returncode == 1
    assert "✗ FAIL: INSERT Replication" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_admin_without_arguments_lists_the_topics(pipeline):
    result = run_script(pipeline, "admin.py")
    assert result.returncode == 0
    assert f"  {pipeline.topic} (3 partitions)" in result.stdout
    assert f"  {pipeline.dlq_topic} (1 partition)" in result.stdout


def test_the_producer_purges_only_published_changes_past_their_retention(pipeline):
    producer = pipeline.producer(CDC_RETENTION_HOURS="1")
    insert(*SEED_ROWS)
    producer.wait_for_log("Offset saved: 3")
    assert producer.stop() == 0
    backdate = "UPDATE emp_cdc SET changed_at = now() - interval '2 hours' WHERE action_id = ANY(%s)"
    query("source", backdate, ([1, 2],))
    # Old, but committed while no producer ran: not published yet, so it must stay.
    insert((102, "Bob", "Jones", "1992-03-20", "Chicago", 60000))
    query("source", backdate, ([4],))

    restarted = pipeline.producer("producer-restarted", CDC_RETENTION_HOURS="1")
    restarted.wait_for_log("Offset saved: 4")
    assert "Purged 2 published changes older than 1 hours from emp_cdc." in restarted.log()
    assert [row[0] for row in query("source", "SELECT action_id FROM emp_cdc ORDER BY 1")] == [3, 4]
    assert sorted(published_action_ids(pipeline)) == [1, 2, 3, 4]
