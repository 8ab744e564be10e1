"""The DLQ at scale, replayed by admin.py dlq replay and by the consumer's re-drive, and
listed by admin.py dlq list: the markers and the memory stay bounded however many
records there are, and what was replayed is never sent again."""

import json
import re
import sys

from confluent_kafka import Consumer, Producer, TopicPartition

from conftest import KAFKA, ROOT, query, run_with_peak_kib, wait_until
from test_dlq import admin
from test_guarantees import peak_rss_mb

PARKED = 100_000


def park(pipeline, count, headers=None, city=None):
    """DLQ records as the consumer writes them; every other one's error says 'odd'."""
    producer = Producer({"bootstrap.servers": KAFKA, "linger.ms": 50})
    for number in range(count):
        change = {"action_id": number + 1, "emp_id": number + 1, "first_name": "F", "last_name": "L",
                  "dob": None, "city": city, "salary": 1, "action": "INSERT"}
        record = {"original_topic": pipeline.topic, "original_key": str(number + 1),
                  "original_value": json.dumps(change), "error": "odd" if number % 2 else "even",
                  "partition": 0, "offset": number, "timestamp": 1.0}
        while True:
            try:
                producer.produce(pipeline.dlq_topic, key=str(number + 1).encode(),
                                 value=json.dumps(record).encode(), headers=headers)
                break
            except BufferError:
                producer.poll(0.1)
    assert producer.flush(60) == 0


def end_offsets(topic):
    reader = Consumer({"bootstrap.servers": KAFKA, "group.id": "end-offsets"})
    try:
        partitions = reader.list_topics(topic, timeout=10).topics[topic].partitions
        return [reader.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions]
    finally:
        reader.close()


def read_from(topic, partition, offset):
    """The messages of a partition from an offset to its end."""
    reader = Consumer({"bootstrap.servers": KAFKA, "group.id": "read-from"})
    try:
        end = reader.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)[1]
        reader.assign([TopicPartition(topic, partition, offset)])
        messages = []
        while len(messages) < end - offset:
            # No more than are left: consume() waits its whole timeout for a batch it cannot fill.
            batch = reader.consume(min(1000, end - offset - len(messages)), 10)
            assert batch, f"reading {topic} [{partition}]"
            messages += batch
        return messages
    finally:
        reader.close()


def test_replay_of_100000_parked_records_marks_them_all(pipeline):
    park(pipeline, PARKED)
    # Every other record: 50,000 ranges of one offset, more than one marker holds.
    odd = admin(pipeline, "dlq", "replay", "--error", "odd", timeout=300)
    assert odd.returncode == 0, odd.stderr
    assert f"Replayed {PARKED // 2} messages" in odd.stdout
    rest = admin(pipeline, "dlq", "replay", timeout=300)
    assert rest.returncode == 0, rest.stderr
    assert f"Replayed {PARKED // 2} messages" in rest.stdout
    assert (admin(pipeline, "dlq", "replay", timeout=300).stdout.strip()
            == f"Nothing to replay from {pipeline.dlq_topic}.")

    assert sum(end_offsets(pipeline.topic)) == PARKED
    markers = read_from(pipeline.dlq_topic, 0, PARKED)
    assert all(dict(marker.headers())["dlq.replayed"] == b"1" for marker in markers)
    assert len(markers) == 100  # each replay: 50,000 records, a marker per 1,000
    assert max(len(marker.value()) for marker in markers) < 200_000


def test_consumer_redrives_100000_parked_records_within_100_mb(pipeline):
    # As the consumer parks what the destination did not answer for.
    park(pipeline, PARKED, headers={"dlq.stage": "consumer", "dlq.error_class": "OperationalError",
                                    "dlq.attempts": "4"})
    consumer = pipeline.consumer(REDRIVE_INTERVAL="1")
    consumer.wait_for_log(f"re-drove {PARKED} messages", timeout=300)
    wait_until(lambda: query("dest", "SELECT count(*) FROM employees") == [(PARKED,)], 300,
               "the re-driven changes in the destination", [consumer])
    assert peak_rss_mb(consumer) <= 100
    assert admin(pipeline, "dlq", "count").stdout.strip() == "0"


def admin_with_peak_mb(pipeline, *args):
    """admin.py's exit code, output and peak resident memory (MB)."""
    result, peak_kib = run_with_peak_kib([sys.executable, str(ROOT / "admin.py"), *args],
                                         env=pipeline.env, timeout=300)
    assert not result.stderr, result.stderr
    return result.returncode, result.stdout, peak_kib / 1024


def test_dlq_list_of_150_mb_of_records_is_newest_first_within_100_mb(pipeline):
    # 1,500 records of 100 KB; the one of key 100 replayed (a marker after them all),
    # then a message with no value: the records to list are offsets 0-98, 100-1499 and
    # 1501, the second run read back in two windows of READ_BATCH.
    park(pipeline, 1500, city="x" * 100_000)
    assert "Replayed 1 messages" in admin(pipeline, "dlq", "replay", "--key", "100", timeout=120).stdout
    producer = Producer({"bootstrap.servers": KAFKA})
    producer.produce(pipeline.dlq_topic, key=b"no value", value=None)
    assert producer.flush(10) == 0

    code, listing, peak_mb = admin_with_peak_mb(pipeline, "dlq", "list")
    assert code == 0, listing
    assert listing.startswith(f"1500 DLQ record(s) in {pipeline.dlq_topic} not yet replayed")
    assert listing.split("\n\n")[1] == "[0] offset 1501: not a DLQ record: b''"
    assert re.findall(r"key=(\d+)", listing) == [str(key) for key in range(1500, 0, -1) if key != 100]
    assert peak_mb <= 100, f"admin.py dlq list peaked at {peak_mb:.0f} MB"

    code, listing, _ = admin_with_peak_mb(pipeline, "dlq", "list", "--all", "--limit", "1402")
    assert code == 0, listing
    assert listing.startswith(f"1501 DLQ record(s) in {pipeline.dlq_topic}\n")
    assert re.findall(r"key=(\d+)", listing) == [str(key) for key in range(1500, 99, -1)]
    assert len(re.findall(r"\(replayed\)", listing)) == 1
    assert re.search(r"key=100 .*\(replayed\)", listing)
