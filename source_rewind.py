"""A source that went back in time: restored from a dump, re-created, or failed over to
a standby that lagged. Its transaction ids may start again below the producer's stored
snapshot (the producer would take every new change for published, and the purge would
delete them), and its action_ids again below those already on the topic (the consumer
would skip every new change as older than one it applied).

went_back() finds it, for the producer to stop on; renumber() (`python admin.py
renumber-source`) sets the source to carry on: it renumbers emp_cdc above every
action_id on the topic, keeping its order, and has the producer publish all of it again.
"""

import json
import uuid

from confluent_kafka import Consumer, TopicPartition

import config

TIMEOUT = 10  # seconds for any answer from Kafka

IDENTITY = """
SELECT format('%s/%s/%s', (pg_control_system()).system_identifier,
              (pg_control_checkpoint()).timeline_id,
              (SELECT oid FROM pg_database WHERE datname = current_database()))
"""

# The stored snapshot ends past the server's transaction ids: the server's history
# is older than the one the watermark was taken in. The source's identity (cluster,
# timeline, database) differs from the stored one after a restore into another cluster
# or database, a re-creation or a failover: then its action_ids are checked against
# the topic's, which costs a read of Kafka, so only then.
POSITIONS = """
SELECT GREATEST(pg_snapshot_xmax(snapshot), pg_snapshot_xmax(batch_snapshot))::text,
       pg_snapshot_xmax(pg_current_snapshot())::text,
       (SELECT last_value FROM emp_cdc_action_id_seq),
       source_identity IS DISTINCT FROM (""" + IDENTITY + """)
FROM cdc_offset WHERE id = 1
"""
SAVE_IDENTITY = "UPDATE cdc_offset SET source_identity = (" + IDENTITY + ") WHERE id = 1"

# Writers wait (SHARE conflicts with their ROW EXCLUSIVE) so that no change is numbered
# in the old range while this runs. Every change kept moves above `above`, in order;
# its txid becomes 1, older than any snapshot, and the watermark starts again, so the
# producer publishes all of emp_cdc anew; the consumer applies them as the newest.
RENUMBER = """
LOCK TABLE employees IN SHARE MODE;
LOCK TABLE emp_cdc IN EXCLUSIVE MODE;
UPDATE emp_cdc
SET action_id = action_id + (SELECT GREATEST(%(above)s, max(action_id)) - min(action_id) + 1 FROM emp_cdc),
    txid = '1';
SELECT setval('emp_cdc_action_id_seq',
              GREATEST((SELECT max(action_id) FROM emp_cdc), %(above)s + 1));
UPDATE cdc_offset
SET snapshot = '1:1:', batch_snapshot = NULL, batch_action_id = 0, last_action_id = 0,
    source_identity = NULL
WHERE id = 1;
SELECT count(*), COALESCE(min(action_id), 0), COALESCE(max(action_id), 0) FROM emp_cdc;
"""


def went_back(cursor, settings):
    """What shows that the source went back in time, in a few words, or None."""
    cursor.execute(POSITIONS)
    stored_xmax, server_xmax, last_action_id, new_identity = cursor.fetchone()
    if int(stored_xmax) > int(server_xmax):
        return (f"its transaction ids went back (the producer's watermark was taken at "
                f"{stored_xmax}, the server is at {server_xmax})")
    if not new_identity:
        return None
    on_topic = newest_action_id(settings, whole_topic=False)
    if on_topic > last_action_id:
        return (f"its action_ids went back ({settings.topic} has action_id {on_topic}, "
                f"the source numbers from {last_action_id})")
    cursor.execute(SAVE_IDENTITY)
    return None


def newest_action_id(settings, whole_topic):
    """The largest action_id of the changes on the topic: in the last message of each
    partition, or with `whole_topic` in every message. 0 for an empty topic."""
    reader = Consumer(config.kafka_config(settings, **{
        "group.id": f"cdc-rewind-{uuid.uuid4().hex}", "enable.auto.commit": False,
        "fetch.wait.max.ms": 10}))
    try:
        newest = 0
        for message in _messages(reader, settings.topic, whole_topic):
            try:
                newest = max(newest, int(json.loads(message.value())["action_id"]))
            except (TypeError, ValueError, KeyError):
                pass  # not a change: a hostile or broken message, parked by the consumer
        return newest
    finally:
        reader.close()


def _messages(reader, topic, whole_topic):
    """The messages of every partition read at once, from the start or the last one."""
    ends, starts = {}, []
    for partition in reader.list_topics(topic, timeout=TIMEOUT).topics[topic].partitions:
        low, high = reader.get_watermark_offsets(TopicPartition(topic, partition), timeout=TIMEOUT)
        if high > low:
            ends[partition] = high - 1
            starts.append(TopicPartition(topic, partition, low if whole_topic else high - 1))
    reader.assign(starts)
    while ends:
        message = reader.poll(TIMEOUT)
        if message is None:
            raise config.ConfigError(f"{topic}: no answer from Kafka in {TIMEOUT} s")
        if message.error():
            continue
        yield message
        if message.offset() >= ends.get(message.partition(), float("inf")):
            del ends[message.partition()]


def renumber(settings, producer_lock):
    """Sets a source that went back in time to carry on; returns (changes, first, last
    action_id) of what the producer publishes again."""
    above = newest_action_id(settings, whole_topic=True)
    db = config.connect(settings, "source", application_name="cdc-admin-renumber")
    try:
        with db.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", (producer_lock,))
            if not cursor.fetchone()[0]:
                raise config.ConfigError(f"a producer is publishing from "
                                         f"{config.database_name(settings, 'source')}; stop it first")
            cursor.execute(RENUMBER, {"above": above})
            result = cursor.fetchone()
        db.commit()
        return result
    finally:
        db.close()
