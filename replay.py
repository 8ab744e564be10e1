"""Reading the DLQ and replaying its records to the main topic: `admin.py dlq replay`
and the consumer's re-drive after an outage share this.

A replay republishes each record's original key and value, then writes markers to
the DLQ naming the records replayed, as ranges of offsets, at most MARKER_RANGES a
marker, so that a marker stays far below Kafka's 1 MB whatever is replayed. The
markers come after the replayed messages are acknowledged: a crash in between
replays them again, which the consumer's version gate makes harmless.
"""

import json
import time
from dataclasses import dataclass
from functools import cached_property
from itertools import groupby

from confluent_kafka import Consumer, KafkaException, TopicPartition

import config
import dlq

TIMEOUT = 10  # seconds for any answer from Kafka
REPLAYED = "dlq.replayed"  # header of the marker records
REPLAYED_FROM = "dlq.replayed_from"  # header of a replayed message: dlq topic:partition:offset
MARKER_RANGES = 5000  # ranges of offsets per marker: under 100 KB, the broker takes 1 MB
READ_BATCH = 1000  # messages read from the DLQ per call
READ_WAIT = 0.2  # seconds a call waits for them
# The group.id the DLQ's readers carry (admin.py dlq, the consumer's re-drive): they
# commit nothing, but librdkafka needs one, and a broker with ACLs must allow it.
READER_GROUP = "cdc-dlq-reader"


class ReplayError(Exception):
    """Kafka did not take the replay, or its markers; the message says which."""


@dataclass
class DlqEntry:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict

    @cached_property
    def record(self):
        """The DLQ record's JSON, or None if this is not one."""
        try:
            record = json.loads(self.value)
        except (TypeError, ValueError):
            return None
        return record if isinstance(record, dict) and "original_topic" in record else None

    @property
    def position(self):
        return self.partition, self.offset


def read_dlq(settings):
    """The DLQ's records oldest first, without the markers, and the set of
    (partition, offset) the markers say were replayed."""
    reader = Consumer(config.kafka_config(settings, **{
        "group.id": READER_GROUP, "enable.auto.commit": False}))
    try:
        topic = reader.list_topics(settings.dlq_topic, timeout=TIMEOUT).topics[settings.dlq_topic]
        if topic.error is not None:
            raise ReplayError(f"DLQ topic {settings.dlq_topic!r}: {topic.error.str()}")
        entries, replayed = [], set()
        for partition in sorted(topic.partitions):
            for message in _read_partition(reader, settings.dlq_topic, partition):
                headers = {name: value.decode("utf-8", "replace")
                           for name, value in message.headers() or []}
                if REPLAYED in headers:
                    replayed.update(_replayed_positions(json.loads(message.value())))
                else:
                    entries.append(DlqEntry(partition, message.offset(), message.key(),
                                            message.value(), headers))
        return entries, replayed
    finally:
        reader.close()


def _read_partition(reader, topic, partition):
    low, high = reader.get_watermark_offsets(TopicPartition(topic, partition), timeout=TIMEOUT)
    if high <= low:
        return
    reader.assign([TopicPartition(topic, partition, low)])
    last_answer = time.monotonic()
    while True:
        # consume() waits its whole timeout for a batch it cannot fill: short waits,
        # so that a DLQ of a few records is read at once.
        messages = reader.consume(READ_BATCH, READ_WAIT)
        if not messages:
            if time.monotonic() - last_answer > TIMEOUT:
                raise ReplayError(f"{topic} [{partition}]: no answer from Kafka in {TIMEOUT} s")
            continue
        last_answer = time.monotonic()
        for message in messages:
            if message.error():
                raise KafkaException(message.error())
            yield message
            if message.offset() >= high - 1:
                return


def _replayed_positions(marker):
    # "replayed": [[partition, offset], ...] is the form markers had before the ranges.
    for partition, offset in marker.get("replayed", []):
        yield partition, offset
    for partition, first, last in marker.get("replayed_ranges", []):
        for offset in range(first, last + 1):
            yield partition, offset


def offset_ranges(entries):
    """The entries' positions as [partition, first, last] runs of consecutive offsets."""
    positions = sorted(entry.position for entry in entries)
    ranges = []
    for partition, offsets in groupby(positions, key=lambda position: position[0]):
        for _, run in groupby(enumerate(offset for _, offset in offsets),
                              key=lambda item: item[1] - item[0]):
            run = [offset for _, offset in run]
            ranges.append([partition, run[0], run[-1]])
    return ranges


def replay(settings, producer, entries):
    """Republishes the entries' originals to the main topic and marks them replayed;
    raises ReplayError if Kafka did not take them all."""
    messages = [(dlq.original(entry.record, "original_key"), dlq.original(entry.record, "original_value"),
                 [(REPLAYED_FROM, f"{settings.dlq_topic}:{entry.partition}:{entry.offset}")])
                for entry in entries]
    refused = config.deliver(producer, settings.topic, messages)
    if refused:
        raise ReplayError(f"{settings.topic} refused {len(refused)} of {len(messages)} "
                          f"messages ({refused[0][0].str()}); nothing was marked replayed")
    ranges = offset_ranges(entries)
    markers = [(None, json.dumps({"replayed_ranges": ranges[start:start + MARKER_RANGES],
                                  "to_topic": settings.topic, "timestamp": time.time()}).encode(),
                [(REPLAYED, b"1")])
               for start in range(0, len(ranges), MARKER_RANGES)]
    if config.deliver(producer, settings.dlq_topic, markers):
        raise ReplayError(f"replayed {len(entries)} messages, but could not mark them all in "
                          f"{settings.dlq_topic}; a second replay will send those again")
