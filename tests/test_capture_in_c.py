"""The capture triggers in C (scripts/source/capture) log exactly what the PL/pgSQL
ones of init.sql log, refuse what they refuse, and are what the stack runs: every other
test of the suite captures through them."""

import datetime
import io
import os
import subprocess
from contextlib import closing

import psycopg2
import pytest

from conftest import INIT_SQL, PORTS, connect, query

C_FUNCTIONS = [("employee_audit_insert_trigger", "cdc_log_employee_change"),
               ("employee_audit_trigger", "cdc_log_employee_change"),
               ("employee_truncate_trigger", "log_employees_truncate"),
               ("employees_emp_id_given_trigger", "cdc_employee_emp_id_given")]
PLPGSQL_FUNCTIONS = [("employee_audit_insert_trigger", "log_employee_changes"),
                     ("employee_audit_trigger", "log_employee_changes"),
                     ("employee_truncate_trigger", "log_employees_truncate"),
                     ("employees_emp_id_given_trigger", "employees_emp_id_given")]
HOSTILE = ["O'Brien; DROP TABLE emp_cdc; --", "back\\slash \"quoted\"", "Zoë Ñúñez 東京 🚀",
           "tab\tnew\nline\x01", "x" * 100, ""]


def trigger_functions(dbname):
    return query("source", "SELECT tgname, tgfoid::regproc::text FROM pg_trigger "
                           "WHERE tgrelid = 'employees'::regclass AND NOT tgisinternal ORDER BY tgname",
                 dbname=dbname)


def server_is_15():
    return query("source", "SELECT current_setting('server_version_num')::int / 10000")[0][0] == 15


@pytest.fixture
def databases(services):
    """Two source databases made by init.sql: one capturing in C, one told to keep PL/pgSQL."""
    if not server_is_15():
        pytest.skip("cdc_capture is written for PostgreSQL 15 and builds for no other")
    names = {"c": "cdc_capture_c", "plpgsql": "cdc_capture_plpgsql"}
    with closing(connect("source", "postgres")) as admin, admin.cursor() as cursor:
        for name in names.values():
            cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            cursor.execute(f"CREATE DATABASE {name}")
    for kind, name in names.items():
        options = "-c cdc.capture=plpgsql" if kind == "plpgsql" else ""
        result = subprocess.run(["psql", "-h", "localhost", "-p", str(PORTS["source"]), "-U", "postgres",
                                 "-d", name, "-q", "-v", "ON_ERROR_STOP=1", "-f", str(INIT_SQL["source"])],
                                env={**os.environ, "PGPASSWORD": "postgres", "PGOPTIONS": options},
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    assert trigger_functions(names["c"]) == C_FUNCTIONS
    assert trigger_functions(names["plpgsql"]) == PLPGSQL_FUNCTIONS
    yield names
    with closing(connect("source", "postgres")) as admin, admin.cursor() as cursor:
        for name in names.values():
            cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        cursor.execute("DROP ROLE IF EXISTS cdc_test_writer")


def test_the_stack_captures_in_c_on_postgresql_15_and_in_plpgsql_elsewhere(services):
    if server_is_15():
        assert query("source", "SELECT count(*) FROM pg_available_extensions WHERE name = 'cdc_capture'") \
            == [(1,)], "scripts/stack.sh did not install the cdc_capture extension (see its output)"
        assert trigger_functions("cdc_test") == C_FUNCTIONS
    else:
        assert trigger_functions("cdc_test") == PLPGSQL_FUNCTIONS


CHANGES = "SELECT action_id, emp_id, first_name, last_name, dob, city, salary, action FROM emp_cdc ORDER BY action_id"


def run_changes(dbname):
    """Every kind of change, in one session (so the C triggers' cached look-ups of
    emp_cdc are used, and must notice the ALTERs); returns emp_cdc and what to check it by."""
    with closing(connect("source", dbname)) as db, db.cursor() as cursor:
        cursor.execute("INSERT INTO employees VALUES (1, %s, %s, '1990-01-01', %s, 100), "
                       "(2, %s, %s, NULL, %s, NULL), (3, NULL, NULL, NULL, NULL, NULL)", HOSTILE)
        cursor.execute("INSERT INTO employees (first_name) VALUES ('default id') RETURNING emp_id")
        default_id = cursor.fetchone()[0]
        cursor.execute("INSERT INTO employees VALUES (1000, 'given above the sequence', NULL, NULL, NULL, 1)")
        cursor.execute("INSERT INTO employees (first_name) VALUES ('default after a given id') RETURNING emp_id")
        after_given_id = cursor.fetchone()[0]
        cursor.execute("INSERT INTO employees SELECT g, 'bulk ' || g, repeat('L', g % 100), "
                       "DATE '2000-01-01' + g, 'City', g FROM generate_series(2000, 2999) g")
        cursor.execute("UPDATE employees SET salary = coalesce(salary, 0) + 1 WHERE emp_id <= 3")
        cursor.execute("UPDATE employees SET emp_id = 5000 WHERE emp_id = 2")
        cursor.execute("DELETE FROM employees WHERE emp_id BETWEEN 2000 AND 2009")
        cursor.execute("INSERT INTO employees VALUES (1, 'upserted', NULL, NULL, NULL, 7), "
                       "(6000, 'new by upsert', NULL, NULL, NULL, 8) "
                       "ON CONFLICT (emp_id) DO UPDATE SET first_name = excluded.first_name")
        cursor.execute("INSERT INTO employees VALUES (1, 'ignored', NULL, NULL, NULL, 9) ON CONFLICT DO NOTHING")
        cursor.copy_from(io.StringIO("7000\tcopied\tin\t2001-02-03\tCOPY\t70\n7001\t\\N\t\\N\t\\N\t\\N\t\\N\n"),
                         "employees")
        db.autocommit = False
        cursor.execute("INSERT INTO employees VALUES (8000, 'kept', NULL, NULL, NULL, 1)")
        cursor.execute("SAVEPOINT undone")
        cursor.execute("INSERT INTO employees VALUES (8001, 'rolled back to the savepoint', NULL, NULL, NULL, 1)")
        cursor.execute("UPDATE employees SET salary = -1 WHERE emp_id = 8000")
        cursor.execute("ROLLBACK TO SAVEPOINT undone")
        cursor.execute("UPDATE employees SET salary = 2 WHERE emp_id = 8000")
        cursor.execute("SELECT pg_current_xact_id()::text, now()")
        transaction = cursor.fetchone()
        db.commit()
        cursor.execute("INSERT INTO employees VALUES (9000, 'rolled back', NULL, NULL, NULL, 1)")
        db.rollback()
        db.autocommit = True
        cursor.execute(CHANGES)
        changes = cursor.fetchall()
        # emp_cdc's columns move: the C triggers must look them up again.
        cursor.execute("ALTER TABLE emp_cdc DROP COLUMN city, ADD COLUMN note TEXT")
        cursor.execute("ALTER TABLE emp_cdc ADD COLUMN city VARCHAR(100)")
        cursor.execute("UPDATE employees SET city = 'moved' WHERE emp_id = 1")
        cursor.execute("TRUNCATE employees")
        cursor.execute("INSERT INTO employees VALUES (1, 'after truncate', NULL, NULL, NULL, 1)")
        cursor.execute(CHANGES + " OFFSET %s", (len(changes),))
        changes_after_alter = cursor.fetchall()
        cursor.execute("SELECT txid::text, changed_at FROM emp_cdc WHERE emp_id = 8000")
        stamps = set(cursor.fetchall())
        cursor.execute("SELECT count(DISTINCT txid), bool_and(txid IS NOT NULL AND changed_at IS NOT NULL) "
                       "FROM emp_cdc")
        transactions = cursor.fetchone()
        cursor.execute("SELECT last_value FROM employees_emp_id_seq")
        sequence_at = cursor.fetchone()[0]
    return {"changes": changes, "changes_after_alter": changes_after_alter, "stamps": stamps == {transaction}, "transactions": transactions,
            "ids": (default_id, after_given_id, sequence_at)}


def test_c_and_plpgsql_log_the_same_changes(databases):
    in_c = run_changes(databases["c"])
    in_plpgsql = run_changes(databases["plpgsql"])
    assert in_c == in_plpgsql
    changes = in_c["changes"]
    assert len(changes) == 3 + 1 + 1 + 1 + 1000 + 3 + 2 + 10 + 2 + 2 + 2
    assert changes[0][1:] == (1, HOSTILE[0], HOSTILE[1], datetime.date(1990, 1, 1), HOSTILE[2], 100, "INSERT")
    assert [change[1:] for change in in_c["changes_after_alter"]] == [
        (1, "upserted", HOSTILE[1], datetime.date(1990, 1, 1), "moved", 101, "UPDATE"),
        (None, None, None, None, None, None, "TRUNCATE"),
        (1, "after truncate", None, None, None, 1, "INSERT")]
    assert [change[7] for change in changes if change[1] in (2, 5000)][-2:] == ["DELETE", "INSERT"]
    assert in_c["stamps"] and in_c["transactions"][1]
    assert in_c["ids"][1] > 1000 and in_c["ids"][0] < 1000


def test_both_refuse_a_writer_without_the_rights_an_insert_into_emp_cdc_needs(databases):
    messages = {}
    for kind, dbname in databases.items():
        with closing(connect("source", dbname)) as db, db.cursor() as cursor:
            cursor.execute("DO $$ BEGIN CREATE ROLE cdc_test_writer LOGIN PASSWORD 'cdc_test_writer'; "
                           "EXCEPTION WHEN duplicate_object THEN NULL; END $$")
            cursor.execute("GRANT SELECT, INSERT, UPDATE ON employees TO cdc_test_writer")
            cursor.execute("GRANT USAGE ON SEQUENCE employees_emp_id_seq TO cdc_test_writer")
            cursor.execute("INSERT INTO employees VALUES (1, 'before', NULL, NULL, NULL, 1)")
        for grant in ("", "GRANT INSERT ON emp_cdc TO cdc_test_writer"):
            if grant:
                query("source", grant, dbname=dbname)
            with closing(psycopg2.connect(host="localhost", port=PORTS["source"], user="cdc_test_writer",
                                          password="cdc_test_writer", dbname=dbname)) as writer, \
                    writer.cursor() as cursor:
                with pytest.raises(psycopg2.errors.InsufficientPrivilege) as refused:
                    cursor.execute("UPDATE employees SET salary = 2 WHERE emp_id = 1")
                messages.setdefault(kind, []).append(refused.value.diag.message_primary)
        assert query("source", "SELECT salary FROM employees", dbname=dbname) == [(1,)]
    assert messages["c"] == messages["plpgsql"] == [
        "permission denied for table emp_cdc", "permission denied for sequence emp_cdc_action_id_seq"]
