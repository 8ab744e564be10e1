"""admin.py verify: equal tables pass, each kind of difference is named, changes in
flight are not reported, and --repair makes the tables equal through the pipeline."""

import subprocess
import sys
import time

from conftest import ROOT, query

ROWS = 3000


def verify(pipeline, *args, **env):
    return subprocess.run([sys.executable, str(ROOT / "admin.py"), "verify", *args],
                          env={**pipeline.env, **env}, capture_output=True, text=True, timeout=120)


def fill_both(rows=ROWS):
    # replica: no trigger fires; both sides hold the rows as if replicated long ago.
    for side in ("source", "dest"):
        query(side, "SET session_replication_role = replica; "
                    "INSERT INTO employees SELECT g, 'First' || g, 'Last', '1980-01-01', "
                    "CASE WHEN g %% 7 = 0 THEN NULL ELSE 'Oslo' END, g FROM generate_series(1, %s) g",
              (rows,))


def make_one_of_each_difference():
    query("dest", "DELETE FROM employees WHERE emp_id = 5")
    query("dest", "INSERT INTO employees VALUES (5001, 'Extra', 'Row', NULL, NULL, 1)")
    query("dest", "UPDATE employees SET salary = salary + 1 WHERE emp_id = 2500")


def test_equal_tables(pipeline):
    fill_both()
    result = verify(pipeline)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Equal: {ROWS:,} rows in the source and the destination")


def test_each_kind_of_difference_then_repair(pipeline):
    fill_both()
    make_one_of_each_difference()
    started = time.monotonic()
    result = verify(pipeline)
    assert time.monotonic() - started < 15, "nothing was in flight: no reason to wait"
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == ["missing  5  (in the source, not in the destination)",
                         "extra    5001  (in the destination, not in the source)",
                         "changed  2500  (in both, with different values)"]
    assert lines[3].startswith(f"Differ: 1 missing, 1 extra, 1 changed, of {ROWS:,} source rows")

    pipeline.producer()
    pipeline.consumer()
    repaired = verify(pipeline, "--repair")
    assert repaired.returncode == 1
    assert "Repair: re-emitted 3 emp_id(s) through emp_cdc" in repaired.stdout
    assert query("source", "SELECT emp_id, action FROM emp_cdc ORDER BY action_id") == \
        [(5, "UPDATE"), (2500, "UPDATE"), (5001, "DELETE")]
    pipeline.wait_for_equal()
    assert verify(pipeline).returncode == 0


def test_changes_in_flight_are_not_reported(pipeline):
    fill_both()
    # Captured while no producer runs: in emp_cdc, not yet in the destination.
    query("source", "UPDATE employees SET city = 'Lima' WHERE emp_id IN (10, 20)")
    query("source", "DELETE FROM employees WHERE emp_id = 30")
    query("source", "INSERT INTO employees VALUES (9000, 'New', 'Row', NULL, NULL, 1)")
    checking = subprocess.Popen([sys.executable, str(ROOT / "admin.py"), "verify"], env=pipeline.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2)
    assert checking.poll() is None, "verify reported before the changes in flight were applied"
    pipeline.producer()
    pipeline.consumer()
    out, err = checking.communicate(timeout=60)
    assert checking.returncode == 0, out + err
    assert out.startswith(f"Equal: {ROWS:,} rows")


def test_a_change_stuck_in_flight_is_reported_after_the_wait(pipeline):
    fill_both()
    query("source", "UPDATE employees SET city = 'Lima' WHERE emp_id = 10")
    result = verify(pipeline, VERIFY_WAIT="1")
    assert result.returncode == 1
    assert "changed  10  (in both, with different values)" in result.stdout
