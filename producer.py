#!/usr/bin/env python3
"""CDC producer: publishes every committed change captured in the source's emp_cdc
to Kafka, keyed by emp_id, as JSON.

Batches are cut by transaction snapshots, the way PgQ cuts them. Every transaction
visible in cdc_offset.snapshot is published; the next batch is the changes of the
transactions visible in a newer snapshot and not in that one. A transaction that took
a small action_id and commits late is published in the batch where it becomes visible,
never skipped; a rolled-back one never is. Within a batch the changes go out in
action_id order, which for one employee is the order of the commits: a second writer
of the same row waits for the first to commit before its trigger numbers its change.

The watermark moves only after Kafka acknowledged what it covers, so a crash
republishes, never skips; the consumer's idempotent apply absorbs the copies.
One producer publishes from a source at a time: a second one waits on an advisory lock
and takes over when the first stops.
"""

import json
import logging
import time
from contextlib import closing

import psycopg2
from confluent_kafka import KafkaError, Producer

import config
import dlq
import metrics
import source_rewind
from employee import CHANGE_FIELDS, Change, InvalidChange

log = logging.getLogger("producer")

PRODUCER_LOCK = 0x62665F636463  # advisory lock key held by the active producer ("bf_cdc")

# `since` is the saved snapshot, or `published`, one the producer has published up to
# and not saved yet. `in_progress` is its xip list, as a literal for FETCH_BATCH: the
# planner then knows how few rows it selects and probes the index. `written` is where
# the source's WAL ends once `until` is taken: every transaction visible in `until`
# wrote its commit record before it. PostgreSQL does not promise an order to the
# expressions of one select list, so `until` is taken in a subquery that OFFSET 0 keeps
# apart, whose row exists before the outer select list is computed.
LOAD_BATCH = """
SELECT since::text, ARRAY(SELECT pg_snapshot_xip(since))::text, until::text,
       batch_action_id, batch_snapshot IS NOT NULL, pg_current_wal_insert_lsn()::text
FROM cdc_offset
CROSS JOIN LATERAL (SELECT COALESCE(%(published)s::pg_snapshot, snapshot) AS since) AS batch
CROSS JOIN LATERAL (SELECT COALESCE(batch_snapshot, pg_current_snapshot()) AS until OFFSET 0) AS taken
WHERE id = 1
"""

# The changes of the transactions visible in `until` and not in `since`. A transaction
# is not visible in `since` when it began at or after its xmax, or was in progress at it
# (its xip list, `in_progress`): two probes of emp_cdc_txid, so a batch reads what it
# holds, however long ago the oldest transaction still open (the xmin of `since`) began.
CHANGE_COLUMNS = "action_id, emp_id, first_name, last_name, dob::text, city, salary, action"
BATCH_CHANGES = """
FROM emp_cdc
WHERE (txid >= pg_snapshot_xmax(%(since)s::pg_snapshot)
       OR txid = ANY (%(in_progress)s::xid8[]))
  AND txid < pg_snapshot_xmax(%(until)s::pg_snapshot)
  AND pg_visible_in_snapshot(txid, %(until)s::pg_snapshot)
  AND action_id > %(after)s
"""
FETCH_BATCH = f"SELECT {CHANGE_COLUMNS} {BATCH_CHANGES} ORDER BY action_id"
# Its first chunk: a batch is most often a few changes, and one statement on the
# autocommit connection reads them all (a server-side cursor took six round trips to
# the source, two fifths of the producer's time at 1,000 changes/s). `+ 0` keeps the
# planner off the primary key: to fill the LIMIT of a large batch it walked emp_cdc
# from its oldest row, through every change still kept (1,000,000 older rows: 313 ms;
# sorted from the txid index: 123 ms).
#
# Each row also says whether the source's WAL is flushed as far as `written`. A writer
# with synchronous_commit = off is visible before its commit is on disk, and a crash
# of the source forgets it; the producer publishes only what the source has flushed, so
# the destination never holds a change the source forgot (one crash of such a source
# under 4 writers left 7 rows in the destination that the source had not). Asked in
# this statement, not one of its own, which saves a round trip per batch; and only as
# far as the WAL went when `until` was taken, not as far as it goes when asked, which
# spares some flushes of WAL that the writers' next commits flush anyway (asked by a
# statement of its own as far as the WAL went then, a third of the batches at 1,000
# changes/s flushed).
FETCH_FIRST = (f"SELECT {CHANGE_COLUMNS}, pg_current_wal_flush_lsn() >= %(written)s::pg_lsn "
               f"{BATCH_CHANGES} ORDER BY action_id + 0 LIMIT %(size)s")
# When the WAL is not flushed that far, a commit of the producer's own flushes it, as
# a synchronous commit flushes all the WAL before its commit record. It writes a
# logical decoding message (any role may, whatever wal_level), because a transaction
# that wrote no WAL commits without a flush. Waiting for the WAL writer instead took up
# to wal_writer_delay (200 ms) whenever WAL followed the last writer's commit with no
# commit after it, such as the pruning of cdc_offset's dead versions by the producer's
# own reads: the 95th percentile of single-row inserts on an idle source was 209-211 ms
# against 6-14 ms.
# `local`: a synchronous standby that is down does not hold publishing back.
FLUSH_FUNCTION = "pg_logical_emit_message(boolean, text, text)"
FLUSH = """
BEGIN;
SET LOCAL synchronous_commit = local;
SELECT pg_logical_emit_message(true, 'cdc-producer', 'flush');
COMMIT
"""

# Whether a transaction not visible in the saved snapshot has committed a change: the
# statement sees only committed rows, so any row past that snapshot is one. The same two
# index probes as FETCH_BATCH, the cheap look the producer repeats while it waits
# (ORDER BY txid LIMIT 1 keeps the first on the index whatever the planner guesses).
NEW_CHANGES = """
WITH saved AS MATERIALIZED (SELECT snapshot FROM cdc_offset WHERE id = 1)
SELECT (SELECT txid FROM emp_cdc WHERE txid >= (SELECT pg_snapshot_xmax(snapshot) FROM saved)
        ORDER BY txid LIMIT 1) IS NOT NULL
    OR EXISTS (SELECT FROM saved, pg_snapshot_xip(snapshot) AS xip
               WHERE EXISTS (SELECT FROM emp_cdc WHERE txid = xip))
"""
# The first wait after a batch: changes that flow are seen within a millisecond or two.
# Each empty look waits a tenth longer, up to POLL_INTERVAL: a change that comes t
# seconds after the last is seen within about t/10, and an idle source is asked
# 1/POLL_INTERVAL times a second.
FIRST_WAIT = 0.001  # seconds
RELAX = 1.1
# After a batch of n changes, fewer than BATCH_SIZE, the producer waits 0.6 n ms (at
# most GATHER_MAX) before it looks again: changes that come one at a time are each
# published at once, and while they pour in each batch gathers up to GATHER_MAX of them.
# Every look, publish and acknowledgement costs the source, Kafka and the consumer about
# the same whatever the batch holds (librdkafka sends one produce request per partition,
# and each wakes the consumer's fetch). At 1,000 changes/s a batch holds 5-10 changes:
# 0.6 ms a change gave p50 6.4 ms against 11.4-12.2 with 1 ms, for 45% more CPU at that
# rate. Under a steady flow of more than about 1,700 changes/s the cap sets how many
# batches a second there are, each costing the pipeline some 6 ms of CPU in all: 8
# pgbench clients of one-row UPDATEs, four interleaved runs each, got 5,772-6,643 tps
# (mean 6,259) with 100 ms against 4,938-6,115 (mean 5,628) with 30 ms, the pipeline
# taking a fifth less CPU; as fast as 8 writers go, p50 96 ms against 44
# (docs/benchmarks.md). The batch after a stall of a slower flow (a checkpoint, a
# pause of the machine) holds what piled up meanwhile: its gather stops at
# GATHER_BURST_MAX; GATHER_MAX applies only after a batch whose gather reached that.
GATHER_PER_CHANGE = 0.0006  # seconds
GATHER_BURST_MAX = 0.03  # seconds
GATHER_MAX = 0.1  # seconds

SAVE_PROGRESS = """
UPDATE cdc_offset
SET last_action_id = GREATEST(last_action_id, %(action_id)s), snapshot = %(since)s::pg_snapshot,
    batch_snapshot = %(until)s::pg_snapshot, batch_action_id = %(action_id)s
WHERE id = 1
RETURNING last_action_id
"""

CLOSE_BATCH = """
UPDATE cdc_offset
SET last_action_id = GREATEST(last_action_id, %(action_id)s), snapshot = %(until)s::pg_snapshot,
    batch_snapshot = NULL, batch_action_id = 0
WHERE id = 1
RETURNING last_action_id
"""
# While changes flow, the end of a batch is saved at most this often. Each save is a
# new version of cdc_offset's row, which no VACUUM can remove while some transaction
# older than it stays open: saved after every batch, at 1,000 changes/s, a transaction
# left open for ten minutes made every look at the row walk some 60,000 of them, and
# latency grew by tens of milliseconds. A crash loses at most this much progress, and
# the producer publishes it again.
SAVE_EVERY = 0.25  # seconds

# The published changes past their retention, among the oldest PURGE_CHUNK. A change
# whose transaction is older than every one in-flight at the saved snapshot (txid
# below its xmin) was visible in it, and so is published. The oldest are picked out
# first, apart, and deleted by their keys: asked as one condition on emp_cdc, the
# planner read every change kept, through the txid index when none was old enough (27
# ms for 260,000, once a minute with the producer's loop waiting; a ten-minute
# benchmark's load showed it as a 300-500 ms stall every minute) and in a scan of the
# whole table when all were (74 ms). Now 5 and 25 ms, whatever emp_cdc holds.
PURGE_PUBLISHED = """
DELETE FROM emp_cdc
WHERE action_id = ANY (ARRAY(
    SELECT action_id
    FROM (SELECT action_id, changed_at, txid FROM emp_cdc ORDER BY action_id LIMIT %(chunk)s) AS oldest
    WHERE changed_at < now() - make_interval(secs => %(retention)s)
      AND txid < pg_snapshot_xmin((SELECT snapshot FROM cdc_offset WHERE id = 1))))
"""
PURGE_CHUNK = 10000
PURGE_EVERY = 60  # seconds

# Refusals that no retry can cure, because of the message itself: such a change goes
# to the DLQ. Any other refusal (broker down, leader moving, timeout) is retried.
REFUSED_FOR_GOOD = {
    KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG, KafkaError.INVALID_MSG_SIZE,
    KafkaError.INVALID_RECORD, KafkaError.RECORD_LIST_TOO_LARGE, KafkaError._INVALID_ARG,
    KafkaError.POLICY_VIOLATION,
}


class PublishError(Exception):
    """Kafka did not take a change; the watermark stays before it."""


class CdcProducer:
    def __init__(self, settings, stop):
        self.settings = settings
        self.stop = stop
        self.kafka = self.new_kafka_producer()
        # autocommit: the producer lock, the watermark, the looks, a batch's first chunk
        self.db = None
        self.reader = None  # reads on through a server-side cursor when a batch is larger
        self.next_purge = 0  # time.monotonic() of the next purge of emp_cdc
        self.forget_unsaved()
        self.saved_at = 0.0  # time.monotonic() of the last save of the watermark
        self.record_lines = config.RecordLines(log)

    def forget_unsaved(self):
        """What was published since the watermark was last saved: everything
        visible in the snapshot `published`, up to action_id `published_action_id`."""
        self.published = None
        self.published_action_id = 0
        self.published_unsaved = 0  # records published since the last "Offset saved"

    def run(self):
        settings = self.settings
        log.info("CDC Producer started. Polling for new records...")
        log.info("Kafka broker: %s", settings.bootstrap_servers)
        log.info("Topic: %s", settings.topic)
        log.info("DLQ Topic: %s", settings.dlq_topic)
        log.info("Source database: %s", config.database_name(settings, "source"))
        metrics.serve(settings.producer_metrics_port)
        config.check_topics(self.kafka, settings, [settings.topic, settings.dlq_topic], self.stop)
        failures = 0
        idle = False
        pouring = False  # whether the last batch's gather reached GATHER_BURST_MAX
        while not self.stop.requested:
            try:
                if self.db is None:
                    self.connect()
                elif time.monotonic() >= self.next_purge:
                    self.purge_published()
                elif published := self.work():
                    idle = False
                    if published < settings.batch_size:
                        gather = published * GATHER_PER_CHANGE
                        self.stop.sleep(min(gather, GATHER_MAX if pouring else GATHER_BURST_MAX))
                        pouring = gather >= GATHER_BURST_MAX
                else:
                    if not idle:
                        log.info("No new CDC records found. Polling for a commit (at most %g seconds apart)...",
                                 settings.poll_interval)
                    idle, pouring = True, False
                    self.wait_for_changes()
                failures = 0
            except config.ConfigError:
                raise
            except config.FatalKafkaError as error:
                failures += 1
                log.error("Kafka producer failed for good (%s); a new one republishes from the "
                          "watermark", error)
                self.kafka = self.new_kafka_producer()
                self.backoff(failures)
            except (psycopg2.OperationalError, psycopg2.InterfaceError, PublishError) as error:
                failures += 1
                metrics.error("producer", error)
                log.error("%s; retrying", config.one_line(error))
                self.backoff(failures)
            except Exception as error:
                failures += 1
                metrics.error("producer", error)
                log.exception("Unexpected error; retrying")
                self.backoff(failures)
        self.disconnect()
        log.info("CDC Producer stopped.")

    def new_kafka_producer(self):
        return Producer(config.producer_config(self.settings, "cdc-producer"))

    def backoff(self, failures):
        self.disconnect()
        self.stop.sleep(config.backoff_delay(self.settings, failures))

    def connect(self):
        """Connects to the source and waits for the producer lock."""
        # The watermark's commits do not wait for the disk: one lost in
        # a crash of the source only sends the producer back to the watermark before
        # it, to publish again what the consumer's version gate then skips.
        self.db = config.connect(self.settings, "source", application_name="cdc-producer",
                                 options="-c synchronous_commit=off -c DateStyle=ISO")
        self.db.autocommit = True
        source = f"source database {config.database_name(self.settings, 'source')}"
        with self.db.cursor() as cursor:
            if not self.wait_for_lock(cursor):
                return
            try:
                # Planned once per connection: each look is then only its two
                # probes. It also finds emp_cdc missing or unreadable.
                cursor.execute("PREPARE new_changes AS " + NEW_CHANGES)
                cursor.execute("SELECT last_action_id FROM cdc_offset WHERE id = 1")
            except psycopg2.ProgrammingError as error:
                raise config.ConfigError(f"{source}: {error.diag.message_primary} "
                                         f"(apply scripts/source/init.sql)") from None
            offset = cursor.fetchone()[0]
            # Found now, not at the first batch the WAL writer has not flushed yet.
            cursor.execute("SELECT has_function_privilege(%s, 'EXECUTE')", (FLUSH_FUNCTION,))
            if not cursor.fetchone()[0]:
                raise config.ConfigError(f"{source}: the producer's role may not execute "
                                         f"{FLUSH_FUNCTION} (apply scripts/source/roles.sql)")
            # Before anything is fetched or purged: both would be wrong from here on.
            went_back = source_rewind.went_back(cursor, self.settings)
            if went_back:
                raise config.ConfigError(
                    f"{source} went back in time: {went_back}; it was restored, re-created or "
                    f"failed over. To publish from it, stop every producer and run: "
                    f"python admin.py renumber-source")
            log.info("Loaded offset: %d", offset)
        # Planned for the whole result, not the first rows: a batch is read to its end.
        self.reader = config.connect(self.settings, "source", application_name="cdc-producer-reader",
                                     options="-c DateStyle=ISO -c cursor_tuple_fraction=1")

    def wait_for_lock(self, cursor):
        """Takes the producer lock, waiting while another producer holds it; returns
        False if a stop came first. PostgreSQL frees the lock when its holder's
        connection ends, however the holder died, and hands it to the waiter at once."""
        cursor.execute("SELECT pg_try_advisory_lock(%s)", (PRODUCER_LOCK,))
        if cursor.fetchone()[0]:
            return True
        log.info("Another producer is publishing from %s; waiting for it to stop...",
                 config.database_name(self.settings, "source"))
        # The wait is PostgreSQL's, a second at a time so that a stop is seen.
        cursor.execute("SET lock_timeout = '1s'")
        while not self.stop.requested:
            try:
                cursor.execute("SELECT pg_advisory_lock(%s)", (PRODUCER_LOCK,))
            except psycopg2.errors.LockNotAvailable:
                continue
            cursor.execute("RESET lock_timeout")
            log.info("The other producer stopped; taking over.")
            return True
        return False

    def disconnect(self):
        for connection in (self.reader, self.db):
            if connection is not None:
                connection.close()
        self.db = self.reader = None
        # Another producer may take over meanwhile: the next run starts from what is saved.
        self.forget_unsaved()

    def work(self):
        """Publishes the open batch, or a new one; returns how many changes it published.
        A stop leaves the batch open, to be finished by the next run."""
        with self.db.cursor() as cursor:
            cursor.execute(LOAD_BATCH, {"published": self.published})
            since, in_progress, until, after, batch_open, written = cursor.fetchone()
        published = 0
        # closing(): the server-side cursor's transaction ends here, however work() ends
        # (a stop, a PublishError), not later when the generator is collected.
        with closing(self.batch_chunks({"since": since, "in_progress": in_progress, "until": until,
                                        "after": after, "written": written})) as chunks:
            for rows in chunks:
                started = time.monotonic()
                self.publish(rows)
                published += len(rows)
                self.published_unsaved += len(rows)
                self.published_action_id = max(self.published_action_id, rows[-1][0])
                saved_open = len(rows) == self.settings.batch_size
                if saved_open:
                    # More may follow: the batch is saved open, at this change.
                    batch_open = True
                    with self.db.cursor() as cursor:
                        cursor.execute(SAVE_PROGRESS, {"since": since, "until": until,
                                                       "action_id": rows[-1][0]})
                        self.saved(cursor.fetchone()[0])
                metrics.batch_done("producer", len(rows), started)
                if self.stop.requested and saved_open:
                    return published
        if published or batch_open:
            self.published = until
        if self.published is not None and (batch_open or not published or self.stop.requested
                                           or time.monotonic() - self.saved_at >= SAVE_EVERY):
            with self.db.cursor() as cursor:
                cursor.execute(CLOSE_BATCH, {"until": self.published, "action_id": self.published_action_id})
                self.saved(cursor.fetchone()[0])
            self.forget_unsaved()
        return published

    def batch_chunks(self, batch):
        """The batch's changes, BATCH_SIZE at a time, each on disk at the source: the
        first chunk by one statement, the rest of a batch larger than that (a statement
        that changed a million rows) through a server-side cursor, so that memory stays
        bounded."""
        size = self.settings.batch_size
        with self.db.cursor() as cursor:
            cursor.execute(FETCH_FIRST, {**batch, "size": size})
            rows = cursor.fetchall()
            if not rows:
                return
            # The WAL flushed is only ever more: one row that saw it is enough.
            if not any(flushed for *_, flushed in rows):
                cursor.execute(FLUSH)
        yield [row[:-1] for row in rows]
        if len(rows) < size:
            return
        with self.reader, self.reader.cursor("emp_cdc_batch") as cursor:
            cursor.execute(FETCH_BATCH, {**batch, "after": rows[-1][0]})
            while rows := cursor.fetchmany(size):
                yield rows

    def saved(self, offset):
        if self.published_unsaved:
            log.info("Successfully published %d records. Offset saved: %d", self.published_unsaved, offset)
        self.published_unsaved = 0
        self.saved_at = time.monotonic()

    def purge_published(self):
        """Deletes the published changes older than CDC_RETENTION_HOURS, oldest first,
        a chunk per statement so that no lock is held long; once a minute."""
        self.next_purge = time.monotonic() + PURGE_EVERY
        retention = self.settings.cdc_retention_hours
        purged = 0
        with self.db.cursor() as cursor:
            while not self.stop.requested:
                cursor.execute(PURGE_PUBLISHED, {"chunk": PURGE_CHUNK, "retention": retention * 3600})
                if cursor.rowcount == 0:
                    break
                purged += cursor.rowcount
        if purged:
            log.info("Purged %d published changes older than %g hours from emp_cdc.", purged, retention)

    def publish(self, rows):
        """Publishes the changes and waits for Kafka's acknowledgement. A change that
        cannot be serialised, or that Kafka refuses for good, goes to the DLQ; raises
        PublishError if any change reached neither topic."""
        log.info("Fetched %d new CDC records.", len(rows))
        settings = self.settings
        changes, parked = [], []
        for row in rows:
            try:
                changes.append(Change.from_row(row))
            except InvalidChange as error:
                parked.append(self.dlq_message(row, error))
        by_value = {change.to_json(): change for change in changes}
        shown = dict(self.record_lines.shown(list(by_value.items())))
        for change in shown.values():
            log.info("Published CDC record: %s", change)

        def acknowledged(message):
            if message.value() in shown:
                log.info("Message delivered to %s [%d] at offset %d",
                         message.topic(), message.partition(), message.offset())

        refused = config.deliver(self.kafka, settings.topic,
                                 [(change.key, value, None) for value, change in by_value.items()],
                                 self.stop, acknowledged)
        retriable = [error for error, _, _ in refused if error.code() not in REFUSED_FOR_GOOD]
        if retriable:
            raise PublishError(f"Kafka did not acknowledge {len(retriable)} of {len(changes)} "
                               f"changes: {retriable[0].str()}")
        # What stays in by_value is what Kafka took.
        parked += [dlq.message(topic=settings.topic, key=key, value=value, error=error.str(),
                               stage="producer", error_class=error.name(), attempts=1,
                               action_id=by_value.pop(value).action_id)
                   for error, key, value in refused]
        if parked and config.deliver(self.kafka, settings.dlq_topic, parked, self.stop):
            raise PublishError(f"{len(parked)} changes reached neither {settings.topic} "
                               f"nor {settings.dlq_topic}")
        metrics.PUBLISHED.inc(len(by_value))
        metrics.parked("producer", parked)
        for _, value, _ in parked:
            log.warning("Message sent to DLQ: %s (%s)", settings.dlq_topic, json.loads(value)["error"])

    def dlq_message(self, row, error):
        """A DLQ message for an emp_cdc row that is not a valid change."""
        fields = dict(zip(CHANGE_FIELDS, row))
        key = None if fields["emp_id"] is None else str(fields["emp_id"]).encode()
        return dlq.message(topic=self.settings.topic, key=key,
                           value=json.dumps(fields, default=str).encode(),
                           error=f"action_id={fields['action_id']}: {error}", stage="producer",
                           error_class=type(error).__name__, attempts=1,
                           action_id=fields["action_id"])

    def wait_for_changes(self):
        """Returns when emp_cdc holds committed changes past the watermark, when a
        purge is due, or on a stop; between looks it waits FIRST_WAIT, growing by RELAX
        up to POLL_INTERVAL."""
        wait = FIRST_WAIT
        with self.db.cursor() as cursor:
            while not self.stop.requested and time.monotonic() < self.next_purge:
                cursor.execute("EXECUTE new_changes")
                if cursor.fetchone()[0]:
                    return
                self.stop.sleep(wait)
                wait = min(wait * RELAX, self.settings.poll_interval)


def main(argv):
    return config.run_daemon(CdcProducer, __doc__, argv, "source", "kafka", "daemon", "producer")


if __name__ == "__main__":
    config.run_cli(main)
