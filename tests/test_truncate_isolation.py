"""TRUNCATE at every isolation level: the destination loses every row the TRUNCATE
removed, also one committed after the truncating transaction's snapshot, and keeps a
row inserted after the TRUNCATE committed."""

import json

import pytest

from conftest import connect, employees, query


@pytest.mark.parametrize("isolation", ["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"])
def test_truncate_removes_rows_committed_after_its_snapshot(pipeline, isolation):
    pipeline.producer()
    pipeline.consumer()
    query("source", "INSERT INTO employees SELECT g, 'F', 'L', '1990-01-01', 'C', g "
                    "FROM generate_series(1, 20) g")
    pipeline.wait_for_equal()
    truncating = connect("source")
    truncating.autocommit = False
    try:
        with truncating.cursor() as cursor:
            cursor.execute(f"SET TRANSACTION ISOLATION LEVEL {isolation}")
            cursor.execute("SELECT count(*) FROM employees")
            query("source", "INSERT INTO employees VALUES (21, 'After', 'Snapshot', NULL, NULL, 21)")
            cursor.execute("TRUNCATE employees")
        truncating.commit()
    finally:
        truncating.close()
    query("source", "INSERT INTO employees VALUES (22, 'After', 'Truncate', NULL, NULL, 22)")
    assert pipeline.wait_for_equal() == [(22, "After", "Truncate", None, None, 22)]
    # One change stands for the TRUNCATE, with no key and no employee.
    [truncate] = [message for message in pipeline.messages()
                  if json.loads(message["value"])["action"] == "TRUNCATE"]
    assert truncate["key"] is None
    assert json.loads(truncate["value"])["emp_id"] is None


def test_changes_older_than_a_truncate_arriving_after_it_are_skipped(pipeline):
    pipeline.consumer()
    pipeline.produce(None, json.dumps({"action_id": 5, "emp_id": None, "first_name": None,
                                       "last_name": None, "dob": None, "city": None,
                                       "salary": None, "action": "TRUNCATE"}).encode())
    for action_id, emp_id in ((3, 1), (7, 2)):
        pipeline.produce(str(emp_id).encode(), json.dumps({
            "action_id": action_id, "emp_id": emp_id, "first_name": "F", "last_name": "L",
            "dob": None, "city": None, "salary": 1, "action": "INSERT"}).encode())
    pipeline.daemons[0].wait_for_log("INSERT operation completed for emp_id=2")
    assert employees("dest") == [(2, "F", "L", None, None, 1)]
