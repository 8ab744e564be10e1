"""Two applies that overlap on one employee end as the newer change says: at the SQL
level, two connections; end to end, three consumers while the topic grows from 3 to 6
partitions mid-stream (an employee's older changes in one partition, newer in another)."""

import threading
import time

from confluent_kafka.admin import NewPartitions

import consumer
from conftest import connect, employees, query, wait_until
from employee import Change, Employee
from test_guarantees import SEED, assert_every_change_published
from workload import Writers


def waiting_for_a_lock():
    # A row lock is waited for on the holder's transaction id, which pg_locks shows
    # without a database: the waiting session says what it waits for.
    return query("dest", "SELECT count(*) FROM pg_stat_activity "
                         "WHERE wait_event_type = 'Lock' AND datname = current_database()")[0][0]


def applier():
    """A connection to the destination as the consumer's: GATE and WRITE prepared, and
    a transaction per apply."""
    db = connect("dest")
    with db.cursor() as cursor:
        cursor.execute(consumer.PREPARE_APPLY)
    db.autocommit = False
    return db


def apply_in_transaction(db, changes, commit=True):
    with db.cursor() as cursor:
        consumer.lock_employees(cursor, changes)
        consumer.apply_changes(cursor, changes)
    if commit:
        db.commit()


def test_an_apply_waiting_on_another_sees_what_it_committed(pipeline):
    employee = Employee(1, "Ada", "Lovelace", "1815-12-10", "London", 1)
    first, second = applier(), applier()
    try:
        # Consumer A applies the INSERT (10) and has not committed; consumer B applies
        # the DELETE (11), waits on A, and must see A's row once A commits.
        apply_in_transaction(first, [Change(10, "INSERT", employee)], commit=False)
        deleting = threading.Thread(target=apply_in_transaction, args=(second, [Change(11, "DELETE", employee)]))
        deleting.start()
        wait_until(waiting_for_a_lock, 10, "the second apply to wait for the first")
        time.sleep(0.2)
        first.commit()
        deleting.join(10)
        assert not deleting.is_alive()
    finally:
        first.close()
        second.close()
    assert employees("dest") == []
    assert query("dest", "SELECT emp_id, last_action_id, deleted FROM cdc_applied") == [(1, 11, True)]


def test_eight_applies_of_2000_employees_at_once(pipeline):
    # The server's lock table has room for about 64 locks per connection: with a lock
    # per employee, the eighth of these failed "out of shared memory".
    connections = [applier() for _ in range(8)]
    try:
        for number, db in enumerate(connections):
            changes = [Change(number * 2000 + n, "INSERT", Employee(number * 2000 + n, "A", "B", "1990-01-01", "C", n))
                       for n in range(1, 2001)]
            apply_in_transaction(db, changes, commit=False)
        for db in connections:
            db.commit()
    finally:
        for db in connections:
            db.close()
    assert query("dest", "SELECT count(*) FROM employees") == [(16000,)]


def test_three_consumers_while_the_topic_grows_from_3_to_6_partitions(pipeline):
    # Clients learn of the new partitions at their next metadata refresh: every second here.
    quick_metadata = {"KAFKA_CONFIG": "topic.metadata.refresh.interval.ms=1000"}
    pipeline.producer(**quick_metadata)
    consumers = [pipeline.start("consumer.py", f"consumer-{n}", **quick_metadata) for n in range(3)]
    for daemon in consumers:
        daemon.wait_for_log("Assigned partitions")
    with Writers(threads=6, keys=60, seed=SEED):
        time.sleep(3)
        [future] = pipeline.admin.create_partitions([NewPartitions(pipeline.topic, 6)]).values()
        future.result()
        time.sleep(6)
    rows = pipeline.wait_for_equal(90)
    assert {message["partition"] for message in pipeline.messages()} == set(range(6))
    assert_every_change_published(pipeline)
    # The bookkeeping agrees with the rows: every employee not deleted is there.
    live = query("dest", "SELECT emp_id FROM cdc_applied WHERE NOT deleted ORDER BY emp_id")
    assert [emp_id for emp_id, in live] == [row[0] for row in rows]
