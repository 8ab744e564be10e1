"""Reading the DLQ and replaying its records to the main topic: `admin.py dlq replay`
and the consumer's re-drive after an outage share this.

Both read the DLQ as it goes, never all of it at once, and replay it a chunk at a
time: each chunk's original keys and values are republished, then a marker written to
the DLQ names the chunk's records as ranges of offsets (at most REPLAY_CHUNK of them,
so far below Kafka's 1 MB). A marker comes after its chunk is acknowledged: a crash in
between replays the chunk again, which the consumer's version gate makes harmless.
"""

import json
import math
import time
from bisect import bisect_right
from collections import defaultdict, deque
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from itertools import groupby

from confluent_kafka import Consumer, KafkaException, TopicPartition

import config
import dlq

TIMEOUT = 10  # seconds for any answer from Kafka
REPLAYED = "dlq.replayed"  # header of the marker records
REPLAYED_FROM = "dlq.replayed_from"  # header of a replayed message: dlq topic:partition:offset
# Records replayed, then marked, at a time, fewer when their values reach
# REPLAY_CHUNK_BYTES: a consumer re-driving 100,000 records peaked at 499 MB when all
# were read first, 95 MB with chunks of 5,000, 79 MB with 1,000.
REPLAY_CHUNK = 1000
REPLAY_CHUNK_BYTES = 4_000_000
# Messages read from the DLQ per call: READ_BATCH at most, fewer while they are large,
# so that a call's messages come to about READ_BYTES. A call fills its whole count as
# the prefetch refills behind it: 1,000 records of 100 KB a call took a reader to 218 MB.
READ_BATCH = 1000
READ_BYTES = 4_000_000
READ_FIRST = 10  # messages asked for first, before their size is known
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


class ReplayedPositions:
    """The DLQ positions its markers say were replayed, as runs of offsets per
    partition: records replayed in offset order take one run however many they are,
    where a set of a million positions takes 124 MB."""

    def __init__(self):
        self.runs = defaultdict(list)  # partition: [(first, last)]

    def add(self, partition, first, last):
        self.runs[partition].append((first, last))

    def merge(self):
        """Sorts and joins the runs added; before any `in`."""
        for partition, runs in self.runs.items():
            merged = []
            for first, last in sorted(runs):
                if merged and first <= merged[-1][1] + 1:
                    merged[-1] = (merged[-1][0], max(merged[-1][1], last))
                else:
                    merged.append((first, last))
            self.runs[partition] = merged

    def __contains__(self, position):
        partition, offset = position
        runs = self.runs.get(partition, [])
        index = bisect_right(runs, (offset, math.inf)) - 1
        return index >= 0 and runs[index][0] <= offset <= runs[index][1]


class Positions:
    """DLQ positions in the order they were read, as runs of consecutive offsets, so
    that a million records shown take a few runs, not a million entries; with a
    `limit`, only the last `limit` of them."""

    def __init__(self, limit=None):
        self.runs = deque()  # of [partition, first, last]
        self.limit = limit
        self.count = 0

    def append(self, position):
        partition, offset = position
        last_run = self.runs[-1] if self.runs else None
        if last_run is not None and last_run[0] == partition and last_run[2] == offset - 1:
            last_run[2] = offset
        else:
            self.runs.append([partition, offset, offset])
        self.count += 1
        if self.limit and self.count > self.limit:
            first_run = self.runs[0]
            if first_run[1] == first_run[2]:
                self.runs.popleft()
            else:
                first_run[1] += 1
            self.count -= 1


def _reader(settings):
    # It prefetches a few MB, not librdkafka's 64 MB: the consumer re-drives in its own
    # process.
    return Consumer(config.kafka_config(settings, **{
        "group.id": READER_GROUP, "enable.auto.commit": False,
        "queued.max.messages.kbytes": 4096, "max.partition.fetch.bytes": 262144,
        "fetch.queue.backoff.ms": 10}))


def _entry(message):
    return DlqEntry(message.partition(), message.offset(), message.key(), message.value(),
                    {name: value.decode("utf-8", "replace") for name, value in message.headers() or []})


@contextmanager
def read_dlq(settings):
    """The DLQ as (replayed, entries): the positions its markers say were replayed,
    read first, and its other records oldest first, read as `entries` is iterated,
    so that a reader's memory stays small whatever the DLQ holds."""
    reader = _reader(settings)
    try:
        topic = reader.list_topics(settings.dlq_topic, timeout=TIMEOUT).topics[settings.dlq_topic]
        if topic.error is not None:
            raise ReplayError(f"DLQ topic {settings.dlq_topic!r}: {topic.error.str()}")
        partitions = sorted(topic.partitions)
        replayed = ReplayedPositions()
        for message in _read_partitions(reader, settings.dlq_topic, partitions):
            if _is_marker(message):
                for partition, first, last in _replayed_ranges(json.loads(message.value())):
                    replayed.add(partition, first, last)
        replayed.merge()
        yield replayed, (_entry(message) for message in _read_partitions(reader, settings.dlq_topic, partitions)
                         if not _is_marker(message))
    finally:
        reader.close()


def read_newest_first(settings, positions, summarize):
    """summarize(entry) of the DLQ's records at `positions` (Positions), newest first.
    They are read again a window of READ_BATCH at a time, oldest first within it, and
    only their summaries are kept until the window is handed over reversed: records of
    up to a megabyte each never pile up."""
    reader = _reader(settings)
    try:
        for partition, first, last in reversed(positions.runs):
            window_last = last
            while window_last >= first:
                window_first = max(first, window_last - READ_BATCH + 1)
                summaries = [summarize(_entry(message)) for message in _read_partition(
                    reader, settings.dlq_topic, partition, window_first, window_last)]
                yield from reversed(summaries)
                window_last = window_first - 1
    finally:
        reader.close()


def _is_marker(message):
    return any(name == REPLAYED for name, _ in message.headers() or [])


def _read_partitions(reader, topic, partitions):
    for partition in partitions:
        yield from _read_partition(reader, topic, partition)


def _read_partition(reader, topic, partition, first=0, last=None):
    """The partition's messages from offset `first` to `last` (its end if None), of
    those it still holds."""
    low, high = reader.get_watermark_offsets(TopicPartition(topic, partition), timeout=TIMEOUT)
    start, stop = max(low, first), high - 1 if last is None else min(high - 1, last)
    if start > stop:
        return
    reader.assign([TopicPartition(topic, partition, start)])
    read_any = False
    count = READ_FIRST
    asked_since = time.monotonic()
    while True:
        # consume() waits its whole timeout for a batch it cannot fill: short waits,
        # so that a DLQ of a few records is read at once.
        messages = reader.consume(count, READ_WAIT)
        if not messages:
            if time.monotonic() - asked_since > TIMEOUT:
                raise ReplayError(f"{topic} [{partition}]: no answer from Kafka in {TIMEOUT} s")
            continue
        size = sum(len(message) for message in messages)  # len(): the value's bytes
        count = max(1, min(READ_BATCH, READ_BYTES * len(messages) // max(size, 1)))
        for message in messages:
            if message.error():
                raise KafkaException(message.error())
            offset = message.offset()
            if offset < start or (offset > stop and not read_any):
                continue  # fetched for an assignment before this one
            if offset > stop:
                return
            read_any = True
            yield message
            if offset == stop:
                return
        # From here: the time the caller took over the batch (a replay) is not Kafka's.
        asked_since = time.monotonic()


def _replayed_ranges(marker):
    # "replayed": [[partition, offset], ...] is the form markers had before the ranges.
    for partition, offset in marker.get("replayed", []):
        yield partition, offset, offset
    yield from marker.get("replayed_ranges", [])


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
    """Replays the entries (an iterable, read as it goes) a chunk at a time; returns how
    many were replayed, or raises ReplayError, the chunks before it marked replayed."""
    replayed = 0
    for chunk in _chunks(entries):
        _replay_chunk(settings, producer, chunk)
        replayed += len(chunk)
    return replayed


def _chunks(entries):
    chunk, size = [], 0
    for entry in entries:
        chunk.append(entry)
        size += len(entry.value or b"")
        if len(chunk) == REPLAY_CHUNK or size >= REPLAY_CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _replay_chunk(settings, producer, entries):
    messages = [(dlq.original(entry.record, "original_key"), dlq.original(entry.record, "original_value"),
                 [(REPLAYED_FROM, f"{settings.dlq_topic}:{entry.partition}:{entry.offset}")])
                for entry in entries]
    refused = config.deliver(producer, settings.topic, messages)
    if refused:
        raise ReplayError(f"{settings.topic} refused {len(refused)} of {len(messages)} "
                          f"messages ({refused[0][0].str()}); those were not marked replayed")
    marker = json.dumps({"replayed_ranges": offset_ranges(entries), "to_topic": settings.topic,
                         "timestamp": time.time()}).encode()
    if config.deliver(producer, settings.dlq_topic, [(None, marker, [(REPLAYED, b"1")])]):
        raise ReplayError(f"replayed {len(entries)} messages, but could not mark them in "
                          f"{settings.dlq_topic}; a second replay will send those again")
