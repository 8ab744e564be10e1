"""The pipeline on one screen (`admin.py status`): producer, Kafka, consumer group,
destination and DLQ, and one verdict for cron or a probe: exit 0 healthy, 1 degraded
(end-to-end lag over STATUS_MAX_LAG, or more than STATUS_MAX_DLQ records waiting in the
DLQ), 2 down (a database or Kafka unreachable, no producer, no consumer).

The end-to-end lag is the age of the oldest change committed in the source and not yet
applied: the oldest unpublished change in emp_cdc, or the oldest message past a
partition's committed offset (its Kafka timestamp). 0 when the pipeline has caught up.
"""

import json
import time

import psycopg2
from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

import config
import replay
from producer import PRODUCER_LOCK

TIMEOUT = 5  # seconds for any answer

# Who holds the producer lock: an advisory lock on a bigint key shows in pg_locks as
# its high and low 32 bits, with objsubid 1.
PRODUCER = """
SELECT a.pid, a.application_name, COALESCE(host(a.client_addr), 'local'),
       EXTRACT(epoch FROM now() - a.backend_start)
FROM pg_locks l JOIN pg_stat_activity a USING (pid)
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.classid = (%(key)s >> 32)::oid AND l.objid = (%(key)s & 4294967295)::oid
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""

# The changes committed and not yet published: not visible in the watermark's
# snapshot (a txid below its xmin was visible), and not among those of the open batch
# already acknowledged.
UNPUBLISHED = """
SELECT o.last_action_id, count(c.action_id), EXTRACT(epoch FROM now() - min(c.changed_at))
FROM cdc_offset o
LEFT JOIN emp_cdc c
  ON c.txid >= pg_snapshot_xmin(o.snapshot)
 AND NOT pg_visible_in_snapshot(c.txid, o.snapshot)
 AND NOT (o.batch_snapshot IS NOT NULL AND pg_visible_in_snapshot(c.txid, o.batch_snapshot)
          AND c.action_id <= o.batch_action_id)
WHERE o.id = 1
GROUP BY o.last_action_id
"""

NEWEST_APPLIED = """
SELECT max(last_action_id), EXTRACT(epoch FROM now() - max(applied_at)) FROM cdc_applied
"""


def run(settings):
    report = {"producer": _section(_producer, settings), "kafka": _section(_kafka, settings),
              "destination": _section(_destination, settings)}
    # The DLQ is on the same brokers: a probe that found Kafka failing answers now
    # rather than after another timeout.
    report["dlq"] = ({"error": "not read, as Kafka failed above"} if "error" in report["kafka"]
                     else _section(_dlq, settings))
    report["lag_seconds"] = max([report["producer"].get("oldest_unpublished_seconds") or 0,
                                 report["kafka"].get("oldest_unconsumed_seconds") or 0])
    report["problems"], report["state"] = _verdict(report, settings)
    if settings.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report, settings)
    return {"healthy": 0, "degraded": 1, "down": 2}[report["state"]]


def _section(collect, settings):
    try:
        return collect(settings)
    except (psycopg2.Error, KafkaException, replay.ReplayError) as error:
        return {"error": config.one_line(error)}


def _query(settings, side, sql, params=None):
    db = config.connect(settings, side, application_name="cdc-status")
    try:
        with db.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall()
    finally:
        db.close()


def _producer(settings):
    holders = _query(settings, "source", PRODUCER, {"key": PRODUCER_LOCK})
    [(watermark, unpublished, oldest)] = _query(settings, "source", UNPUBLISHED)
    holder = None
    if holders:
        pid, application, host, seconds = holders[0]
        holder = {"pid": pid, "application": application, "host": host,
                  "connected_seconds": round(float(seconds))}
    return {"running": holder is not None, "lock_holder": holder, "watermark": watermark,
            "unpublished": unpublished,
            "oldest_unpublished_seconds": None if oldest is None else round(float(oldest), 1)}


def _kafka(settings):
    reader = Consumer(config.kafka_config(settings, **{
        "group.id": settings.group, "enable.auto.commit": False, "socket.timeout.ms": TIMEOUT * 1000}))
    try:
        topic = reader.list_topics(settings.topic, timeout=TIMEOUT).topics[settings.topic]
        if topic.error is not None:
            raise KafkaException(topic.error)
        partitions = [TopicPartition(settings.topic, p) for p in sorted(topic.partitions)]
        ends = [reader.get_watermark_offsets(tp, timeout=TIMEOUT)[1] for tp in partitions]
        committed = reader.committed(partitions, timeout=TIMEOUT)
        rows, oldest = [], None
        for tp, end, done in zip(partitions, ends, committed):
            position = done.offset if done.offset >= 0 else 0
            rows.append({"partition": tp.partition, "end": end, "committed": done.offset,
                         "lag": end - position})
            if end > position:
                age = _message_age(reader, tp.partition, position, settings.topic)
                oldest = age if oldest is None else max(oldest, age)
    finally:
        reader.close()
    members = _members(settings)
    return {"topic": settings.topic, "group": settings.group, "members": members,
            "partitions": rows, "oldest_unconsumed_seconds": oldest}


def _message_age(reader, partition, offset, topic):
    """Seconds since the message at the offset was produced."""
    reader.assign([TopicPartition(topic, partition, offset)])
    message = reader.poll(TIMEOUT)
    if message is None or message.error():
        return 0.0
    return round(max(time.time() - message.timestamp()[1] / 1000, 0), 1)


def _members(settings):
    admin = AdminClient(config.kafka_config(settings))
    group = admin.describe_consumer_groups([settings.group], request_timeout=TIMEOUT)[settings.group]
    return [{"client_id": member.client_id, "host": member.host,
             "partitions": sorted(tp.partition for tp in member.assignment.topic_partitions)}
            for member in group.result().members]


def _destination(settings):
    [(action_id, seconds)] = _query(settings, "dest", NEWEST_APPLIED)
    return {"newest_applied_action_id": action_id,
            "applied_seconds_ago": None if seconds is None else round(float(seconds), 1)}


def _dlq(settings):
    waiting, oldest = 0, None
    with replay.read_dlq(settings) as (replayed, entries):
        for entry in entries:
            if entry.position not in replayed:
                waiting += 1
                parked_at = (entry.record or {}).get("timestamp") or time.time()
                oldest = parked_at if oldest is None else min(oldest, parked_at)
    return {"topic": settings.dlq_topic, "not_replayed": waiting,
            "oldest_seconds": None if oldest is None else round(time.time() - oldest, 1)}


def _verdict(report, settings):
    down = [f"{name}: {section['error']}" for name, section in report.items()
            if isinstance(section, dict) and "error" in section]
    if "error" not in report["producer"] and not report["producer"]["running"]:
        down.append("producer: no producer holds the producer lock")
    if "error" not in report["kafka"] and not report["kafka"]["members"]:
        down.append(f"consumer: group {settings.group} has no members")
    if down:
        return down, "down"
    degraded = []
    if report["lag_seconds"] > settings.status_max_lag:
        degraded.append(f"lag: {report['lag_seconds']} s, over STATUS_MAX_LAG ({settings.status_max_lag:g} s)")
    if report["dlq"]["not_replayed"] > settings.status_max_dlq:
        degraded.append(f"dlq: {report['dlq']['not_replayed']} record(s) not replayed, over "
                        f"STATUS_MAX_DLQ ({settings.status_max_dlq})")
    return degraded, "degraded" if degraded else "healthy"


def _seconds(value):
    return "-" if value is None else f"{value:g} s"


def _print(report, settings):
    print(f"Pipeline: {report['state'].upper()}")
    for problem in report["problems"]:
        print(f"  ! {problem}")
    producer, kafka, dest, dlq = (report[name] for name in ("producer", "kafka", "destination", "dlq"))
    if "error" not in producer:
        holder = producer["lock_holder"]
        print("Producer     " + (f"running: pid {holder['pid']} ({holder['application']}) on {holder['host']}, "
                                 f"connected {holder['connected_seconds']} s" if holder else "NOT RUNNING"))
        print(f"             watermark: action_id {producer['watermark']}; unpublished: "
              f"{producer['unpublished']} (oldest {_seconds(producer['oldest_unpublished_seconds'])})")
    if "error" not in kafka:
        partitions = kafka["partitions"]
        print(f"Kafka        {kafka['topic']} end offsets: "
              + "  ".join(f"[{p['partition']}] {p['end']}" for p in partitions))
        print(f"Consumers    {kafka['group']}: {len(kafka['members'])} member(s); lag: "
              + "  ".join(f"[{p['partition']}] {p['lag']}" for p in partitions)
              + f" (oldest unconsumed {_seconds(kafka['oldest_unconsumed_seconds'])})")
    if "error" not in dest:
        newest = dest["newest_applied_action_id"]
        print("Destination  " + ("no change applied yet" if newest is None else
                                 f"newest applied: action_id {newest}, "
                                 f"{_seconds(dest['applied_seconds_ago'])} ago"))
    print(f"Lag          end-to-end: {report['lag_seconds']:g} s (STATUS_MAX_LAG {settings.status_max_lag:g} s)")
    if "error" not in dlq:
        print(f"DLQ          {dlq['not_replayed']} record(s) not yet replayed in {dlq['topic']}"
              f" (oldest {_seconds(dlq['oldest_seconds'])}; STATUS_MAX_DLQ {settings.status_max_dlq})")
