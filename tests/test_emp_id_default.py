"""The source numbers an employee inserted without an emp_id, and an id a writer gives
never comes back later as a default (scripts/source/init.sql)."""

import os
import random
import threading
from contextlib import closing

import psycopg2

from conftest import INIT_SQL, Pipeline, connect, query

INSERT_DEFAULT = ("INSERT INTO employees (first_name, last_name, dob, city, salary) "
                  "VALUES (%s, 'Default', '1990-01-01', 'Oslo', 50000) RETURNING emp_id")
LAST_VALUE = "coalesce(pg_sequence_last_value('employees_emp_id_seq'), 0)"
SEQUENCE_LAST = f"SELECT {LAST_VALUE}"
# An id a little above the sequence, read in the statement that gives it: read in a
# statement before, the other writers' defaults could climb to it in between (a thread
# of the test held back by the GIL), and one of them would take it first.
ABOVE_SEQUENCE = f"{LAST_VALUE} + %s"
INSERT_ABOVE = ("INSERT INTO employees (emp_id, first_name, last_name, dob, city, salary) "
                f"SELECT {ABOVE_SEQUENCE}, %s, 'Given', '1985-05-05', 'Lima', 60000 RETURNING emp_id")
MOVE_ABOVE = f"UPDATE employees SET emp_id = {ABOVE_SEQUENCE} WHERE emp_id = %s RETURNING emp_id"


def test_an_insert_without_emp_id_replicates(pipeline):
    pipeline.producer()
    pipeline.consumer()
    [(first,)] = query("source", INSERT_DEFAULT, ("First",))
    [(second,)] = query("source", INSERT_DEFAULT, ("Second",))
    assert (first, second) == (1, 2)
    assert pipeline.wait_for_equal() == [(1, "First", "Default", "1990-01-01", "Oslo", 50000),
                                         (2, "Second", "Default", "1990-01-01", "Oslo", 50000)]


def test_given_ids_above_the_sequence_never_collide_with_defaults(pipeline):
    """Four writers at once, each inserting now a default id, now one a little above the
    sequence, now moving a row of its own to such an id: no insert fails, and the
    destination gets every row."""
    pipeline.producer()
    pipeline.consumer()
    failures = []

    def write(number):
        rng = random.Random(int(os.environ.get("TEST_SEED", 1)) * 10 + number)
        with closing(connect("source")) as db, db.cursor() as cursor:
            mine = []
            for step in range(60):
                try:
                    choice = rng.random()
                    if choice < 0.5:
                        cursor.execute(INSERT_DEFAULT, (f"w{number}",))
                    else:
                        # Far enough above that the other writers' defaults cannot climb
                        # to it while the statement that gives it runs (init.sql).
                        above = rng.randint(4, 20)
                        if choice < 0.8 or not mine:
                            cursor.execute(INSERT_ABOVE, (above, f"w{number}"))
                        else:
                            cursor.execute(MOVE_ABOVE, (above, mine.pop()))
                    mine.extend(row[0] for row in cursor.fetchall())
                except psycopg2.errors.UniqueViolation as error:
                    # A given id taken by a default of another writer in between is the
                    # writer's own race; a default that collides is the failure looked for.
                    if "emp_id" in str(error) and choice < 0.5:
                        failures.append(str(error))

    threads = [threading.Thread(target=write, args=(number,)) for number in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == []
    source = pipeline.wait_for_equal()
    assert len(source) >= 4 * 60 * 0.4
    [(last,)] = query("source", SEQUENCE_LAST)
    assert last >= max(row[0] for row in source)


def test_after_a_statement_that_gives_an_id_the_next_default_is_above_it(services):
    Pipeline.reset_tables()
    rows = query("source", "INSERT INTO employees (emp_id, first_name) VALUES (1000, 'given'), "
                           "(DEFAULT, 'default') RETURNING emp_id")
    # The sequence moves before the given row is written: the default after it is above.
    assert rows == [(1000,), (1001,)]
    assert query("source", INSERT_DEFAULT, ("next",)) == [(1002,)]
    query("source", "UPDATE employees SET emp_id = 5000 WHERE emp_id = 1001")
    assert query("source", INSERT_DEFAULT, ("next",)) == [(5001,)]
    # Ids given below the sequence leave it where it is.
    query("source", "INSERT INTO employees (emp_id, first_name) VALUES (3, 'low')")
    assert query("source", INSERT_DEFAULT, ("next",)) == [(5002,)]


def test_init_sql_run_again_gives_an_old_table_its_default_past_the_ids_it_holds(services):
    """A source made before emp_id had a default: INT PRIMARY KEY, rows up to 70."""
    with closing(connect("source", "postgres")) as admin, admin.cursor() as cursor:
        cursor.execute("DROP DATABASE IF EXISTS cdc_test_old WITH (FORCE)")
        cursor.execute("CREATE DATABASE cdc_test_old")
    try:
        old = "cdc_test_old"
        query("source", "CREATE TABLE employees (emp_id INT PRIMARY KEY, first_name VARCHAR(100), "
                        "last_name VARCHAR(100), dob DATE, city VARCHAR(100), salary INT); "
                        "INSERT INTO employees VALUES (7, 'Old', 'Row', NULL, NULL, 1), "
                        "(70, 'Old', 'Row', NULL, NULL, 2)", dbname=old)
        for _ in range(2):  # idempotent
            query("source", INIT_SQL["source"].read_text(), dbname=old)
        assert query("source", INSERT_DEFAULT, ("New",), dbname=old) == [(71,)]
        assert query("source", "SELECT count(*) FROM emp_cdc", dbname=old) == [(1,)]
    finally:
        with closing(connect("source", "postgres")) as admin, admin.cursor() as cursor:
            cursor.execute("DROP DATABASE cdc_test_old WITH (FORCE)")
