#!/usr/bin/env python3
"""End-to-end check of a running CDC pipeline. Run it while producer.py and
consumer.py are running, with the same settings (flags, environment or .env):

    python test_pipeline.py [--timeout SECONDS]

It makes changes in the source and watches them arrive:
  1 Database Connections  the source and the destination answer
  2 CDC Trigger           an INSERT into employees adds its row to emp_cdc
  3 INSERT Replication    an inserted employee appears in the destination
  4 UPDATE Replication    its new city and salary follow
  5 DELETE Replication    its removal follows
  6 Offset Tracking       cdc_offset.last_action_id covers that INSERT, and the
                          change is on the main topic exactly once
  7 DLQ                   a malformed message sent to the main topic lands in the
                          DLQ with its reason, and a change behind it still replicates

Every wait polls until --timeout seconds have passed. The test employees get
emp_ids from 888800000 up, derived from the process id; what the run inserts it
deletes again through the source, so the destination follows. The malformed
message of test 7 stays in the main topic and the DLQ, as Kafka keeps what it got.

Exit status: 0 if every test passed, 1 otherwise.
"""

import argparse
import json
import os
import sys
import time
from collections import namedtuple
from dataclasses import astuple, replace

import psycopg2
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

import config
import dlq
from employee import Employee

SETTING_GROUPS = ("source", "dest", "kafka")
LABELS = {"source": "source", "dest": "destination"}
LINE = "=" * 60

FIRST_TEST_ID = 888_800_000
IDS_PER_RUN = 3  # test 2's employee, the one of tests 3 to 6, the one after test 7's bad message
POLL_INTERVAL = 0.2  # seconds between looks while waiting
# Kafka timestamps come from the clock of the host that produced the message; reading
# from a little before the start absorbs a difference between that clock and ours.
# Older messages cannot match: the tests look for this run's action_id and key.
CLOCK_SKEW_MS = 10_000
AUDIT_TRIGGERS = ("employee_audit_trigger", "employee_audit_insert_trigger")
# Cut short: no JSON parser accepts it.
MALFORMED_VALUE = b'{"note": "malformed on purpose by test_pipeline.py", "emp_id": '

EMPLOYEE_COLUMNS = "emp_id, first_name, last_name, dob::text, city, salary"
INSERT_EMPLOYEE = ("INSERT INTO employees (emp_id, first_name, last_name, dob, city, salary) "
                   "VALUES (%s, %s, %s, %s, %s, %s)")
SELECT_EMPLOYEE = f"SELECT {EMPLOYEE_COLUMNS} FROM employees WHERE emp_id = %s"
CHANGES_AFTER = (f"SELECT action_id, {EMPLOYEE_COLUMNS}, action FROM emp_cdc "
                 "WHERE emp_id = %s AND action_id > %s ORDER BY action_id")

Check = namedtuple("Check", "title name function")


class CheckFailed(Exception):
    """A check that did not hold; the message says what was expected and what was found."""


class Run:
    """What the tests share: the settings, the database connections, the test
    employees, and what earlier tests leave for later ones."""

    def __init__(self, settings):
        self.settings = settings
        self.timeout = settings.timeout
        self.started_ms = int(time.time() * 1000)  # Kafka timestamps are in milliseconds
        first_id = FIRST_TEST_ID + os.getpid() % 100_000 * IDS_PER_RUN
        self.trigger_id, self.replication_id, self.after_dlq_id = range(first_id, first_id + IDS_PER_RUN)
        self.connections = {}
        self.inserted = []  # emp_ids inserted into the source and not deleted yet
        self.employee = None  # the employee of tests 3 to 5, as the source has it
        self.insert_action_id = None  # the action_id of test 3's INSERT
        self.insert_replicated = False

    def db(self, side):
        try:
            return self.connections[side]
        except KeyError:
            raise CheckFailed(f"No connection to the {LABELS[side]} database (see test 1)") from None


# --- helpers ------------------------------------------------------------------

def wait_for(fetch, accept, timeout):
    """Calls fetch() until accept() takes its value or timeout seconds have passed.
    Returns the last value and the seconds it took, None for those at the deadline."""
    started = time.monotonic()
    while True:
        value = fetch()
        waited = time.monotonic() - started
        if accept(value):
            return value, waited
        if waited >= timeout:
            return value, None
        time.sleep(POLL_INTERVAL)


def insert_employee(run, employee):
    """Inserts an employee into the source; returns the emp_cdc rows its INSERT added."""
    with run.db("source").cursor() as cursor:
        # The INSERT takes its action_id after this read, so it is above every one
        # there now, including those of earlier runs with the same emp_id.
        cursor.execute("SELECT COALESCE(MAX(action_id), 0) FROM emp_cdc")
        last_action_id = cursor.fetchone()[0]
        cursor.execute(INSERT_EMPLOYEE, astuple(employee))
        run.inserted.append(employee.emp_id)
        print(f"✓ Record inserted in source database (emp_id={employee.emp_id})")
        cursor.execute(CHANGES_AFTER, (employee.emp_id, last_action_id))
        return cursor.fetchall()


def destination_row(run, emp_id):
    with run.db("dest").cursor() as cursor:
        cursor.execute(SELECT_EMPLOYEE, (emp_id,))
        return cursor.fetchone()


def wait_for_destination(run, emp_id, expected, action, outcome):
    """Waits until the destination's row of emp_id is expected (None: no row)."""
    print(f"  Waiting up to {run.timeout:g} seconds for replication...")
    found, took = wait_for(lambda: destination_row(run, emp_id), lambda row: row == expected,
                           run.timeout)
    if took is None:
        raise CheckFailed(f"{action} replication failed - after {run.timeout:g} seconds the "
                         f"destination has {found or 'no row'} for emp_id={emp_id}, "
                         f"expected {expected or 'no row'}")
    print(f"✓ {action} replication successful - {outcome} (after {took:.1f} s)")


def employee_in_destination(run, action):
    """Test 3's employee, which an UPDATE or DELETE needs in the destination: without
    it there, a missing row or old values would prove nothing."""
    if run.employee is None:
        raise CheckFailed(f"No employee to {action}: test 3 inserted none")
    if destination_row(run, run.employee.emp_id) is None:
        raise CheckFailed(f"Cannot check {action}: employee {run.employee.emp_id} of test 3 "
                         "never reached the destination")
    return run.employee


def kafka_reader(run):
    # librdkafka wants a group.id; with assign() and no commits this one never
    # joins a group or stores an offset.
    return Consumer(config.kafka_config(run.settings, **{
        "group.id": f"test-pipeline-{os.getpid()}", "enable.auto.commit": False}))


def assign_since_start(run, reader, topic):
    """Assigns reader every partition of topic from the first message produced since
    the run started (its end before this call, if none was); returns the assignment."""
    topics = reader.list_topics(timeout=run.timeout).topics
    if topic not in topics:
        raise CheckFailed(f"Topic {topic!r} does not exist")
    since_ms = run.started_ms - CLOCK_SKEW_MS
    # The ends are taken before the lookup by time: a partition with nothing since the
    # start is read from that end, so a message that comes meanwhile is read too (from
    # the end librdkafka finds at assignment, a DLQ record parked by then was missed).
    ends = {partition: reader.get_watermark_offsets(TopicPartition(topic, partition),
                                                    timeout=run.timeout)[1]
            for partition in topics[topic].partitions}
    starts = reader.offsets_for_times(
        [TopicPartition(topic, partition, since_ms) for partition in topics[topic].partitions],
        timeout=run.timeout)
    for start in starts:
        if start.error is not None:
            raise KafkaException(start.error)
        if start.offset < 0:
            start.offset = ends[start.partition]
    reader.assign(starts)
    return starts


def messages_since_start(run, topic):
    """The messages of topic produced since the run started, up to the end of each
    partition as it is now."""
    reader = kafka_reader(run)
    try:
        ends = {}
        for start in assign_since_start(run, reader, topic):
            end = reader.get_watermark_offsets(start, timeout=run.timeout)[1]
            if start.offset < end:
                ends[start.partition] = end
        messages = []
        deadline = time.monotonic() + run.timeout
        while ends:
            if time.monotonic() > deadline:
                raise CheckFailed(f"Could not read {topic} to its end within {run.timeout:g} seconds")
            for message in reader.consume(500, timeout=POLL_INTERVAL):
                if message.error():
                    raise KafkaException(message.error())
                messages.append(message)
                partition = message.partition()
                if partition in ends and message.offset() + 1 >= ends[partition]:
                    del ends[partition]
        return messages
    finally:
        reader.close()


def json_object(message):
    """A message's value as a JSON object, or None if it is not one."""
    try:
        value = json.loads(message.value())
    except (TypeError, ValueError):  # no value, not UTF-8, or not JSON
        return None
    return value if isinstance(value, dict) else None


def produce_malformed(run, key):
    """Produces the malformed message to the main topic; returns its partition and offset."""
    producer = Producer(config.producer_config(run.settings, "test-pipeline"))
    reports = []
    producer.produce(run.settings.topic, key=key, value=MALFORMED_VALUE,
                     on_delivery=lambda error, message: reports.append((error, message)))
    if producer.flush(run.timeout):
        producer.purge()  # so that it is not sent after the test has given up on it
        raise CheckFailed(f"Kafka did not acknowledge the malformed message within "
                         f"{run.timeout:g} seconds")
    error, message = reports[0]
    if error is not None:
        raise CheckFailed(f"Kafka refused the malformed message: {error.str()}")
    return message.partition(), message.offset()


def wait_for_dlq_record(run, key):
    """The DLQ record of the message with this key, and the seconds it took to come;
    (None, None) if none came within the timeout."""
    reader = kafka_reader(run)
    try:
        assign_since_start(run, reader, run.settings.dlq_topic)
        started = time.monotonic()
        while time.monotonic() - started < run.timeout:
            for message in reader.consume(100, timeout=POLL_INTERVAL):
                if message.error():
                    raise KafkaException(message.error())
                record = json_object(message)
                if record is not None and dlq.original(record, "original_key") == key:
                    return record, time.monotonic() - started
        return None, None
    finally:
        reader.close()


# --- the tests ----------------------------------------------------------------

def check_connections(run):
    unreachable = []
    for side in ("source", "dest"):
        label = LABELS[side].capitalize()
        location = config.database_name(run.settings, side)
        try:
            connection = config.connect(run.settings, side, application_name="test-pipeline",
                                        options="-c DateStyle=ISO")
        except psycopg2.Error as error:
            unreachable.append(f"{label} database connection: FAILED ({location}: "
                               f"{config.one_line(error)})")
            continue
        # Each statement commits at once, so the producer sees a change as soon as it
        # is made, and each poll of the destination sees its newest commits.
        connection.autocommit = True
        run.connections[side] = connection
        print(f"✓ {label} database connection: OK ({location})")
    if unreachable:
        raise CheckFailed("; ".join(unreachable))


def check_trigger(run):
    with run.db("source").cursor() as cursor:
        cursor.execute("SELECT tgname FROM pg_trigger WHERE tgname = ANY(%s) "
                       "AND tgrelid = 'employees'::regclass", (list(AUDIT_TRIGGERS),))
        missing = set(AUDIT_TRIGGERS) - {name for (name,) in cursor.fetchall()}
        if missing:
            raise CheckFailed(f"Trigger {', '.join(sorted(missing))} does not exist on employees "
                             "(apply scripts/source/init.sql)")
    employee = Employee(run.trigger_id, "Trigger", "Check", "1990-01-01", "Test City", 50000)
    changes = insert_employee(run, employee)
    if not changes:
        raise CheckFailed(f"CDC trigger did not work - no emp_cdc row for the INSERT of "
                         f"emp_id={employee.emp_id}")
    action_id, *captured, action = changes[0]
    if (tuple(captured), action) != (astuple(employee), "INSERT"):
        raise CheckFailed(f"CDC record action_id={action_id} holds {action} {tuple(captured)}, "
                         f"expected INSERT {astuple(employee)}")
    print(f"✓ CDC trigger is working - new CDC record created (action_id={action_id})")


def check_insert(run):
    employee = Employee(run.replication_id, "Test", "User", "1990-01-01", "Test City", 50000)
    changes = insert_employee(run, employee)
    run.employee = employee
    if changes:
        run.insert_action_id = changes[-1][0]
    wait_for_destination(run, employee.emp_id, astuple(employee), "INSERT",
                         "record found in destination")
    run.insert_replicated = True


def check_update(run):
    employee = replace(employee_in_destination(run, "UPDATE"), city="Boston", salary=80000)
    with run.db("source").cursor() as cursor:
        cursor.execute("UPDATE employees SET city = %s, salary = %s WHERE emp_id = %s",
                       (employee.city, employee.salary, employee.emp_id))
        if cursor.rowcount != 1:
            raise CheckFailed(f"Employee {employee.emp_id} is no longer in the source")
    run.employee = employee
    print(f"✓ Record updated in source database (emp_id={employee.emp_id}, "
          f"city={employee.city!r}, salary={employee.salary})")
    wait_for_destination(run, employee.emp_id, astuple(employee), "UPDATE",
                         "record updated in destination")


def check_delete(run):
    employee = employee_in_destination(run, "DELETE")
    with run.db("source").cursor() as cursor:
        cursor.execute("DELETE FROM employees WHERE emp_id = %s", (employee.emp_id,))
    run.inserted.remove(employee.emp_id)
    run.employee = None
    print(f"✓ Record deleted from source database (emp_id={employee.emp_id})")
    wait_for_destination(run, employee.emp_id, None, "DELETE", "record removed from destination")


def check_offset_tracking(run):
    # A replicated change has been published, so the topic read to its current end
    # must hold it.
    if not (run.insert_replicated and run.insert_action_id):
        raise CheckFailed("Cannot check: the INSERT of test 3 did not replicate")
    action_id, topic = run.insert_action_id, run.settings.topic

    def saved_offset():
        with run.db("source").cursor() as cursor:
            cursor.execute("SELECT last_action_id FROM cdc_offset WHERE id = 1")
            row = cursor.fetchone()
            return None if row is None else row[0]

    print(f"  Waiting up to {run.timeout:g} seconds for cdc_offset to reach action_id={action_id}...")
    # The producer saves its offset just after Kafka acknowledged, which can be a
    # moment after the consumer applied the change.
    last_action_id, took = wait_for(saved_offset, lambda last: last is not None and last >= action_id,
                                    run.timeout)
    if took is None:
        raise CheckFailed(f"cdc_offset.last_action_id is {last_action_id} after {run.timeout:g} "
                         f"seconds, below action_id={action_id} of the replicated INSERT")
    print(f"✓ Offset saved: last_action_id={last_action_id} covers action_id={action_id} "
          f"(after {took:.1f} s)")

    copies = [message for message in messages_since_start(run, topic)
              if (json_object(message) or {}).get("action_id") == action_id]
    places = ", ".join(f"partition {copy.partition()} offset {copy.offset()}" for copy in copies)
    if len(copies) != 1:
        raise CheckFailed(f"Change action_id={action_id} is in {topic} {len(copies)} times"
                         f"{' (' + places + ')' if copies else ''}, expected exactly once")
    expected_key = str(run.replication_id).encode()
    if copies[0].key() != expected_key:
        raise CheckFailed(f"Change action_id={action_id} has key {copies[0].key()!r}, "
                         f"expected {expected_key!r} (its emp_id)")
    print(f"✓ Change action_id={action_id} published to {topic} exactly once ({places})")


def check_dlq(run):
    settings = run.settings
    # Both databases are needed at the end: fail now rather than after the Kafka part.
    for side in ("source", "dest"):
        run.db(side)
    # Keyed by the emp_id of the change made afterwards, the bad message lands in the
    # same partition, so that change has to get past it.
    key = str(run.after_dlq_id).encode()
    partition, offset = produce_malformed(run, key)
    print(f"✓ Malformed message sent to {settings.topic} (key={key.decode()}, "
          f"partition {partition}, offset {offset})")

    print(f"  Waiting up to {run.timeout:g} seconds for it in {settings.dlq_topic}...")
    record, took = wait_for_dlq_record(run, key)
    if record is None:
        raise CheckFailed(f"No DLQ record with original_key={key.decode()} in "
                         f"{settings.dlq_topic} after {run.timeout:g} seconds")
    expected = {"original_topic": settings.topic, "partition": partition, "offset": offset}
    found = {field: record.get(field) for field in expected}
    if found != expected:
        raise CheckFailed(f"DLQ record has {found}, expected {expected}")
    error = record.get("error")
    if "json" not in str(error).lower():
        raise CheckFailed(f"DLQ record's error does not name the JSON problem: {error!r}")
    print(f"✓ DLQ record found (after {took:.1f} s): error {error!r}")

    employee = Employee(run.after_dlq_id, "After", "Malformed", "1990-01-01", "Test City", 50000)
    insert_employee(run, employee)
    wait_for_destination(run, employee.emp_id, astuple(employee), "INSERT",
                         "a change made after the malformed message still replicates")


# Named check_*, not test_*, so that pytest run in this directory leaves them alone.
CHECKS = [
    Check("Database Connections", "Database Connections", check_connections),
    Check("CDC Trigger Functionality", "CDC Trigger", check_trigger),
    Check("INSERT Operation Replication", "INSERT Replication", check_insert),
    Check("UPDATE Operation Replication", "UPDATE Replication", check_update),
    Check("DELETE Operation Replication", "DELETE Replication", check_delete),
    Check("Offset Tracking", "Offset Tracking", check_offset_tracking),
    Check("DLQ (Dead Letter Queue)", "DLQ", check_dlq),
]


# --- running ------------------------------------------------------------------

def banner(title):
    print()
    print(LINE)
    print(title)
    print(LINE)


def failure_reason(error):
    if isinstance(error, CheckFailed):
        return str(error)
    if isinstance(error, KafkaException):  # its text is the repr of a KafkaError
        return f"Kafka: {error.args[0].str()}"
    return f"{type(error).__name__}: {config.one_line(error)}"


def run_check(number, check, run):
    """Runs one test; a test that raises has failed, and says why in one line."""
    banner(f"TEST {number}: {check.title}")
    try:
        check.function(run)
    except Exception as error:
        print(f"✗ {failure_reason(error)}")
        return False
    return True


def clean_up(run):
    """Deletes through the source the employees the run inserted and did not delete,
    so that the pipeline removes them from the destination too."""
    if run.inserted:
        ids = ", ".join(map(str, run.inserted))
        print()
        try:
            with run.db("source").cursor() as cursor:
                cursor.execute("DELETE FROM employees WHERE emp_id = ANY(%s)", (run.inserted,))
            print(f"Cleanup: deleted test employees {ids} from the source database")
        except (CheckFailed, psycopg2.Error) as error:
            print(f"Cleanup failed ({failure_reason(error)}); delete employees {ids} "
                  "from the source database yourself")
    for connection in run.connections.values():
        connection.close()


def print_summary(results):
    banner("TEST SUMMARY")
    for name, passed in results:
        print(f"{'✓ PASS' if passed else '✗ FAIL'}: {name}")
    passed = sum(passed for _, passed in results)
    print()
    print(LINE)
    print(f"Results: {passed}/{len(results)} tests passed")
    print(LINE)
    print()
    if passed == len(results):
        print("All tests passed! Your CDC pipeline is working correctly.")
    else:
        print(f"{len(results) - passed} of {len(results)} tests failed. Check that producer.py "
              "and consumer.py are running with these settings, and read their logs.")


def parse_settings(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                        help="longest wait for each replication, offset or DLQ record [default: 30]")
    config.add_settings(parser, *SETTING_GROUPS)
    arguments = parser.parse_args(argv)
    if arguments.timeout <= 0:
        parser.error("--timeout must be above 0")
    return config.resolve(arguments, *SETTING_GROUPS)


def main(argv):
    settings = parse_settings(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows at once through a pipe too
    print(LINE)
    print("CDC Pipeline Verification Tests")
    print(LINE)
    run = Run(settings)
    try:
        results = [(check.name, run_check(number, check, run)) for number, check in enumerate(CHECKS, 1)]
    except KeyboardInterrupt:
        print("\nInterrupted.")
        return 1
    finally:
        clean_up(run)
    print_summary(results)
    return 0 if all(passed for _, passed in results) else 1


if __name__ == "__main__":
    config.run_cli(main)
