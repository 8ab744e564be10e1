#!/usr/bin/env python3
"""CDC consumer: applies the change events of bf_employee_cdc to the destination
PostgreSQL, a batch per transaction, with retry-then-DLQ for what cannot be applied.

The apply is idempotent and order-safe: cdc_applied keeps, per employee, the newest
action_id applied, and an older or repeated change is skipped; a DELETE leaves a
tombstone there. So a batch applied again after a crash or a rebalance, or the whole
topic replayed, changes nothing. Kafka offsets move only after the destination
committed, and after every rejected message is safely in the DLQ. Successive batches
are applied side by side on APPLY_CONNECTIONS connections, the gate ordering any
employee two of them hold, and acknowledged in the order consumed.

A batch the destination fails (unreachable, connection lost) is retried with
exponential backoff, reconnecting each time, and then sent to the DLQ; once the
destination answers again, the consumer replays those from the DLQ itself (redrive(),
every REDRIVE_INTERVAL seconds while any may wait). A message that
is not a valid change, or that the destination refuses (value too long, constraint),
goes to the DLQ at once with the reason; the rest of its batch is applied.
"""

import itertools
import logging
import time
from collections import deque, namedtuple
from concurrent.futures import ThreadPoolExecutor, wait

import psycopg2
from confluent_kafka import Consumer, Producer, TopicPartition

import config
import dlq
import metrics
import replay
from employee import TRUNCATE, Change, InvalidChange, json_array

log = logging.getLogger("consumer")

# A TRUNCATE waits for every apply in flight (they hold ROW EXCLUSIVE on cdc_applied
# until they commit) and holds the next ones off; its own statement then sees them all.
LOCK_ALL_EMPLOYEES = "LOCK TABLE cdc_applied IN EXCLUSIVE MODE"

# A TRUNCATE numbered T removed every row whose newest change is older than T, and
# every change older than T was made before it: the watermark in cdc_truncated makes
# GATE skip those, wherever and whenever they arrive. A row changed after the
# TRUNCATE (newer than T), applied already, stays.
APPLY_TRUNCATE = """
WITH watermark AS (
    INSERT INTO cdc_truncated AS truncated (id, action_id) VALUES (1, %(action_id)s)
    ON CONFLICT (id) DO UPDATE SET action_id = excluded.action_id
        WHERE truncated.action_id < excluded.action_id
),
tombstones AS (
    UPDATE cdc_applied SET last_action_id = %(action_id)s, deleted = true
    WHERE last_action_id < %(action_id)s
)
DELETE FROM employees
WHERE emp_id NOT IN (SELECT emp_id FROM cdc_applied WHERE last_action_id > %(action_id)s)
"""

# Each employee's newest change in the batch takes its place in cdc_applied if it is
# newer than the one applied before (ON CONFLICT ... WHERE) and than the last TRUNCATE;
# the statement returns those that did. Their rows stay locked until the commit, and
# that lock orders two consumers holding changes of one employee at once (partitions
# added, or moved from a consumer that overran max.poll.interval.ms): ON CONFLICT waits
# for the other's commit and compares with what it committed. Rows are taken in emp_id
# order, so two applies wait on each other without deadlock. (Row locks live in the
# rows: the advisory lock per employee used before took 2,000 slots of the server's
# lock table per batch, and an eighth consumer's batch failed "out of shared memory".)
GATE = """
INSERT INTO cdc_applied AS applied (emp_id, last_action_id, deleted)
SELECT DISTINCT ON (emp_id) emp_id, action_id, deleted
FROM unnest($1::bigint[], $2::int[], $3::boolean[]) AS change(action_id, emp_id, deleted)
WHERE action_id > COALESCE((SELECT action_id FROM cdc_truncated WHERE id = 1), 0)
ORDER BY emp_id, action_id DESC
ON CONFLICT (emp_id) DO UPDATE
    SET last_action_id = excluded.last_action_id, deleted = excluded.deleted,
        applied_at = now()
    WHERE applied.last_action_id < excluded.last_action_id
RETURNING emp_id, last_action_id
"""

# The changes that passed GATE, written to employees in a statement of its own: in READ
# COMMITTED its snapshot is taken after GATE's waits, so it has what the previous holder
# of an employee committed (its DELETE sees that holder's INSERT).
WRITE = """
WITH incoming AS (
    SELECT * FROM json_to_recordset($1) AS change(
        action TEXT, emp_id INT, first_name TEXT, last_name TEXT, dob DATE, city TEXT,
        salary INT)
),
deleted AS (
    DELETE FROM employees WHERE emp_id IN (SELECT emp_id FROM incoming WHERE action = 'DELETE')
)
INSERT INTO employees (emp_id, first_name, last_name, dob, city, salary)
SELECT emp_id, first_name, last_name, dob, city, salary
FROM incoming
WHERE action <> 'DELETE'
ORDER BY emp_id
ON CONFLICT (emp_id) DO UPDATE
    SET first_name = excluded.first_name, last_name = excluded.last_name,
        dob = excluded.dob, city = excluded.city, salary = excluded.salary
"""

# GATE and WRITE are planned once per connection: for a batch of a few changes, the
# planning took twice as long as the statements (one change: 1.2 ms for both planned
# each time, 0.4 ms prepared).
PREPARE_APPLY = (f"PREPARE gate(bigint[], int[], boolean[]) AS {GATE}; "
                 f"PREPARE write(json) AS {WRITE}")

# The destination is out of reach, or not ready for us (schema missing, no privilege):
# worth retrying. Any other database error is about the data and would fail again.
UNREACHABLE = (psycopg2.OperationalError, psycopg2.InterfaceError, psycopg2.ProgrammingError)
# The names a DLQ record's error class has when it was parked for one of those.
UNREACHABLE_NAMES = {name for name, error in vars(psycopg2.errors).items()
                     if isinstance(error, type) and issubclass(error, UNREACHABLE)}

# While changes flow (more than the first message of a batch is fetched already), what
# comes within this long joins the batch. librdkafka sends a produce request per
# partition, and the first to land answers the consumer's fetch: the rest of what the
# producer published together came a fetch later, as a batch of its own, so at 1,000
# changes/s the destination applied two batches for each the producer published.
# Waiting a millisecond cut the batches applied by a third and the destination's CPU by
# a quarter at that rate. A change that comes alone does not wait; under a backlog the
# batch fills at once.
FETCH_GATHER = 0.001  # seconds

Rejected = namedtuple("Rejected", "message error error_class attempts")
# A batch handed to the destination: `outcome` is the future of an applier's
# apply_with_retries().
InFlight = namedtuple("InFlight", "messages rejected outcome started")


class BatchAbandoned(Exception):
    """A stop came while the batch waited; its offsets are not stored, so the next
    run consumes it again."""


def parse_change(message):
    """The change a Kafka message carries; InvalidChange says what is wrong with it."""
    key, value = message.key(), message.value()
    if not value:
        raise InvalidChange("empty message")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidChange(f"value is not UTF-8: {error}") from None
    change = Change.from_json(text)
    if key != change.key:
        if key is None:
            raise InvalidChange("message has no key (expected the emp_id)")
        expected = "a TRUNCATE, which has none" if change.key is None else f"emp_id {change.emp_id}"
        raise InvalidChange(f"key {key[:80].decode('utf-8', 'replace')!r} does not match {expected}")
    return change


def array_literal(values):
    """Numbers or booleans as the text of a PostgreSQL array."""
    return "{" + ",".join(map(str, values)) + "}"


def lock_employees(cursor, changes):
    """A batch with a TRUNCATE locks every employee before it is applied; GATE locks
    the employees of any other batch."""
    if any(change.action == TRUNCATE for change in changes):
        cursor.execute(LOCK_ALL_EMPLOYEES)


def apply_changes(cursor, changes):
    """Applies the changes, after lock_employees(), in the cursor's transaction on a
    connection that ran PREPARE_APPLY; returns {emp_id: action_id} of the changes applied."""
    for change in changes:
        if change.action == TRUNCATE:
            cursor.execute(APPLY_TRUNCATE, {"action_id": change.action_id})
    rows = [change for change in changes if change.action != TRUNCATE]
    if not rows:
        return {}
    # PostgreSQL reads the changes as Python validated them, written anew, never the
    # bytes that came: those may hold fields, nesting or escapes it reads otherwise.
    # GATE reads three fields of each, as array literals: for 2,000 changes it took
    # 18 ms against 30 ms for their whole JSON, which the server read twice.
    cursor.execute("EXECUTE gate(%s, %s, %s)", (
        array_literal(change.action_id for change in rows),
        array_literal(change.emp_id for change in rows),
        array_literal("t" if change.action == "DELETE" else "f" for change in rows)))
    applied = dict(cursor.fetchall())
    passed = [change for change in rows if applied.get(change.emp_id) == change.action_id]
    if passed:
        cursor.execute("EXECUTE write(%s)", (json_array(passed),))
    return applied


def where(message):
    return f"{message.topic()} [{message.partition()}] at offset {message.offset()}"


class Applier:
    """A connection to the destination and the thread that applies batches on it, one
    at a time, in the order they are handed over."""

    def __init__(self, settings, stop, number):
        self.settings = settings
        self.stop = stop
        self.db = None  # connected on first use, so a destination that is down is retried
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"apply-{number}")

    def submit(self, batch, shown):
        """Starts applying the batch after those handed over before; returns the future
        of what goes to the DLQ. Its first `shown` changes get a line each."""
        return self.thread.submit(self.apply_with_retries, batch, shown)

    def close(self):
        self.thread.shutdown()
        self.disconnect()

    def reachable(self):
        """Whether the destination answers, asked between batches."""
        try:
            if self.db is None:
                self.connect()
            with self.db.cursor() as cursor:
                cursor.execute("SELECT 1")
            self.db.rollback()
            return True
        except UNREACHABLE:
            self.disconnect()
            return False

    def apply_with_retries(self, batch, shown):
        """Applies the batch, retrying while the destination is out of reach; returns
        what goes to the DLQ. The consumer takes no more batches than it has appliers
        meanwhile."""
        attempts = self.settings.max_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return self.apply(batch, shown)
            except UNREACHABLE as error:
                last_error = error
                metrics.error("consumer", error)
                self.disconnect()
                log.error("Error processing %s (attempt %d/%d): %s",
                          "message" if len(batch) == 1 else f"{len(batch)} messages",
                          attempt, attempts, config.one_line(error))
                if attempt < attempts and self.stop.sleep(config.backoff_delay(self.settings, attempt)):
                    raise BatchAbandoned() from None
        log.error("Max retries exceeded. Sending to DLQ.")
        return [Rejected(message, config.one_line(last_error), type(last_error).__name__, attempts)
                for message, _ in batch]

    def apply(self, batch, shown):
        if not batch:
            return []
        if self.db is None:
            self.connect()
        try:
            applied = self.execute_apply(batch)
            self.db.commit()
        except UNREACHABLE:
            raise
        except psycopg2.Error:
            self.db.rollback()
            return self.apply_one_by_one(batch, shown)
        self.log_applied(batch, applied, batch[:shown])
        return []

    def apply_one_by_one(self, batch, shown):
        """After bad data failed the batch: each change under a savepoint, so that the
        good ones commit and the bad ones are returned for the DLQ. In emp_id order,
        each employee's changes in the batch's order: each GATE locks its employee, and
        in this order two applies wait on each other without deadlock, as in apply()."""
        applied, rejected, good = {}, [], []
        with self.db.cursor() as cursor:
            lock_employees(cursor, [change for _, change in batch])
        # A TRUNCATE (no emp_id) first; sorted() keeps each employee's changes in order.
        in_order = sorted(batch, key=lambda item: (item[1].emp_id is not None, item[1].emp_id or 0))
        for message, change in in_order:
            with self.db.cursor() as cursor:
                cursor.execute("SAVEPOINT one_change")
                try:
                    applied.update(apply_changes(cursor, [change]))
                    good.append((message, change))
                except UNREACHABLE:
                    raise
                except psycopg2.Error as error:
                    cursor.execute("ROLLBACK TO SAVEPOINT one_change")
                    log.warning("Destination refused %s in %s: %s", change, where(message),
                                config.one_line(error))
                    rejected.append(Rejected(message, config.one_line(error), type(error).__name__, 1))
        self.db.commit()
        shown_messages = {id(message) for message, _ in batch[:shown]}
        self.log_applied(good, applied, [item for item in good if id(item[0]) in shown_messages])
        return rejected

    def execute_apply(self, batch):
        changes = [change for _, change in batch]
        with self.db.cursor() as cursor:
            lock_employees(cursor, changes)
            return apply_changes(cursor, changes)

    def log_applied(self, batch, applied, shown):
        metrics.applied_or_skipped(batch, applied)
        for _, change in shown:
            if change.action == TRUNCATE:
                log.info("TRUNCATE operation completed: every row not changed since is deleted "
                         "(%s)", change)
                continue
            if applied.get(change.emp_id) == change.action_id:
                log.info("%s operation completed for emp_id=%d", change.action, change.emp_id)
            else:
                log.info("Skipped %s: a newer or equal change of emp_id=%d is already applied",
                         change, change.emp_id)
            log.info("Successfully processed message: emp_id=%d, action=%s", change.emp_id, change.action)

    def connect(self):
        self.db = config.connect(self.settings, "dest", application_name="cdc-consumer")
        with self.db.cursor() as cursor:
            # A batch's offsets are stored once its commit returns, so the commit must
            # wait for the disk: with the destination's default synchronous_commit = off,
            # a crash lost batches already acknowledged, and they never came again. Any
            # other setting (local, remote_write, remote_apply) is the operator's choice.
            cursor.execute("SELECT set_config('synchronous_commit', 'on', false) "
                           "WHERE current_setting('synchronous_commit') = 'off'")
            cursor.execute("SELECT to_regclass('employees'), to_regclass('cdc_applied'), "
                           "to_regclass('cdc_truncated')")
            if None in cursor.fetchone():
                raise config.ConfigError(
                    f"destination database {config.database_name(self.settings, 'dest')} has no "
                    "employees, cdc_applied or cdc_truncated table (apply scripts/destination/init.sql)")
            cursor.execute(PREPARE_APPLY)
        self.db.commit()

    def disconnect(self):
        if self.db is not None:
            self.db.close()
            self.db = None


class CdcConsumer:
    def __init__(self, settings, stop):
        self.settings = settings
        self.stop = stop
        group = {"group.id": settings.group, "client.id": "cdc-consumer",
                 "auto.offset.reset": "earliest",
                 # Offsets are stored by hand once a batch is applied, and committed
                 # in the background and on close: at-least-once.
                 "enable.auto.commit": True, "enable.auto.offset.store": False,
                 # Prefetch a few batches, not librdkafka's default 64 MB and 100,000
                 # messages per partition: the destination is the slower side, and
                 # memory stays small (a backlog's drain peaked at 119 MB with 8 MB
                 # and the default count, 86 MB with these, at the same rate).
                 "queued.max.messages.kbytes": 2048, "queued.min.messages": 2000,
                 # Each partition's share of a fetch, 128 KB rather than 1 MB: the
                 # messages handed over keep the buffers they came in alive, and with
                 # 1 MB a drain of a backlog peaked at 94-103 MB, with 128 KB at 68-71
                 # MB, at the same rate. A larger message still comes: librdkafka asks
                 # for more until it fits.
                 "max.partition.fetch.bytes": 131072,
                 # A partition that becomes fetchable (at assignment, say) joins the
                 # next fetch request, which the broker may hold this long when idle.
                 "fetch.wait.max.ms": 100,
                 # A partition whose prefetch queue is full is looked at again this
                 # soon, not librdkafka's 1 s: a drain fetched about once a second per
                 # partition and idled between (30,000-32,000 changes/s, 47,000-53,000
                 # with this), and the queue filled by a burst kept the first changes
                 # after it waiting up to 900 ms (1,000/s after a burst: p99 280-320 ms,
                 # 19-24 ms with this).
                 "fetch.queue.backoff.ms": 10}
        if settings.instance_id:
            group["group.instance.id"] = settings.instance_id
        self.kafka = Consumer(config.kafka_config(settings, **group))
        self.dlq = self.new_dlq_producer()
        # The destination applies batches while this thread consumes and decodes the
        # next: the two took turns before, each idle half the time. The appliers take
        # successive batches in turn, one each in flight, and the batches are
        # acknowledged in the order consumed. Two batches holding changes of one
        # employee are then applied side by side, as by two consumers after a
        # rebalance, and GATE orders them the same way: the newest change wins, and
        # the later transaction waits for the earlier one's lock.
        self.appliers = [Applier(settings, stop, number) for number in range(settings.apply_connections)]
        self.next_applier = itertools.cycle(self.appliers)
        self.in_flight = deque()  # of InFlight, oldest first
        # (topic, partition) of those this consumer holds, as the rebalance callbacks
        # tell. Asking librdkafka (assignment()) waits for its main thread with the GIL
        # held: under oltp_drain.sh's load, a tenth of the consumer's GIL samples
        # (py-spy --gil), time in which the appliers could not run.
        self.assigned = set()
        self.record_lines = config.RecordLines(log)
        # What an earlier run parked while the destination was out of reach may wait in
        # the DLQ: looked for once the destination answers, after the first interval so
        # that a start is not slowed by reading the DLQ.
        self.redrive_due = settings.redrive_interval > 0
        self.next_redrive = time.monotonic() + settings.redrive_interval  # of the next look

    def new_dlq_producer(self):
        return Producer(config.producer_config(self.settings, "cdc-consumer-dlq"))

    def run(self):
        settings = self.settings
        log.info("CDC Consumer started.")
        log.info("Kafka broker: %s", settings.bootstrap_servers)
        log.info("Consumer group: %s", settings.group)
        log.info("Topic: %s", settings.topic)
        log.info("DLQ Topic: %s", settings.dlq_topic)
        log.info("Destination database: %s", config.database_name(settings, "dest"))
        metrics.serve(settings.consumer_metrics_port)
        try:
            self.consume()
        finally:
            # On every way out, a ConfigError too: a client left to the interpreter's
            # exit is destroyed with librdkafka's threads still running, which crashed
            # the process (SIGSEGV) now and then instead of exiting 1.
            for applier in self.appliers:
                applier.close()
            self.kafka.close()  # commits the offsets stored so far and leaves the group
        log.info("CDC Consumer stopped.")

    def consume(self):
        settings = self.settings
        config.check_topics(self.kafka, settings, [settings.topic, settings.dlq_topic], self.stop)
        self.kafka.subscribe([settings.topic], on_assign=self.on_assign, on_revoke=self.on_revoke)
        log.info("Subscribed to topics: %s", [settings.topic])
        failures = 0
        while not self.stop.requested or self.in_flight:
            try:
                self.work()
                failures = 0
            except BatchAbandoned:
                log.info("Batch abandoned; it will be consumed again on the next start.")
            except config.ConfigError:
                raise
            except config.FatalKafkaError as error:
                failures += 1
                log.error("DLQ producer failed for good (%s); the batch is consumed again "
                          "with a new one", error)
                self.dlq = self.new_dlq_producer()
                self.stop.sleep(config.backoff_delay(settings, failures))
            except Exception as error:
                failures += 1
                metrics.error("consumer", error)
                log.exception("Unexpected error; the batch will be consumed again")
                self.stop.sleep(config.backoff_delay(settings, failures))

    def on_assign(self, consumer, partitions):
        log.info("Assigned partitions: %s", sorted(p.partition for p in partitions))
        self.assigned.update((p.topic, p.partition) for p in partitions)

    def on_revoke(self, consumer, partitions):
        """Also called for partitions lost (no on_lost is given)."""
        log.info("Revoked partitions: %s", sorted(p.partition for p in partitions))
        self.assigned.difference_update((p.topic, p.partition) for p in partitions)
        # The new owner starts once the batches in hand are written, not beside them.
        wait([in_flight.outcome for in_flight in self.in_flight])

    def work(self):
        """Consumes and decodes a batch, if one comes within a second, while those
        before are applied; acknowledges those applied, and hands this one over."""
        if self.redrive_due and not self.stop.requested and time.monotonic() >= self.next_redrive:
            self.finish_in_flight()
            self.redrive()
        if self.stop.requested:
            messages = []
        else:
            # With batches in flight, only what is already fetched: they are acknowledged
            # as soon as they are applied, whether more changes come or not.
            messages = self.poll_batch(0 if self.in_flight else 1.0)
        batch, rejected, shown = self.decode(messages)
        self.finish_in_flight(keep=len(self.appliers) - 1 if messages else 0, consumed_since=messages)
        if messages:
            self.in_flight.append(InFlight(messages, rejected, next(self.next_applier).submit(batch, shown),
                                           time.monotonic()))

    def finish_in_flight(self, keep=0, consumed_since=()):
        """Acknowledges the batches in flight, oldest first, once applied: their rejects
        parked in the DLQ, then their offsets stored; those already applied, and more
        until at most `keep` remain. If one fails, consumption goes back to its start,
        and what was consumed since (the batches after it too) comes again after it."""
        while self.in_flight and (len(self.in_flight) > keep or self.in_flight[0].outcome.done()):
            in_flight = self.in_flight.popleft()
            try:
                rejected = in_flight.rejected + in_flight.outcome.result()
                self.send_to_dlq(rejected)
            except BaseException:
                later, self.in_flight = list(self.in_flight), deque()
                wait([batch.outcome for batch in later])
                self.rewind(in_flight.messages + [message for batch in later for message in batch.messages]
                            + list(consumed_since))
                raise
            if any(item.error_class in UNREACHABLE_NAMES for item in rejected):
                self.redrive_due = self.settings.redrive_interval > 0
            self.store_offsets(in_flight.messages)
            metrics.batch_done("consumer", len(in_flight.messages), in_flight.started)
            metrics.set_lag(in_flight.messages)
            log.info("Successfully processed %d messages (%d sent to DLQ).", len(in_flight.messages), len(rejected))

    def poll_batch(self, timeout):
        first = self.kafka.poll(timeout)
        if first is None:
            return []
        messages = [first]
        size = self.settings.batch_size
        if size > 1:
            messages += self.kafka.consume(size - 1, timeout=0)
            if 1 < len(messages) < size:
                messages += self.kafka.consume(size - len(messages), timeout=FETCH_GATHER)
        for message in messages:
            if message.error():
                log.error("Kafka error: %s", message.error().str())
        return [message for message in messages if not message.error()]

    def decode(self, messages):
        batch, rejected = [], []
        for message in messages:
            try:
                batch.append((message, parse_change(message)))
            except InvalidChange as error:
                log.warning("Invalid message in %s: %s", where(message), error)
                rejected.append(Rejected(message, str(error), "InvalidChange", 1))
        shown = self.record_lines.shown(batch)
        for message, change in shown:
            log.info("Consuming: %s", change)
            log.info("Message details: topic=%s, partition=%d, offset=%d",
                     message.topic(), message.partition(), message.offset())
        return batch, rejected, len(shown)

    def send_to_dlq(self, rejected):
        """Parks the rejected messages in the DLQ, retrying until Kafka has them all."""
        if not rejected:
            return
        messages = [dlq.message(topic=item.message.topic(), key=item.message.key(),
                                value=item.message.value(), error=item.error, stage="consumer",
                                error_class=item.error_class, attempts=item.attempts,
                                partition=item.message.partition(), offset=item.message.offset())
                    for item in rejected]
        failures = 0
        while refused := config.deliver(self.dlq, self.settings.dlq_topic, messages, self.stop):
            failures += 1
            log.error("The DLQ %s did not take %d messages (%s); their offsets stay until it does",
                      self.settings.dlq_topic, len(refused), refused[0][0].str())
            if self.stop.sleep(config.backoff_delay(self.settings, failures)):
                raise BatchAbandoned()
        metrics.parked("consumer", messages)
        for item in rejected:
            log.warning("Message sent to DLQ: %s (%s: %s)", self.settings.dlq_topic,
                        where(item.message), item.error)

    def redrive(self):
        """Once the destination answers again, replays to the main topic what was parked
        because it did not (content rejects stay for a person), and marks it replayed."""
        self.next_redrive = time.monotonic() + self.settings.redrive_interval
        if not self.appliers[0].reachable():
            return
        try:
            with replay.read_dlq(self.settings) as (replayed, entries):
                parked = replay.replay(self.settings, self.dlq, (
                    entry for entry in entries if entry.position not in replayed
                    and self.parked_while_unreachable(entry)))
        except replay.ReplayError as error:
            log.error("Could not re-drive the DLQ: %s; trying again in %g seconds",
                      error, self.settings.redrive_interval)
            return
        metrics.REDRIVEN.inc(parked)
        self.redrive_due = False
        if parked:
            log.info("The destination answers again: re-drove %d messages parked while it did "
                     "not, from %s to %s.", parked, self.settings.dlq_topic, self.settings.topic)

    def parked_while_unreachable(self, entry):
        record = entry.record or {}
        return (entry.headers.get(dlq.STAGE) == "consumer"
                and entry.headers.get(dlq.ERROR_CLASS) in UNREACHABLE_NAMES
                and record.get("original_topic") == self.settings.topic)

    def store_offsets(self, messages):
        # A rebalance while the batch was gathered may have taken a partition away; its
        # new owner applies those messages again, which the apply makes harmless.
        next_offsets = {}
        for message in messages:
            next_offsets[(message.topic(), message.partition())] = message.offset() + 1
        self.kafka.store_offsets(offsets=[TopicPartition(topic, partition, offset)
                                          for (topic, partition), offset in next_offsets.items()
                                          if (topic, partition) in self.assigned])

    def rewind(self, messages):
        """Seeks back to the start of a batch that was not acknowledged, so that
        nothing after it is stored before it."""
        first_offsets = {}
        for message in messages:
            first_offsets.setdefault((message.topic(), message.partition()), message.offset())
        for (topic, partition), offset in first_offsets.items():
            if (topic, partition) in self.assigned:
                self.kafka.seek(TopicPartition(topic, partition, offset))


def main(argv):
    return config.run_daemon(CdcConsumer, __doc__, argv, "dest", "kafka", "group", "daemon", "consumer")


if __name__ == "__main__":
    config.run_cli(main)
