"""admin.py snapshot: the rows that predate capture reach the destination while
writers write, no copy overwrites a newer change, and a kill -9 resumes it."""

import signal
import subprocess
import sys
import time
from contextlib import closing

from conftest import ROOT, TEST_DB, connect, query, wait_until
from test_dlq import dlq_records
from workload import Writers

PREFILLED = 30000


def snapshot(pipeline, *args, **env):
    return subprocess.Popen([sys.executable, str(ROOT / "admin.py"), "snapshot", *args],
                            env={**pipeline.env, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def prefill(rows):
    # replica: no trigger fires, as for rows written before capture was installed.
    query("source", "SET session_replication_role = replica; "
                    "INSERT INTO employees SELECT g, 'Old' || g, 'Row', '1980-01-01', 'Oslo', g "
                    "FROM generate_series(1, %s) g", (rows,))


def rows_copied():
    rows = query("source", "SELECT rows_copied FROM cdc_snapshot")
    return rows[0][0] if rows else 0


def test_snapshot_under_writers_killed_and_resumed_ends_equal(pipeline):
    prefill(PREFILLED)
    pipeline.producer()
    pipeline.consumer()
    with Writers(threads=8, keys=2000) as writers:
        first = snapshot(pipeline, SNAPSHOT_CHUNK="500")
        wait_until(lambda: rows_copied() >= 5000, 60, "the snapshot to copy 5000 rows")
        first.send_signal(signal.SIGKILL)
        first.wait()
        copied_at_kill = rows_copied()
        assert copied_at_kill < PREFILLED
        second = snapshot(pipeline, SNAPSHOT_CHUNK="500")
        out, err = second.communicate(timeout=120)
        assert second.returncode == 0, err
        assert "Snapshot finished" in out and "rows/s" in out
    assert writers.committed > 0
    pipeline.wait_for_equal(timeout=120)
    # Rows no writer touches: copied exactly once, the kill and the resume included.
    copies = query("source", "SELECT count(*), count(DISTINCT emp_id) FROM emp_cdc WHERE emp_id > 2000")
    assert copies == [(PREFILLED - 2000, PREFILLED - 2000)]


def test_a_row_being_changed_is_copied_after_the_change(pipeline):
    prefill(10)
    with closing(connect("source")) as writer, writer.cursor() as cursor:
        cursor.execute("BEGIN")
        cursor.execute("UPDATE employees SET salary = -1 WHERE emp_id = 5")
        taking = snapshot(pipeline)
        time.sleep(1.5)
        assert taking.poll() is None, "the snapshot did not wait for the uncommitted change"
        cursor.execute("COMMIT")
        out, err = taking.communicate(timeout=30)
    assert taking.returncode == 0, err
    assert "Snapshot finished: 10 rows copied into emp_cdc" in out
    # The writer's change first, then the copy with what the writer left.
    assert query("source", "SELECT action, salary FROM emp_cdc WHERE emp_id = 5 ORDER BY action_id") == \
        [("UPDATE", -1), ("INSERT", -1)]
    # A later writer comes after the copy.
    query("source", "UPDATE employees SET salary = -2 WHERE emp_id = 5")
    assert query("source", "SELECT action, salary FROM emp_cdc WHERE emp_id = 5 ORDER BY action_id")[-1] == \
        ("UPDATE", -2)
    pipeline.producer()
    pipeline.consumer()
    pipeline.wait_for_equal()


def test_a_lock_timeout_of_the_database_makes_the_snapshot_wait_not_stop(pipeline):
    prefill(10)
    query("source", f"ALTER DATABASE {TEST_DB} SET lock_timeout = '100ms'")
    try:
        with closing(connect("source")) as writer, writer.cursor() as cursor:
            cursor.execute("BEGIN")
            cursor.execute("UPDATE employees SET salary = -1 WHERE emp_id = 5")
            taking = snapshot(pipeline)
            time.sleep(1.5)
            assert taking.poll() is None, taking.communicate()
            cursor.execute("COMMIT")
            out, err = taking.communicate(timeout=30)
    finally:
        query("source", f"ALTER DATABASE {TEST_DB} RESET lock_timeout")
    assert taking.returncode == 0, err
    assert "Snapshot finished: 10 rows copied into emp_cdc" in out


def test_chunks_that_end_on_the_smallest_and_largest_emp_id(pipeline):
    query("source", "SET session_replication_role = replica; "
                    "INSERT INTO employees SELECT g, 'Edge', 'Row', '1980-01-01', 'Oslo', 1 "
                    "FROM unnest(ARRAY[-2147483648, 0, 2147483647]) g")
    taking = snapshot(pipeline, SNAPSHOT_CHUNK="1")
    out, err = taking.communicate(timeout=30)
    assert taking.returncode == 0, err
    assert "Snapshot finished: 3 rows copied into emp_cdc" in out
    pipeline.producer()
    pipeline.consumer()
    assert [row[0] for row in pipeline.wait_for_equal()] == [-2147483648, 0, 2147483647]


def test_a_finished_snapshot_is_not_taken_again_unless_restarted(pipeline):
    prefill(3)
    taking = snapshot(pipeline)
    taking.communicate(timeout=30)
    again = snapshot(pipeline)
    out, _ = again.communicate(timeout=30)
    assert again.returncode == 0
    assert out.strip() == "The snapshot is already finished; --restart takes a new one."
    restarted = snapshot(pipeline, "--restart")
    out, _ = restarted.communicate(timeout=30)
    assert "Snapshot finished: 3 rows copied" in out
    assert query("source", "SELECT count(*) FROM emp_cdc") == [(6,)]


def test_each_chunk_reads_its_own_rows_even_with_statistics_from_before_the_rows(pipeline):
    # A table filled since its last ANALYZE (restored, bulk-loaded): the planner thinks
    # it nearly empty. A chunk must still read its range through the index, not the
    # whole table: 20 chunks of 5,000 rows would read 2,000,000 rows in sequential scans.
    query("source", "ANALYZE employees")
    prefill(100000)
    before = query("source", "SELECT seq_tup_read FROM pg_stat_user_tables WHERE relname = 'employees'")
    taking = snapshot(pipeline, SNAPSHOT_CHUNK="5000")
    out, err = taking.communicate(timeout=60)
    assert taking.returncode == 0, err
    assert "Snapshot finished: 100,000 rows copied" in out
    after = query("source", "SELECT seq_tup_read FROM pg_stat_user_tables WHERE relname = 'employees'")
    assert after[0][0] - before[0][0] < 100000


def test_databases_that_default_to_serializable(pipeline):
    """Some shops make every transaction SERIALIZABLE by default. The snapshot and the
    consumer's apply are reasoned at READ COMMITTED (a locked row is read as its writer
    left it): under writers, the copy still finishes, ends equal, and nothing is parked."""
    for side in ("source", "dest"):
        query(side, f"ALTER DATABASE {TEST_DB} SET default_transaction_isolation = 'serializable'")
    try:
        prefill(10000)
        pipeline.producer()
        pipeline.consumer()
        with Writers(threads=8, keys=3000) as writers:
            copy = snapshot(pipeline, SNAPSHOT_CHUNK="500")
            out, err = copy.communicate(timeout=120)
            assert copy.returncode == 0, err
            assert "Snapshot finished" in out
        assert writers.committed > 0
        pipeline.wait_for_equal(timeout=120)
        assert dlq_records(pipeline) == []
    finally:
        for side in ("source", "dest"):
            query(side, f"ALTER DATABASE {TEST_DB} RESET default_transaction_isolation")
