"""A source that goes back in time (restored from a dump into a new cluster, here) is
never silently skipped or purged: the producer stops with one line saying what happened
and the command that resolves it; after that command every change made on the restored
source reaches the destination.

Slow for a test (about 30 s): it re-creates the source cluster with scripts/stack.sh."""

import re
import subprocess
import sys

from conftest import PORTS, ROOT, TEST_DB, employees, query, stack, wait_until

PG = {"PGPASSWORD": "postgres"}


def pg_tool(tool, *args):
    subprocess.run([tool, "-h", "localhost", "-p", str(PORTS["source"]), "-U", "postgres", *args],
                   env=PG, check=True, capture_output=True, timeout=120)


def insert(*emp_ids):
    for emp_id in emp_ids:
        query("source", "INSERT INTO employees VALUES (%s, 'F', 'L', '1990-01-01', 'C', %s)",
              (emp_id, emp_id))


def test_a_source_restored_from_a_dump_is_stopped_on_then_renumbered(pipeline, tmp_path):
    producer = pipeline.producer()
    pipeline.consumer()
    insert(1, 2, 3)
    pipeline.wait_for_equal()
    dump = tmp_path / "source.sql"
    pg_tool("pg_dump", "-d", TEST_DB, "-f", str(dump))
    insert(4, 5)  # published and applied, then lost with the cluster
    pipeline.wait_for_equal()
    assert producer.stop() == 0

    for command in (("reset", "source"), ("up", "source")):
        result = stack(*command)
        assert result.returncode == 0, result.stderr
    query("source", f"CREATE DATABASE {TEST_DB}", dbname="postgres")
    pg_tool("psql", "-d", TEST_DB, "-v", "ON_ERROR_STOP=1", "-f", str(dump))
    insert(6)  # made on the restored source

    restored = pipeline.start("producer.py", "producer-restored")
    assert restored.process.wait(60) == 1
    line = restored.log().splitlines()[-1]
    # Which shows first depends on how many transactions the old cluster had made.
    assert re.match(f"Error: source database localhost:{PORTS['source']}/{TEST_DB} went back in "
                    "time: its (transaction ids|action_ids) went back", line), line
    assert line.endswith("stop every producer and run: python admin.py renumber-source")
    assert query("source", "SELECT count(*) FROM emp_cdc WHERE emp_id = 6") == [(1,)]

    result = subprocess.run([sys.executable, str(ROOT / "admin.py"), "renumber-source"],
                            env=pipeline.env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Renumbered the 4 changes of emp_cdc as action_id ")
    pipeline.producer("producer-renumbered")
    insert(7)
    source = employees("source")
    wait_until(lambda: set(source) <= set(employees("dest")), 60,
               "every row of the restored source in the destination", pipeline.daemons)
    # 4 and 5 were lost with the old cluster: the destination keeps what it was told.
    assert [row[0] for row in employees("dest")] == [1, 2, 3, 4, 5, 6, 7]
