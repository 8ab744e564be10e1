"""The least-privilege roles of scripts/*/roles.sql: each may do its job (the other
tests run the daemons as these roles) and is refused everything else."""

from contextlib import closing

import psycopg2
import pytest

import producer
from conftest import PORTS, TEST_DB, apply_roles, query

REFUSED = {
    ("source", "cdc_producer"): [
        "SELECT * FROM employees",
        "INSERT INTO employees (emp_id) VALUES (1)",
        "UPDATE employees SET salary = 0",
        "DELETE FROM employees",
        "INSERT INTO emp_cdc (emp_id, action) VALUES (1, 'INSERT')",
        "UPDATE emp_cdc SET city = 'x'",
        "DELETE FROM cdc_offset",
        "CREATE TABLE stolen (id INT)",
    ],
    ("dest", "cdc_consumer"): [
        "TRUNCATE employees",
        "ALTER TABLE employees ADD COLUMN extra INT",
        "DROP TABLE cdc_applied",
        "CREATE TABLE stolen (id INT)",
        "SELECT * FROM pg_authid",
    ],
    ("source", "cdc_reader"): [
        "INSERT INTO employees (emp_id) VALUES (1)",
        "DELETE FROM emp_cdc",
        "UPDATE cdc_offset SET last_action_id = 0",
        "CREATE TABLE stolen (id INT)",
    ],
    ("dest", "cdc_reader"): [
        "INSERT INTO employees (emp_id) VALUES (1)",
        "DELETE FROM cdc_applied",
        "UPDATE employees SET salary = 0",
        "CREATE TABLE stolen (id INT)",
    ],
}

ALLOWED = {
    ("source", "cdc_producer"): ["SELECT count(*) FROM emp_cdc", "DELETE FROM emp_cdc WHERE false",
                                 "UPDATE cdc_offset SET last_action_id = last_action_id",
                                 "SELECT pg_try_advisory_lock(1), pg_current_snapshot()",
                                 # what tells a source that went back in time (source_rewind.py)
                                 "SELECT last_value FROM emp_cdc_action_id_seq",
                                 "SELECT pg_control_system(), pg_control_checkpoint()",
                                 # the commit that flushes the source's WAL before a batch
                                 "SELECT pg_logical_emit_message(true, 'cdc-producer', 'flush')"],
    # An emp_id no other test uses: the rows other tests left stay out of the way.
    ("dest", "cdc_consumer"): ["INSERT INTO cdc_applied VALUES (-1999999999, 1, false)",
                               "INSERT INTO employees (emp_id) VALUES (-1999999999) ON CONFLICT (emp_id) "
                               "DO UPDATE SET salary = excluded.salary RETURNING emp_id",
                               "DELETE FROM employees WHERE emp_id = -1999999999",
                               "INSERT INTO cdc_truncated VALUES (1, 1) ON CONFLICT (id) DO NOTHING"],
    ("source", "cdc_reader"): ["SELECT count(*) FROM employees, emp_cdc, cdc_offset"],
    ("dest", "cdc_reader"): ["SELECT count(*) FROM employees, cdc_applied"],
}


def connect_as(side, role):
    connection = psycopg2.connect(host="localhost", port=PORTS[side], user=role, password=role,
                                  dbname=TEST_DB, connect_timeout=5)
    connection.autocommit = True
    return connection


@pytest.mark.parametrize("side, role", list(REFUSED))
def test_each_role_is_refused_what_it_must_not_do(services, side, role):
    with closing(connect_as(side, role)) as db:
        for statement in REFUSED[(side, role)]:
            with db.cursor() as cursor, pytest.raises(psycopg2.errors.InsufficientPrivilege):
                cursor.execute(statement)


@pytest.mark.parametrize("side, role", list(ALLOWED))
def test_each_role_may_do_its_job(services, side, role):
    with closing(connect_as(side, role)) as db, db.cursor() as cursor:
        cursor.execute("BEGIN")
        for statement in ALLOWED[(side, role)]:
            cursor.execute(statement)
        cursor.execute("ROLLBACK")


def test_the_producer_flushes_where_public_may_not(services):
    """A hardened source that revoked pg_logical_emit_message from PUBLIC: roles.sql's
    grant still lets the producer flush the WAL it would otherwise wait for."""
    function = producer.FLUSH_FUNCTION
    query("source", f"REVOKE EXECUTE ON FUNCTION {function} FROM PUBLIC")
    try:
        with closing(connect_as("source", "cdc_producer")) as db, db.cursor() as cursor:
            cursor.execute("SET synchronous_commit = off")
            cursor.execute("SELECT pg_current_wal_insert_lsn()")
            wal_end = cursor.fetchone()[0]
            cursor.execute(producer.FLUSH)
            cursor.execute("SELECT pg_current_wal_flush_lsn() >= %s", (wal_end,))
            assert cursor.fetchone() == (True,)
    finally:
        query("source", f"GRANT EXECUTE ON FUNCTION {function} TO PUBLIC")


def test_a_producer_that_may_not_flush_says_so_and_exits_1(pipeline):
    query("source", f"REVOKE EXECUTE ON FUNCTION {producer.FLUSH_FUNCTION} FROM PUBLIC, cdc_producer")
    try:
        daemon = pipeline.start("producer.py")
        assert daemon.process.wait(60) == 1
        assert daemon.log().splitlines()[-1] == (
            f"Error: source database localhost:5432/{TEST_DB}: the producer's role may not execute "
            f"{producer.FLUSH_FUNCTION} (apply scripts/source/roles.sql)")
    finally:
        query("source", f"GRANT EXECUTE ON FUNCTION {producer.FLUSH_FUNCTION} TO PUBLIC, cdc_producer")


def test_roles_sql_runs_again_without_harm(services):
    for side in PORTS:
        apply_roles(side)
    assert query("source", "SELECT has_table_privilege('cdc_producer', 'employees', 'SELECT')") == [(False,)]
    assert query("dest", "SELECT has_table_privilege('cdc_consumer', 'employees', 'INSERT')") == [(True,)]


def test_roles_sql_reads_a_password_from_the_file_the_environment_names(services, tmp_path):
    secret = tmp_path / "reader_password"
    secret.write_text("reader-from-file\n")
    try:
        apply_roles("dest", CDC_READER_PASSWORD=None, CDC_READER_PASSWORD_FILE=str(secret))
        with closing(psycopg2.connect(host="localhost", port=PORTS["dest"], user="cdc_reader",
                                      password="reader-from-file", dbname=TEST_DB, connect_timeout=5)):
            pass
    finally:
        apply_roles("dest")  # the test password again
