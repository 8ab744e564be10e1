#!/usr/bin/env python3
"""Benchmark of the pipeline on the running local stack (scripts/stack.sh up).

It works apart from any running pipeline: databases `cdc_bench` on both servers (and
`cdc_bench_bare` on the source), topics and a consumer group of its own, its own
producer.py and consumer.py, all removed at the end. It prints one table:

  single row        rows inserted one at a time: from the INSERT's commit to the row
                    in the destination (median and 95th percentile)
  one statement     N rows inserted in one statement, then updated in one statement:
                    changes per second from the commit until the destination has them
  source cost       pgbench, 8 clients of one-row UPDATE, then INSERT, transactions on
                    the captured table with the daemons running, against a bare table
                    on the same server: tps of each and the share kept
  capture cost      the same with the daemons stopped: what capture alone costs the
                    writers, and whether it runs in C or in PL/pgSQL
  latency           changes offered at 1,000/s, then as fast as 8 writers can, in
                    one-statement transactions: commit->applied p50/p95/p99/max from
                    the databases' timestamps, and when the destination caught up
  long transaction  the 1,000/s load with one transaction holding an xid open all
                    along: latency per minute
  drain             a backlog committed while the daemons are stopped, then started:
                    changes per second until the destination equals the source
  snapshot          `admin.py snapshot` of rows that predate capture, with 8 writers
                    changing them at 1,000/s and the daemons streaming: how long the
                    copy took, and when the destination equalled the source
  memory            the peak RSS of each daemon over all of the above

  .venv/bin/python scripts/bench.py            # the full run, about 20 minutes
  .venv/bin/python scripts/bench.py --quick    # every part, small: about 20 seconds
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace

from confluent_kafka.admin import AdminClient, NewTopic

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import config  # noqa: E402  (the project's modules live one folder up)
import bench_load  # noqa: E402
from bench_load import SteadyLoad, distribution, latencies  # noqa: E402

DATABASE = "cdc_bench"
BARE_DATABASE = "cdc_bench_bare"
BARE_TABLE = """
CREATE TABLE employees (emp_id INT PRIMARY KEY, first_name VARCHAR(100), last_name VARCHAR(100),
                        dob DATE, city VARCHAR(100), salary INT)
"""
FILL = ("INSERT INTO employees SELECT g, 'First' || g, 'Last', DATE '1990-01-01' + mod(g, 9000), "
        "'City', g FROM generate_series(1, %s) g")
TOTALS = "SELECT count(*), COALESCE(sum(salary), 0) FROM employees"
# What the captured table's UPDATEs call: the C function of the cdc_capture extension,
# where the server has it, or the PL/pgSQL one (see scripts/source/init.sql).
CAPTURE_FUNCTION = ("SELECT tgfoid::regproc::text FROM pg_trigger "
                    "WHERE tgrelid = 'employees'::regclass AND tgname = 'employee_audit_trigger'")
PARTS = ["single_statements", "source_cost", "capture_cost", "latency_under_load", "long_transaction", "drain",
         "snapshot"]
BACKLOG_CHUNK = 10000  # rows per transaction of the backlog

# What each part does, in full and with --quick.
SIZES = {
    False: SimpleNamespace(changes=100000, samples=50, pgbench_seconds=15, rate=1000,
                           load_seconds=60, max_seconds=30, long_minutes=10, minute=60,
                           backlog=1_000_000, snapshot_rows=1_000_000),
    True: SimpleNamespace(changes=1000, samples=5, pgbench_seconds=1, rate=1000,
                          load_seconds=1, max_seconds=1, long_minutes=2, minute=1,
                          backlog=5000, snapshot_rows=5000),
}


def connect(settings, side):
    connection = config.connect(settings, side)
    connection.autocommit = True
    return connection


def recreate_database(settings, side, name):
    with closing(connect(settings, side)) as admin, admin.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        cursor.execute(f"CREATE DATABASE {name}")


def run_sql(settings, side, *statements):
    with closing(connect(settings, side)) as db, db.cursor() as cursor:
        for statement, *params in statements:
            cursor.execute(statement, *params)


def create_databases(settings, bench):
    for side, init_sql in (("source", "scripts/source/init.sql"), ("dest", "scripts/destination/init.sql")):
        recreate_database(settings, side, DATABASE)
        run_sql(bench, side, ((ROOT / init_sql).read_text(),))


def drop_databases(settings):
    for side, name in (("source", DATABASE), ("dest", DATABASE), ("source", BARE_DATABASE)):
        with closing(connect(settings, side)) as admin, admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def wait_for(cursor, sql, expected, timeout=600, interval=0.001, params=None):
    """When the query's value became `expected`. Between looks it waits `interval`
    seconds, or four times as long as the query took if that is longer: a count of
    a large table asked without a pause would take a core of this machine from the
    pipeline it measures; the time found is late by at most five looks' worth."""
    deadline = time.monotonic() + timeout
    while True:
        asked = time.monotonic()
        cursor.execute(sql, params)
        if cursor.fetchone()[0] == expected:
            return time.monotonic()
        answered = time.monotonic()
        if answered > deadline:
            raise SystemExit(f"Error: the destination did not get there within {timeout} s")
        time.sleep(max(interval, 4 * (answered - asked)))


def wait_for_equal(source, dest, timeout=600):
    """Waits until the destination's employees add up to the source's; returns when."""
    source.execute(TOTALS)
    return wait_for(dest, "SELECT count(*) = %s AND COALESCE(sum(salary), 0) = %s FROM employees",
                    True, timeout, 0.01, source.fetchone())


def measure_latency(source, dest, samples):
    seconds = []
    for emp_id in range(1, samples + 1):
        source.execute("INSERT INTO employees VALUES (%s, 'Bench', 'Latency', '1990-01-01', 'X', 1)", (emp_id,))
        committed = time.monotonic()
        arrived = wait_for(dest, f"SELECT count(*) FROM employees WHERE emp_id = {emp_id}", 1, 30)
        seconds.append(arrived - committed)
    seconds.sort()
    return statistics.median(seconds), seconds[int(len(seconds) * 0.95) - 1]


def measure_throughput(source, dest, changes, statement, arrived_sql):
    source.execute(statement, (changes,))
    committed = time.monotonic()
    return changes / (wait_for(dest, arrived_sql, changes) - committed)


class Bench:
    """One run: the benchmark's databases and topics, its daemons, the table it prints."""

    def __init__(self, settings, size, parts):
        self.settings, self.size, self.parts = settings, size, parts
        self.bench = SimpleNamespace(**{**vars(settings), "source_db": DATABASE, "dest_db": DATABASE})
        run_id = uuid.uuid4().hex[:8]
        self.topic, self.dlq_topic = f"bench_{run_id}", f"bench_{run_id}_dlq"
        self.env = {**os.environ, "SOURCE_DB_NAME": DATABASE, "DEST_DB_NAME": DATABASE,
                    "KAFKA_TOPIC": self.topic, "KAFKA_DLQ_TOPIC": self.dlq_topic,
                    "KAFKA_GROUP_ID": f"bench_{run_id}",
                    "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers}
        self.daemons = []
        self.bare_made = False
        self.peak_rss = {"producer": 0.0, "consumer": 0.0}  # MB
        self.rows = []

    def row(self, part, what, figure):
        self.rows.append((part, what, figure))
        print(f"  {part}: {what}: {figure}", file=sys.stderr, flush=True)

    def start_daemons(self):
        self.daemons = [(name, subprocess.Popen([sys.executable, str(ROOT / f"{name}.py")],
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                env=self.env))
                        for name in self.peak_rss]

    def stop_daemons(self):
        for name, daemon in self.daemons:
            if daemon.poll() is None:
                self.peak_rss[name] = max(self.peak_rss[name], bench_load.peak_rss_mb(daemon.pid))
                daemon.terminate()
            daemon.wait(30)
        self.daemons = []

    def run(self):
        admin = AdminClient({"bootstrap.servers": self.settings.bootstrap_servers})
        for future in admin.create_topics([NewTopic(self.topic, 3, 1), NewTopic(self.dlq_topic, 1, 1)]).values():
            future.result()
        create_databases(self.settings, self.bench)
        try:
            self.start_daemons()
            with closing(connect(self.bench, "source")) as source_db, \
                    closing(connect(self.bench, "dest")) as dest_db:
                source, dest = source_db.cursor(), dest_db.cursor()
                self.single_statements(source, dest)
                dest.execute(bench_load.NOTE_APPLIED)
                for part in PARTS[1:]:
                    if part in self.parts:
                        getattr(self, part)(source, dest)
            self.stop_daemons()
            self.row("memory", "peak RSS of each daemon over all of the above",
                     "producer {producer:.0f} MB, consumer {consumer:.0f} MB".format_map(self.peak_rss))
        finally:
            self.stop_daemons()
            for future in admin.delete_topics([self.topic, self.dlq_topic]).values():
                future.result()
            drop_databases(self.settings)
        self.print_table()

    def single_statements(self, source, dest):
        size = self.size
        source.execute("INSERT INTO employees VALUES (0, 'Warm', 'Up', NULL, NULL, 0)")
        wait_for(dest, "SELECT count(*) FROM employees", 1, 60)
        median, p95 = measure_latency(source, dest, size.samples)
        self.row("single row", f"{size.samples} inserts one at a time, commit->visible",
                 f"median {median * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms")
        source.execute("TRUNCATE employees")
        wait_for(dest, "SELECT count(*) FROM employees", 0)
        rate = measure_throughput(source, dest, size.changes, FILL, "SELECT count(*) FROM employees")
        self.row("one statement", f"{size.changes:,} inserts", f"{rate:,.0f} changes/s")
        rate = measure_throughput(source, dest, size.changes,
                                  "UPDATE employees SET salary = -salary WHERE emp_id <= %s",
                                  "SELECT count(*) FROM employees WHERE salary < 0")
        self.row("one statement", f"{size.changes:,} updates", f"{rate:,.0f} changes/s")

    def pgbench_against_bare(self, part, conditions):
        """One row per statement: pgbench's tps on cdc_bench_bare (made at the first
        call), then on the captured table, and the share kept."""
        size = self.size
        if bench_load.pgbench_missing():
            self.row(part, "pgbench", "not measured: no pgbench (apt-get install postgresql-client)")
            return
        if not self.bare_made:
            recreate_database(self.settings, "source", BARE_DATABASE)
            run_sql(SimpleNamespace(**{**vars(self.settings), "source_db": BARE_DATABASE}), "source",
                    (BARE_TABLE,), (FILL, (size.changes,)))
            self.bare_made = True
        for statement in ("UPDATE", "INSERT"):
            bare, captured = (bench_load.pgbench_tps(self.settings, database, statement, size.changes,
                                                     size.pgbench_seconds)
                              for database in (BARE_DATABASE, DATABASE))
            self.row(part, f"pgbench one-row {statement}s, 8 clients, {size.pgbench_seconds} s, {conditions}",
                     f"bare {bare:,.0f} tps, captured {captured:,.0f} tps, kept {captured / bare:.0%}")

    def source_cost(self, source, dest):
        self.pgbench_against_bare("source cost", "daemons running")
        wait_for_equal(source, dest, 600)

    def capture_cost(self, source, dest):
        source.execute(CAPTURE_FUNCTION)
        language = "C" if source.fetchone()[0] == "cdc_log_employee_change" else "PL/pgSQL"
        self.stop_daemons()
        self.pgbench_against_bare("capture cost", f"daemons stopped, capture in {language}")
        self.start_daemons()
        wait_for_equal(source, dest, 600)

    def offer(self, source, dest, rate, seconds, writers):
        """A steady load; its latency samples (commit epoch, seconds), the changes
        offered per second, and how long after the last commit the destination trailed."""
        dest.execute("TRUNCATE bench_applied")
        source.execute("SELECT COALESCE(max(action_id), 0) FROM emp_cdc")
        after = source.fetchone()[0]
        with SteadyLoad(lambda: connect(self.bench, "source"), self.size.changes, rate, writers) as load:
            time.sleep(seconds)
        samples, trailed, missing = latencies(source, dest, after)
        if missing:
            raise SystemExit(f"Error: {missing} changes of the load never reached the destination")
        return samples, load.offered / load.seconds, trailed

    def latency_under_load(self, source, dest):
        size = self.size
        for rate, seconds, writers in ((size.rate, size.load_seconds, 4), (None, size.max_seconds, 8)):
            samples, offered, trailed = self.offer(source, dest, rate, seconds, writers)
            what = (f"{rate:,} changes/s, 4 writers" if rate else "as fast as 8 writers go") + f", {seconds} s"
            self.row("latency", what, f"{distribution([s for _, s in samples])} commit->applied; "
                                      f"offered {offered:,.0f}/s; caught up {max(trailed, 0) * 1000:.0f} ms "
                                      f"after the last commit")

    def long_transaction(self, source, dest):
        size = self.size
        with closing(connect(self.bench, "source")) as held_db, held_db.cursor() as held:
            held.execute("BEGIN")
            held.execute("SELECT pg_current_xact_id()")
            samples, _, _ = self.offer(source, dest, size.rate, size.long_minutes * size.minute, 4)
            held.execute("ROLLBACK")
        start = samples[0][0]
        for number in range(size.long_minutes):
            window = [seconds for at, seconds in samples
                      if start + number * size.minute <= at < start + (number + 1) * size.minute]
            self.row("long transaction", f"{size.rate:,}/s with an xid open, minute {number + 1}"
                     + ("" if size.minute == 60 else f" ({size.minute} s)"), distribution(window))

    def drain(self, source, dest):
        size = self.size
        self.stop_daemons()
        for first in range(0, size.backlog, BACKLOG_CHUNK):
            low = first % size.changes + 1
            source.execute("UPDATE employees SET salary = salary + 1 WHERE emp_id BETWEEN %s AND %s",
                           (low, low + min(BACKLOG_CHUNK, size.backlog - first) - 1))
        # The latency parts' note of each applied row would double the destination's work.
        dest.execute("ALTER TABLE employees DISABLE TRIGGER bench_note_applied")
        started = time.monotonic()
        self.start_daemons()
        rate = size.backlog / (wait_for_equal(source, dest, 1800) - started)
        dest.execute("ALTER TABLE employees ENABLE TRIGGER bench_note_applied")
        self.row("drain", f"{size.backlog:,} changes committed with the daemons stopped",
                 f"{rate:,.0f} changes/s from the daemons' start until the destination was equal")

    def snapshot(self, source, dest):
        size = self.size
        self.stop_daemons()
        # Rows that predate capture: written with the triggers off (replica role), after
        # a TRUNCATE that is captured, so the destination empties and gets none of them.
        source.execute("TRUNCATE employees")
        source.execute("SET session_replication_role = replica")
        source.execute(FILL, (size.snapshot_rows,))
        source.execute("RESET session_replication_role")
        self.start_daemons()
        wait_for(dest, "SELECT count(*) FROM employees", 0, 60)
        with SteadyLoad(lambda: connect(self.bench, "source"), size.snapshot_rows, size.rate, 8):
            started = time.monotonic()
            subprocess.run([sys.executable, str(ROOT / "admin.py"), "snapshot"], env=self.env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            copied = time.monotonic()
        equal = wait_for_equal(source, dest, 1800)
        self.row("snapshot", f"{size.snapshot_rows:,} rows that predate capture, 8 writers at "
                             f"{size.rate:,}/s during the copy",
                 f"copied in {copied - started:.1f} s; destination equal {equal - started:.1f} s "
                 f"after the start")

    def print_table(self):
        widths = [max(len(row[column]) for row in self.rows) for column in (0, 1)]
        for part, what, figure in self.rows:
            print(f"{part:<{widths[0]}}  {what:<{widths[1]}}  {figure}")


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_settings(parser, "source", "dest", "kafka")
    parser.add_argument("--quick", action="store_true", help="every part, small: a check that it runs")
    parser.add_argument("--changes", type=int, help="rows of the table and of the one-statement runs (100000)")
    parser.add_argument("--samples", type=int, help="rows inserted one at a time (50)")
    parser.add_argument("--long-minutes", type=int, help="minutes of the long-transaction run (10)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated parts to run, of {','.join(PARTS)} (all); "
                             "the table is created by the first, which always runs")
    settings = config.resolve(parser.parse_args(argv), "source", "dest", "kafka")
    size = SIZES[settings.quick]
    for name in ("changes", "samples", "long_minutes"):
        if getattr(settings, name):
            setattr(size, name, getattr(settings, name))
    unknown = set(settings.parts.split(",")) - set(PARTS)
    if unknown:
        raise config.ConfigError(f"--parts: no part named {', '.join(sorted(unknown))}")
    Bench(settings, size, settings.parts.split(",")).run()
    return 0


if __name__ == "__main__":
    config.run_cli(main)
