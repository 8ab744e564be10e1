"""The DLQ loses nothing: every bad input named and parked without blocking the rest,
outages retried then parked, replay restoring the destination."""

import json
import subprocess
import sys
import time
from datetime import datetime
from types import SimpleNamespace

import pytest
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic

import config
import dlq

from conftest import KAFKA, PORTS, ROOT, Pipeline, employees, query, stack, wait_until


def change(emp_id, action_id=1, action="INSERT", **fields):
    return {"action_id": action_id, "emp_id": emp_id, "first_name": "Valid", "last_name": "Change",
            "dob": "1990-01-01", "city": "Oslo", "salary": 1000, "action": action, **fields}


def encoded(data):
    return json.dumps(data).encode()


def without(field, data):
    return {name: value for name, value in data.items() if name != field}


def dlq_records(pipeline):
    """The DLQ's records, without the markers `dlq replay` adds."""
    records = [{**json.loads(m["value"]), "headers": {k: v.decode() for k, v in m["headers"].items()}}
               for m in pipeline.messages(pipeline.dlq_topic)]
    return [record for record in records if "original_topic" in record]


def admin(pipeline, *args, timeout=60):
    """admin.py run with the pipeline's settings; never a traceback."""
    result = subprocess.run([sys.executable, str(ROOT / "admin.py"), *args], env=pipeline.env,
                            capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def set_max_message_bytes(topic, size):
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=[
        ConfigEntry("max.message.bytes", str(size), incremental_operation=AlterConfigOpType.SET)])
    client = AdminClient({"bootstrap.servers": KAFKA})
    for future in client.incremental_alter_configs([resource]).values():
        future.result()


# --- every kind of bad message, produced straight to the main topic ------------------

BAD_MESSAGES = {
    "malformed_json": (b"7001", b'{"action_id": 1, "emp_id": 7001', "malformed JSON"),
    "not_utf8": (b"7002", b'\xff\xfe{"emp_id": 7002}', "value is not UTF-8"),
    "missing_emp_id": (b"7003", encoded(without("emp_id", change(7003))), "emp_id: missing"),
    "null_emp_id": (b"7004", encoded(change(None)), "emp_id: missing or null"),
    "missing_field": (b"7005", encoded(without("city", change(7005))), "city: missing"),
    "wrong_type": (b"7006", encoded(change(7006, salary="abc")), 'salary: expected an integer, got "abc"'),
    "impossible_date": (b"7007", encoded(change(7007, dob="2023-02-30")),
                        "dob: '2023-02-30' is not a valid date"),
    "unknown_action": (b"7008", encoded(change(7008, action="MERGE")),
                       'action: "MERGE" is not one of INSERT, UPDATE, DELETE'),
    "too_long": (b"7009", encoded(change(7009, first_name="x" * 101)),
                 "first_name: 101 characters, longer than the column's 100"),
    "empty": (b"7010", b"", "empty message"),
    "no_key": (None, encoded(change(7011)), "message has no key"),
    "key_mismatch": (b"7012", encoded(change(7099)), "key '7012' does not match emp_id 7099"),
    "nan": (b"7013", b'{"action_id": 1, "emp_id": 7013, "salary": NaN}', "NaN is not a JSON value"),
    "key_not_utf8": (b"\xff7014", encoded(change(7014)), "does not match emp_id 7014"),
}


@pytest.fixture(scope="module")
def running(services, tmp_path_factory):
    """One consumer for all the bad messages: each must not stop the ones after it."""
    pipeline = Pipeline("dlq_inputs", tmp_path_factory.mktemp("dlq"))
    query("dest", "ALTER TABLE employees ADD CONSTRAINT salary_not_negative CHECK (salary >= 0)")
    pipeline.consumer()
    yield pipeline
    pipeline.close()
    query("dest", "ALTER TABLE employees DROP CONSTRAINT salary_not_negative")


def assert_parked_and_next_applied(pipeline, key, value, expected_error, next_emp_id):
    partition, offset = pipeline.produce(key, value)
    pipeline.produce(str(next_emp_id).encode(), encoded(change(next_emp_id)))
    wait_until(lambda: query("dest", "SELECT 1 FROM employees WHERE emp_id = %s", (next_emp_id,)),
               30, f"emp_id {next_emp_id}, sent after the bad message, to be applied", pipeline.daemons)
    [record] = wait_until(lambda: [r for r in dlq_records(pipeline)
                                   if (r["partition"], r["offset"]) == (partition, offset)],
                          30, "the bad message in the DLQ", pipeline.daemons)
    assert expected_error in record["error"]
    assert record["original_topic"] == pipeline.topic
    assert isinstance(record["timestamp"], float)
    assert record["headers"]["dlq.stage"] == "consumer"
    assert record["headers"]["dlq.attempts"] == "1"
    # The exact bytes, as text where they are UTF-8 and in base64 where not.
    assert dlq.original(record, "original_key") == key
    assert dlq.original(record, "original_value") == value
    for field, data in (("original_key", key), ("original_value", value)):
        utf8 = data is None or data.decode("utf-8", "replace").encode() == data
        assert (record.get(f"{field}_encoding") == "base64") == (not utf8), field
    return record


@pytest.mark.parametrize("kind", BAD_MESSAGES)
def test_bad_message_is_parked_and_the_next_is_applied(running, kind):
    key, value, expected_error = BAD_MESSAGES[kind]
    next_emp_id = 8000 + list(BAD_MESSAGES).index(kind)
    record = assert_parked_and_next_applied(running, key, value, expected_error, next_emp_id)
    assert record["headers"]["dlq.error_class"] == "InvalidChange"


def test_constraint_violation_is_parked_and_the_next_is_applied(running):
    record = assert_parked_and_next_applied(running, b"7100", encoded(change(7100, salary=-5)),
                                            'violates check constraint "salary_not_negative"', 8100)
    assert record["headers"]["dlq.error_class"] == "CheckViolation"


def test_parked_offsets_were_committed(pipeline):
    """Restarted, the consumer parks nothing twice: the bad message's offset was committed."""
    consumer = pipeline.consumer()
    partition, offset = pipeline.produce(b"7001", b"{not json")
    wait_until(lambda: dlq_records(pipeline), 30, "the bad message in the DLQ", [consumer])
    assert consumer.stop() == 0
    assert pipeline.committed_offsets()[partition] == offset + 1
    again = pipeline.consumer("consumer-again")
    pipeline.produce(b"8200", encoded(change(8200)))
    wait_until(lambda: query("dest", "SELECT 1 FROM employees WHERE emp_id = 8200"), 30,
               "a change after the restart", [again])
    assert len(dlq_records(pipeline)) == 1


def test_offsets_wait_until_the_dlq_has_the_reject(pipeline):
    consumer = pipeline.consumer()
    [future] = pipeline.admin.delete_topics([pipeline.dlq_topic]).values()
    future.result()
    wait_until(lambda: pipeline.dlq_topic not in pipeline.admin.list_topics(timeout=10).topics, 30,
               "the DLQ to be deleted")
    partition, offset = pipeline.produce(b"7001", b"{not json")
    consumer.wait_for_log("Invalid message in")
    time.sleep(6)  # longer than the 5 s between librdkafka's offset commits
    assert pipeline.committed_offsets().get(partition, 0) <= offset, "the offset moved past a reject the DLQ never took"
    assert "Message sent to DLQ" not in consumer.log()
    [future] = pipeline.admin.create_topics([NewTopic(pipeline.dlq_topic, 1, 1)]).values()
    future.result()
    [record] = wait_until(lambda: dlq_records(pipeline), 60, "the reject in the DLQ once it exists", [consumer])
    assert (record["partition"], record["offset"]) == (partition, offset)
    wait_until(lambda: pipeline.committed_offsets().get(partition) == offset + 1, 30,
               "the offset to move past the reject once the DLQ has it", [consumer])
    pipeline.produce(b"8300", encoded(change(8300)))
    wait_until(lambda: query("dest", "SELECT 1 FROM employees WHERE emp_id = 8300"), 30,
               "the change after it", [consumer])


def test_admin_dlq_filters_and_counts(pipeline):
    pipeline.consumer()
    # 7001 is parked first: keys on other partitions may be consumed in any order.
    pipeline.produce(b"7001", b"{cut")
    wait_until(lambda: len(dlq_records(pipeline)) == 1, 30, "the first record in the DLQ", pipeline.daemons)
    for key, value in ((b"7002", b"[also cut"), (b"7006", encoded(change(7006, salary="abc"))),
                       (b"7007", encoded(change(7007, dob="2023-02-30")))):
        pipeline.produce(key, value)
    wait_until(lambda: len(dlq_records(pipeline)) == 4, 30, "four records in the DLQ", pipeline.daemons)
    assert admin(pipeline, "dlq", "count").stdout.strip() == "4"
    assert admin(pipeline, "dlq", "count", "--error", "malformed json").stdout.strip() == "2"
    listing = admin(pipeline, "dlq", "list", "--key", "7006").stdout
    assert 'salary: expected an integer, got "abc"' in listing and "7007" not in listing
    newest_first = admin(pipeline, "dlq", "list").stdout
    assert newest_first.index("key=7007") < newest_first.index("key=7001")


def test_replay_filters_by_key_and_error_and_a_content_reject_comes_back(pipeline):
    consumer = pipeline.consumer()
    pipeline.produce(b"7006", encoded(change(7006, salary="abc")))
    pipeline.produce(b"7007", encoded(change(7007, dob="2023-02-30")))
    wait_until(lambda: len(dlq_records(pipeline)) == 2, 30, "two records in the DLQ", [consumer])

    replay = admin(pipeline, "dlq", "replay", "--key", "7006")
    assert f"Replayed 1 messages from {pipeline.dlq_topic}" in replay.stdout
    # Still wrong, so rejected again: a new record for it, the old one marked replayed.
    wait_until(lambda: len(dlq_records(pipeline)) == 3, 30, "the replayed reject back in the DLQ", [consumer])
    assert [r["original_key"] for r in dlq_records(pipeline)] == ["7006", "7007", "7006"]
    assert admin(pipeline, "dlq", "count").stdout.strip() == "2"
    assert admin(pipeline, "dlq", "count", "--key", "7007").stdout.strip() == "1"

    replay = admin(pipeline, "dlq", "replay", "--error", "not a valid date")
    assert f"Replayed 1 messages from {pipeline.dlq_topic}" in replay.stdout
    wait_until(lambda: len(dlq_records(pipeline)) == 4, 30, "the second reject back", [consumer])
    assert [r["original_key"] for r in dlq_records(pipeline)][-1] == "7007"


def test_backoff_is_2_4_8_seconds_then_the_dlq(pipeline):
    # Nothing listens on port 1: every attempt fails at once, so the gaps are the backoff.
    consumer = pipeline.consumer(DEST_DB_PORT="1", RETRY_BACKOFF="2")
    pipeline.produce(b"7400", encoded(change(7400)))
    consumer.wait_for_log("Max retries exceeded. Sending to DLQ.", timeout=60)
    attempts = [datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                for line in consumer.log().splitlines() if "Error processing message (attempt" in line]
    assert len(attempts) == 4
    gaps = [(later - earlier).total_seconds() for earlier, later in zip(attempts, attempts[1:])]
    for gap, backoff in zip(gaps, (2, 4, 8)):
        assert backoff <= gap < backoff + 1.5, gaps
    [record] = wait_until(lambda: dlq_records(pipeline), 30, "the change in the DLQ", [consumer])
    assert record["headers"]["dlq.attempts"] == "4"


@pytest.mark.parametrize("backoff, attempt, seconds", [(2, 1, 2), (2, 2, 4), (2, 3, 8), (2, 6, 60), (2, 30, 60),
                                                        (0.2, 3, 0.8)])
def test_backoff_doubles_and_stops_at_a_minute(backoff, attempt, seconds):
    assert config.backoff_delay(SimpleNamespace(retry_backoff=backoff), attempt) == seconds


# --- the seed's step 7: the destination stops, changes retry, park, and are replayed -----

def test_destination_outage_retries_parks_then_replay_restores(pipeline):
    pipeline.producer()
    # The manual loop: the consumer's own re-drive (tests/test_self_healing.py) is off.
    consumer = pipeline.consumer(REDRIVE_INTERVAL="0")
    query("source", "INSERT INTO employees VALUES (100, 'Test', 'User', '1990-01-01', 'Oslo', 50000)")
    pipeline.wait_for_equal()
    assert stack("down", "dest").returncode == 0
    try:
        query("source", "INSERT INTO employees VALUES (103, 'Charlie', 'Brown', '1988-07-10', 'Seattle', 70000)")
        consumer.wait_for_log("Max retries exceeded. Sending to DLQ.")
        # Twenty changes in one transaction: retried as batches, not one by one.
        query("source", "INSERT INTO employees SELECT g, 'F', 'L', NULL, NULL, g FROM generate_series(1, 20) g")
        query("source", "UPDATE employees SET salary = 1 WHERE emp_id = 100")
        wait_until(lambda: len(dlq_records(pipeline)) == 22, 60, "22 changes in the DLQ", [consumer])
    finally:
        assert stack("up", "dest").returncode == 0
    log = consumer.log()
    assert "Error processing message (attempt 1/4): " in log
    assert "Error processing message (attempt 4/4): " in log
    assert log.count("(attempt 1/4)") <= 5, "an outage costs a retry cycle per batch, not per message"
    assert all(r["headers"]["dlq.attempts"] == "4" and r["headers"]["dlq.error_class"] == "OperationalError"
               and str(PORTS["dest"]) in r["error"] for r in dlq_records(pipeline))

    # Back by itself: a new change is applied without restarting the consumer...
    query("source", "INSERT INTO employees VALUES (104, 'After', 'Outage', NULL, NULL, 1)")
    wait_until(lambda: query("dest", "SELECT 1 FROM employees WHERE emp_id = 104"), 60,
               "the consumer to recover", [consumer])
    # ...and the replay brings back the rest.
    assert admin(pipeline, "dlq", "count").stdout.strip() == "22"
    replay = admin(pipeline, "dlq", "replay")
    assert replay.returncode == 0
    assert f"Replayed 22 messages from {pipeline.dlq_topic} to {pipeline.topic}." in replay.stdout
    pipeline.wait_for_equal()

    # Replaying again sends nothing; forcing it changes nothing either.
    before = query("dest", "SELECT xmin::text, * FROM employees ORDER BY emp_id")
    assert admin(pipeline, "dlq", "replay").stdout.strip() == f"Nothing to replay from {pipeline.dlq_topic}."
    assert admin(pipeline, "dlq", "count").stdout.strip() == "0"
    assert "Replayed 22 messages" in admin(pipeline, "dlq", "replay", "--all").stdout
    wait_until(pipeline.caught_up, 30, "the forced replay to be consumed", [consumer])
    assert query("dest", "SELECT xmin::text, * FROM employees ORDER BY emp_id") == before
    assert employees("dest") == employees("source")


# --- the producer's DLQ -----------------------------------------------------------------

def test_producer_parks_a_change_it_cannot_serialise(pipeline):
    pipeline.consumer()
    producer = pipeline.producer()
    # Rows no trigger writes, put in emp_cdc by hand.
    query("source", "INSERT INTO emp_cdc (emp_id, first_name, action) VALUES (NULL, 'Ghost', 'INSERT'), "
                    "(7, 'Odd', 'MERGE')")
    query("source", "INSERT INTO employees VALUES (1, 'Real', 'One', NULL, NULL, 1)")
    pipeline.wait_for_equal()
    records = wait_until(lambda: len(dlq_records(pipeline)) == 2 and dlq_records(pipeline), 30,
                         "two records in the DLQ", [producer])
    assert [r["headers"]["dlq.stage"] for r in records] == ["producer", "producer"]
    assert "action_id=1: emp_id: missing or null" in records[0]["error"]
    assert 'action_id=2: action: "MERGE" is not one of' in records[1]["error"]
    assert [r["action_id"] for r in records] == [1, 2]
    assert records[0]["partition"] is None and records[0]["offset"] is None
    assert query("source", "SELECT last_action_id FROM cdc_offset") == [(3,)]


def test_producer_parks_a_change_kafka_refuses_for_good(pipeline):
    pipeline.consumer()
    producer = pipeline.producer()
    set_max_message_bytes(pipeline.topic, 200)
    # Letters that do not compress: the record stays over 200 bytes.
    query("source", "INSERT INTO employees VALUES (1, md5('a') || md5('b') || md5('c'), "
                    "md5('d') || md5('e') || md5('f'), NULL, md5('g') || md5('h'), 1)")
    [record] = wait_until(lambda: dlq_records(pipeline), 30, "the large change in the DLQ", [producer])
    assert record["headers"]["dlq.stage"] == "producer"
    assert record["headers"]["dlq.error_class"] == "MSG_SIZE_TOO_LARGE"
    assert json.loads(record["original_value"])["action_id"] == record["action_id"] == 1
    query("source", "INSERT INTO employees VALUES (2, 'Small', 'One', NULL, NULL, 2)")
    wait_until(lambda: query("dest", "SELECT emp_id FROM employees") == [(2,)], 30,
               "the change after it", pipeline.daemons)


def test_producer_never_passes_a_change_that_reached_neither_topic(pipeline):
    pipeline.consumer()
    producer = pipeline.producer()
    set_max_message_bytes(pipeline.topic, 200)
    set_max_message_bytes(pipeline.dlq_topic, 200)
    query("source", "INSERT INTO employees VALUES (1, md5('a') || md5('b') || md5('c'), "
                    "md5('d') || md5('e') || md5('f'), NULL, md5('g') || md5('h'), 1)")
    producer.wait_for_log("reached neither")
    assert query("source", "SELECT last_action_id FROM cdc_offset") == [(0,)]
    set_max_message_bytes(pipeline.dlq_topic, 1000000)
    wait_until(lambda: dlq_records(pipeline), 30, "the change in the DLQ once it takes it", [producer])
    wait_until(lambda: query("source", "SELECT last_action_id FROM cdc_offset") == [(1,)], 30,
               "the watermark to move past it", [producer])
