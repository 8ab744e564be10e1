"""Capture without a commit lock: no NOTIFY in the write path, so writers may use
two-phase commit; a transaction held open long is published, in order, when it commits."""

import io
import json
import threading
from contextlib import closing

import producer
from conftest import (INIT_SQL, assert_applied_once_in_order, connect, published_action_ids,
                      query, wait_until)

OLD_NOTIFY_TRIGGER = """
CREATE OR REPLACE FUNCTION notify_employee_changes() RETURNS trigger
LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_notify('emp_cdc', ''); RETURN NULL; END; $$;
CREATE OR REPLACE TRIGGER employee_notify_trigger
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON employees
    FOR EACH STATEMENT EXECUTE FUNCTION notify_employee_changes();
"""


def test_init_sql_removes_the_notify_trigger_of_an_older_database(services):
    query("source", OLD_NOTIFY_TRIGGER)
    for _ in range(2):  # and stays idempotent
        query("source", INIT_SQL["source"].read_text())
    assert query("source", "SELECT tgname FROM pg_trigger WHERE tgrelid = 'employees'::regclass "
                           "AND NOT tgisinternal ORDER BY tgname") == [
        ("employee_audit_insert_trigger",), ("employee_audit_trigger",), ("employee_truncate_trigger",),
        ("employees_emp_id_given_trigger",)]
    assert query("source", "SELECT proname FROM pg_proc WHERE proname = 'notify_employee_changes'") == []


def salaries_published(pipeline, emp_id):
    return [json.loads(message["value"])["salary"] for message in pipeline.messages()
            if message["key"] == str(emp_id).encode()]


def test_two_phase_commit_is_published_after_commit_prepared(pipeline):
    pipeline.producer()
    pipeline.consumer()
    with closing(connect("source")) as writer, writer.cursor() as cursor:
        try:
            cursor.execute("BEGIN")
            cursor.execute("INSERT INTO employees VALUES (1, 'Two', 'Phase', NULL, NULL, 1)")
            cursor.execute("PREPARE TRANSACTION 'cdc_test_2pc'")
            query("source", "INSERT INTO employees VALUES (2, 'Other', 'Writer', NULL, NULL, 2)")
            wait_until(lambda: query("dest", "SELECT emp_id FROM employees") == [(2,)], 30,
                       "the other writer's row in the destination", pipeline.daemons)
            assert salaries_published(pipeline, 1) == []
            cursor.execute("COMMIT PREPARED 'cdc_test_2pc'")
        finally:
            cursor.execute("SELECT gid FROM pg_prepared_xacts WHERE gid = 'cdc_test_2pc'")
            if cursor.fetchone():
                cursor.execute("ROLLBACK PREPARED 'cdc_test_2pc'")
    assert [row[0] for row in pipeline.wait_for_equal()] == [1, 2]
    assert salaries_published(pipeline, 1) == [1]


def write_single_rows(first_emp_id, count):
    with closing(connect("source")) as db, db.cursor() as cursor:
        for emp_id in range(first_emp_id, first_emp_id + count):
            cursor.execute("INSERT INTO employees VALUES (%s, 'Short', 'Writer', NULL, NULL, 0)", (emp_id,))


def test_a_long_transaction_is_published_in_order_when_it_commits(pipeline):
    pipeline.producer()
    pipeline.consumer()
    with closing(connect("source")) as long_db, long_db.cursor() as long_transaction:
        long_transaction.execute("BEGIN")
        long_transaction.execute("INSERT INTO employees VALUES (1, 'Long', 'Report', NULL, NULL, 1)")
        writers = [threading.Thread(target=write_single_rows, args=(1000 * number, 300))
                   for number in (1, 2, 3, 4)]
        for thread in writers:
            thread.start()
        for thread in writers:
            thread.join(120)
        wait_until(lambda: query("dest", "SELECT count(*) FROM employees") == [(1200,)], 60,
                   "the short writers' 1,200 rows in the destination", pipeline.daemons)
        for salary in (2, 3):
            long_transaction.execute("UPDATE employees SET salary = %s WHERE emp_id = 1", (salary,))
        assert salaries_published(pipeline, 1) == []
        long_transaction.execute("COMMIT")
    source = pipeline.wait_for_equal()
    assert len(source) == 1201 and source[0][5] == 3
    assert salaries_published(pipeline, 1) == [1, 2, 3]
    assert sorted(published_action_ids(pipeline)) == [
        row[0] for row in query("source", "SELECT action_id FROM emp_cdc ORDER BY action_id")]


def test_statements_of_many_rows_are_captured_in_order(pipeline):
    """INSERTs are logged per statement from its transition table: statements that
    write the same key twice, or read the table they insert into, keep each key's order."""
    pipeline.record_applied()
    pipeline.producer()
    pipeline.consumer()
    query("source", "INSERT INTO employees (emp_id, first_name, salary) VALUES (1, 'One', 1), (2, 'Two', 2)")
    query("source", "INSERT INTO employees (first_name, salary) VALUES ('Default', 3), ('Default', 4)")
    # The same key deleted and inserted again by one statement: DELETE first.
    query("source", "WITH gone AS (DELETE FROM employees WHERE emp_id = 1 RETURNING *) "
                    "INSERT INTO employees (emp_id, first_name, salary) SELECT emp_id, 'Again', 10 FROM gone")
    # An INSERT that reads the table it writes, and an upsert updating some keys.
    query("source", "INSERT INTO employees (emp_id, first_name, salary) "
                    "SELECT emp_id + 100, first_name, salary FROM employees")
    query("source", "INSERT INTO employees (emp_id, first_name, salary) VALUES (2, 'Two', 20), (200, 'New', 200) "
                    "ON CONFLICT (emp_id) DO UPDATE SET salary = EXCLUDED.salary")
    with closing(connect("source")) as db, db.cursor() as cursor:
        cursor.copy_expert("COPY employees (emp_id, first_name, salary) FROM STDIN",
                           io.StringIO("300\tCopied\t300\n301\tCopied\t301\n"))
        db.commit()
    assert query("source", "SELECT action FROM emp_cdc WHERE emp_id = 1 ORDER BY action_id") == [
        ("INSERT",), ("DELETE",), ("INSERT",)]
    assert query("source", "SELECT action, salary FROM emp_cdc WHERE emp_id = 2 ORDER BY action_id") == [
        ("INSERT", 2), ("UPDATE", 20)]
    source = pipeline.wait_for_equal()
    assert len(source) == 11
    assert_applied_once_in_order()
    # The defaults came after 1 and 2; the copied rows moved the sequence past 301.
    assert query("source", "INSERT INTO employees (first_name) VALUES ('Next') RETURNING emp_id") == [(302,)]


def test_a_large_batch_behind_many_kept_changes_is_not_read_along_the_primary_key(pipeline):
    # Published changes stay in emp_cdc for CDC_RETENTION_HOURS. To fill the LIMIT of a
    # large batch's first chunk, the planner chose to walk emp_cdc's primary key from
    # its oldest row, through every change kept, where the batch's rows are the newest.
    insert = ("INSERT INTO emp_cdc (emp_id, first_name, last_name, dob, city, salary, action) "
              "SELECT g, 'F', 'L', '1990-01-01', 'C', g, 'UPDATE' FROM generate_series(1, %s) g")
    with closing(connect("source")) as db, db.cursor() as cursor:
        cursor.execute(insert, (300000,))  # kept, published long ago
        cursor.execute("SELECT pg_current_snapshot()::text")
        [(since,)] = cursor.fetchall()
        cursor.execute(insert, (60000,))  # one large batch
        cursor.execute("SELECT pg_current_snapshot()::text")
        [(until,)] = cursor.fetchall()
        cursor.execute("ANALYZE emp_cdc")
        cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + producer.FETCH_FIRST,
                       {"since": since, "in_progress": "{}", "until": until, "after": 0, "size": 2000,
                        "written": "0/0"})
        [(plan,)] = cursor.fetchall()
    text = json.dumps(plan)
    assert "emp_cdc_pkey" not in text, text
    # What it read: the batch's 60,000 rows, not the 300,000 before them.
    assert plan[0]["Plan"]["Actual Rows"] == 2000
    assert '"Index Name": "emp_cdc_txid"' in text


def plan_nodes(plan):
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


def test_a_purge_reads_its_chunk_not_every_change_kept(pipeline):
    # Once a minute the producer purges, its loop waiting meanwhile. Asked as one
    # condition on emp_cdc, the planner read every change kept: through the txid index
    # when none was past its retention, in a scan of the whole table when all were.
    chunk = 1000
    with closing(connect("source")) as db, db.cursor() as cursor:
        cursor.execute("INSERT INTO emp_cdc (emp_id, first_name, last_name, dob, city, salary, action) "
                       "SELECT g, 'F', 'L', '1990-01-01', 'C', g, 'UPDATE' FROM generate_series(1, 100000) g")
        cursor.execute("UPDATE cdc_offset SET snapshot = pg_current_snapshot() WHERE id = 1")
        cursor.execute("ANALYZE emp_cdc")
        for retention, purged in ((3600, 0), (0, chunk)):  # none past it, then all
            cursor.execute("BEGIN")
            cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + producer.PURGE_PUBLISHED,
                           {"chunk": chunk, "retention": retention})
            [(plan,)] = cursor.fetchall()
            cursor.execute("SELECT count(*) FROM emp_cdc")
            assert cursor.fetchone() == (100000 - purged,)
            cursor.execute("ROLLBACK")
            read = [(node["Node Type"], node["Actual Rows"] * node["Actual Loops"]
                     + node.get("Rows Removed by Filter", 0))
                    for node in plan_nodes(plan[0]["Plan"]) if node.get("Relation Name") == "emp_cdc"]
            assert max(rows for _, rows in read) <= chunk, (retention, read)
